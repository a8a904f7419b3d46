//! The one-hour limit: jobs in every state, finished or not, answer 410 and leave nothing
//! once their lifetime is over, even before the sweeper runs; objects without a job (a crash
//! between storing and committing) and uploads a crash interrupted go after the TTL too.

use std::time::Duration;

use medrelay::ids::{JobId, UserPrefix};
use medrelay::store::Store;

use crate::fixtures::{jpeg, png};
use crate::harness::{Backend, TestApp, assert_problem, eventually, walk};
use crate::scripted::{Scripted, Step};

on_every_backend!(
    expired_jobs_answer_410_and_their_data_is_gone,
    finished_and_failed_jobs_vanish_at_the_ttl,
    jobs_in_every_state_vanish_at_the_ttl,
    a_job_past_its_lifetime_is_gone_before_the_sweeper_runs,
    orphan_objects_are_swept_after_the_ttl,
    an_upload_interrupted_by_a_crash_is_cleaned_after_the_ttl,
);

const SOON: Duration = Duration::from_secs(5);
const LATER: Duration = Duration::from_secs(10);

/// The prefix of a user no test signs in as.
fn stranger() -> UserPrefix {
    UserPrefix::from_raw("0123456789abcdef0123456789abcdef")
}

async fn expired_jobs_answer_410_and_their_data_is_gone(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.roles.worker = false;
        s.temp_ttl = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let token = app.token("slow");
    let job = app.upload_ok(&token, png(8, 8), "image/png").await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.objects().await.len(), 1);
    app.wait_expired(&token, id, Duration::from_secs(10)).await;
    app.assert_store_empties().await;
    app.stop().await;
}

async fn finished_and_failed_jobs_vanish_at_the_ttl(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.temp_ttl = Duration::from_secs(2);
        s.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let token = app.token("ttl-finished");
    let good = app.upload_ok(&token, png(8, 8), "image/png").await;
    let mut broken = jpeg(16, 16);
    broken.truncate(20);
    let bad = app.upload_ok(&token, broken, "image/jpeg").await;
    assert_eq!(
        app.wait_terminal(&token, good["id"].as_str().unwrap())
            .await["status"],
        "succeeded"
    );
    assert_eq!(
        app.wait_terminal(&token, bad["id"].as_str().unwrap()).await["status"],
        "failed"
    );
    for job in [&good, &bad] {
        app.wait_expired(&token, job["id"].as_str().unwrap(), Duration::from_secs(10))
            .await;
    }
    let list = app.list_jobs(&token).await;
    assert!(list.is_empty());
    app.assert_store_empties().await;
    app.stop().await;
}

async fn jobs_in_every_state_vanish_at_the_ttl(backend: Backend) {
    let app = TestApp::spawn_custom(
        backend,
        |s| {
            s.temp_ttl = Duration::from_secs(2);
            s.sweep_interval = Duration::from_millis(200);
        },
        |state| {
            Scripted::new(Step::Hang).install(state);
        },
    )
    .await;
    let token = app.token("ttl");
    let processing = app.upload_ok(&token, png(8, 8), "image/png").await;
    let id = processing["id"].as_str().unwrap();
    app.wait_status(&token, id, "processing").await;
    // The claim commits `processing` a moment before the worker's task registers the job.
    let running = app.lifecycle().running();
    eventually(SOON, "the processing job holds a worker slot", || async {
        (running.len() == 1)
            .then_some(())
            .ok_or(running.len().to_string())
    })
    .await;
    app.wait_expired(&token, id, Duration::from_secs(10)).await;
    // The stuck attempt was cancelled, not left holding a worker slot.
    eventually(SOON, "the expired job stops running", || async {
        running
            .is_empty()
            .then_some(())
            .ok_or(running.len().to_string())
    })
    .await;
    app.assert_store_empties().await;
    app.stop().await;
}

async fn a_job_past_its_lifetime_is_gone_before_the_sweeper_runs(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.temp_ttl = Duration::from_secs(1);
        s.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let token = app.token("late");
    let job = app.upload_ok(&token, png(8, 8), "image/png").await;
    let id = job["id"].as_str().unwrap();
    app.wait_terminal(&token, id).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_problem(app.get_job(&token, id).await, 410, "job-expired").await;
    let list = app.list_jobs(&token).await;
    assert!(list.is_empty());
    app.stop().await;
}

async fn orphan_objects_are_swept_after_the_ttl(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.temp_ttl = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(200);
    })
    .await;
    // What a crash between storing and committing leaves: an object with no row.
    let orphan = Store::document_key(&stranger(), &JobId::from_raw("crashed-upload"));
    app.store()
        .put(&orphan, bytes::Bytes::from_static(b"ciphertext"))
        .await
        .unwrap();
    assert_eq!(app.objects().await.len(), 1);
    let started = std::time::Instant::now();
    app.assert_store_empties().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("medrelay_oldest_object_age_seconds"),
        "{metrics}"
    );
    app.stop().await;
}

/// Incomplete multipart uploads in the test bucket (moto answers unsigned requests).
async fn incomplete_uploads(app: &TestApp) -> usize {
    let bucket = app
        .settings
        .storage_url
        .as_deref()
        .unwrap()
        .trim_start_matches("s3://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let xml = reqwest::get(format!("{endpoint}/{bucket}?uploads"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    xml.matches("<UploadId>").count()
}

async fn an_upload_interrupted_by_a_crash_is_cleaned_after_the_ttl(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.temp_ttl = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let store = app.store().clone();
    let path = Store::document_key(&stranger(), &JobId::from_raw("interrupted"));
    let mut writer = store.writer(&path);
    writer
        .write(bytes::Bytes::from(vec![7u8; 6 * 1024 * 1024]))
        .await
        .unwrap();
    // The process "crashes": the writer is neither finished, aborted nor dropped (a drop
    // would let object_store clean its staging file; a SIGKILL does not).
    std::mem::forget(writer);
    let objects = app.data_dir.path().join("objects");
    eventually(LATER, "an upload in progress to abandon", || async {
        let open = if backend.s3() {
            incomplete_uploads(&app).await
        } else {
            walk(&objects)
                .into_iter()
                .filter(|p| p.to_string_lossy().contains('#'))
                .count()
        };
        (open == 1).then_some(()).ok_or(format!("{open} open"))
    })
    .await;
    eventually(LATER, "the abandoned upload removed", || async {
        let left = if backend.s3() {
            incomplete_uploads(&app).await
        } else {
            walk(&objects).len()
        };
        (left == 0)
            .then_some(())
            .ok_or(format!("{left} left: {:?}", walk(&objects)))
    })
    .await;
    app.assert_store_empties().await;
    app.stop().await;
}
