//! Deleting before the hour is up: all of a user's data at once (`DELETE /v1/me/data`),
//! leaving a PHI-free tombstone and nothing in the store. (Deleting one job is part of
//! `upload::a_real_pdf_is_read_and_then_forgotten`.)

use reqwest::StatusCode;

use crate::fixtures::png;
use crate::harness::{Backend, TestApp};

on_every_backend!(deleting_my_data_removes_every_job_and_object);

async fn deleting_my_data_removes_every_job_and_object(backend: Backend) {
    // No worker: the documents stay in the store until the purge.
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("leaving");
    let other = app.token("staying");
    let mut gone = Vec::new();
    for _ in 0..3 {
        gone.push(app.upload_ok(&token, png(8, 8), "image/png").await["id"].clone());
    }
    let kept = app.upload_ok(&other, png(8, 8), "image/png").await;
    assert_eq!(app.objects().await.len(), 4);
    assert_eq!(
        app.delete(&token, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    let list = app.list_jobs(&token).await;
    assert!(list.is_empty());
    // What remains for a day is a tombstone without the user id, keys or content.
    for id in &gone {
        let row = app.row(id.as_str().unwrap()).await.unwrap();
        assert_eq!(row.owner, row.user_prefix.as_str());
        assert!(row.user_id().is_none());
        assert!(row.document_dek.is_none() && row.result.is_none());
    }
    let left = app.objects().await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(kept["id"].as_str().unwrap()));
    // Object keys are opaque: no user id, no file name.
    assert!(!left[0].contains("staying"));
    // Deleting again is fine.
    assert_eq!(
        app.delete(&token, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    app.stop().await;
}
