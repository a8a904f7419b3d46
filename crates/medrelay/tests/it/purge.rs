//! Failures nobody planned for (a panic in processing, a ciphertext that fails its integrity
//! check) end the job with a friendly message and purge every temporary byte of that user, and
//! of no other; the database itself queues the purge, and nothing a racing job does brings
//! data back.

use std::time::Duration;

use medrelay::ids::JobId;
use medrelay::model::PurgeReason;
use medrelay::processor::MediaType;
use medrelay::store::Store;
use serde_json::Value;

use crate::fixtures::{corpus_file, png, text_pdf};
use crate::harness::{Backend, TestApp, eventually};
use crate::scripted::{Scripted, Step};

on_every_backend!(
    a_tampered_ciphertext_purges_every_job_of_that_user_and_no_other,
    a_panic_in_a_job_fails_it_purges_its_user_and_the_worker_goes_on,
    a_purge_racing_a_finishing_job_leaves_nothing_behind,
);

async fn a_tampered_ciphertext_purges_every_job_of_that_user_and_no_other(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |s| s.workers = 1).await;
    let victim = app.token("victim");
    let other = app.token("bystander");
    // A finished job with a result, for each user.
    let done_v = app
        .upload_ok(&victim, text_pdf(&["earlier result"]), "application/pdf")
        .await;
    let done_o = app
        .upload_ok(&other, text_pdf(&["other result"]), "application/pdf")
        .await;
    for (t, j) in [(&victim, &done_v), (&other, &done_o)] {
        assert_eq!(
            app.wait_terminal(t, j["id"].as_str().unwrap()).await["status"],
            "succeeded"
        );
    }
    // Queued jobs, with the worker stopped.
    app.settings.roles.worker = false;
    app.restart().await;
    let tampered = app
        .upload_ok(&victim, text_pdf(&["to be tampered"]), "application/pdf")
        .await;
    let queued_v = app.upload_ok(&victim, png(8, 8), "image/png").await;
    let queued_o = app.upload_ok(&other, png(8, 8), "image/png").await;
    let prefix = app.user_prefix("victim");
    let path = Store::document_key(&prefix, &JobId::from_raw(tampered["id"].as_str().unwrap()));
    let store = app.store().clone();
    let mut bytes = store.read(&path).await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    store.put(&path, bytes.into()).await.unwrap();

    app.settings.roles.worker = true;
    app.restart().await;
    // Every job of the victim ends failed with the friendly "upload it again", results too.
    for job in [&tampered, &queued_v, &done_v] {
        let now = app
            .wait_status(&victim, job["id"].as_str().unwrap(), "failed")
            .await;
        assert_eq!(now["error"]["code"], "processing-failed", "{now}");
        assert_eq!(now["error"]["retryable"], true);
        assert!(now["result"].is_null());
    }
    // Nothing of the victim is left in the store; the bystander is untouched.
    eventually(
        Duration::from_secs(10),
        "no object of the victim",
        || async {
            let objects = app.objects().await;
            match objects.iter().any(|o| o.starts_with(prefix.as_str())) {
                false => Ok(()),
                true => Err(format!("{objects:?}")),
            }
        },
    )
    .await;
    let kept = app
        .wait_terminal(&other, done_o["id"].as_str().unwrap())
        .await;
    assert_eq!(kept["status"], "succeeded");
    assert!(
        kept["result"]["text"]
            .as_str()
            .unwrap()
            .contains("other result")
    );
    let kept = app
        .wait_terminal(&other, queued_o["id"].as_str().unwrap())
        .await;
    assert_eq!(kept["status"], "succeeded");
    // The audit log records it, without a user id.
    let purges = app.purges().await;
    assert_eq!(purges.len(), 1);
    assert_eq!(purges[0].user_prefix, prefix);
    assert_eq!(purges[0].reason, PurgeReason::UnmanagedFailure);
    assert_eq!(
        purges[0].job_id.as_ref().map(JobId::as_str),
        tampered["id"].as_str()
    );
    assert!(purges[0].completed_at.is_some());
    assert_eq!(purges[0].jobs_purged, Some(3));
    app.assert_store_empties().await;
    app.stop().await;
}

async fn a_panic_in_a_job_fails_it_purges_its_user_and_the_worker_goes_on(backend: Backend) {
    let app = TestApp::spawn_custom(
        backend,
        |s| s.workers = 1,
        |state| {
            Scripted::new(Step::Local)
                .on(MediaType::Png, Step::Panic)
                .install(state);
        },
    )
    .await;
    let unlucky = app.token("unlucky");
    let fine = app.token("fine");
    let job = app.upload_ok(&unlucky, png(8, 8), "image/png").await;
    let done = app
        .wait_terminal(&unlucky, job["id"].as_str().unwrap())
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "processing-failed");
    assert_eq!(done["error"]["retryable"], true);
    // The single worker slot is free again and serves the next job.
    let job = app
        .upload_ok(
            &fine,
            corpus_file("001-trivial--minimal-document.pdf"),
            "application/pdf",
        )
        .await;
    let done = app.wait_terminal(&fine, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    let purges = app.wait_purged().await;
    assert_eq!(purges.len(), 1);
    assert_eq!(purges[0].user_prefix, app.user_prefix("unlucky"));
    app.assert_store_empties().await;
    app.stop().await;
}

async fn a_purge_racing_a_finishing_job_leaves_nothing_behind(backend: Backend) {
    let mut gate = None;
    let app = TestApp::spawn_custom(
        backend,
        |s| s.workers = 2,
        |state| {
            let script = Scripted::new(Step::Gated).on(MediaType::Png, Step::Panic);
            gate = Some(script.install(state));
        },
    )
    .await;
    let gate = gate.unwrap();
    let token = app.token("racing");
    let slow = app
        .upload_ok(
            &token,
            text_pdf(&["finishing as the purge runs"]),
            "application/pdf",
        )
        .await;
    let slow_id = slow["id"].as_str().unwrap();
    app.wait_status(&token, slow_id, "processing").await;
    // An unmanaged failure of the same user purges while the first job is mid-flight.
    let bad = app.upload_ok(&token, png(8, 8), "image/png").await;
    app.wait_terminal(&token, bad["id"].as_str().unwrap()).await;
    app.wait_purged().await;
    // Now the slow job may finish: nothing it does may bring data back.
    gate.add_permits(10);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job: Value = app.get_job(&token, slow_id).await.json().await.unwrap();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "processing-failed");
    assert!(job["result"].is_null());
    app.assert_store_empties().await;
    let row = app.row(slow_id).await.unwrap();
    assert!(row.result.is_none() && row.result_dek.is_none() && row.document_dek.is_none());
    app.stop().await;
}
