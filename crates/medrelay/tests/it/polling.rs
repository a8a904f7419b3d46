//! Following a job: polling (with `Retry-After` while not terminal), the list of the caller's
//! jobs, and server-sent events until a terminal state, also when another instance runs the
//! job (PostgreSQL's NOTIFY).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::{corpus_file, png};
use crate::harness::{Backend, TestApp};

on_every_backend!(
    jobs_are_listed_newest_first,
    events_stream_the_job_until_it_is_terminal,
);

async fn jobs_are_listed_newest_first(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("lister");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.upload_ok(&token, png(4, 4), "image/png").await["id"].clone());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let list = app.list_jobs(&token).await;
    let listed: Vec<Value> = list.iter().map(|j| j["id"].clone()).collect();
    ids.reverse();
    assert_eq!(listed, ids);
    // A job that is not terminal tells the app when to poll again.
    let r = app.get_job(&token, ids[0].as_str().unwrap()).await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=600).contains(&retry_after));
    app.stop().await;
}

async fn events_stream_the_job_until_it_is_terminal(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("listener");
    let job = app
        .upload_ok(
            &token,
            corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf"),
            "application/pdf",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let response = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );

    // Start a worker only now, so the stream sees queued, then the rest.
    let worker_state = app.state().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(medrelay::worker::run(worker_state, stop.clone()));

    let body = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends after a terminal state")
        .unwrap();
    let statuses: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| {
            serde_json::from_str::<Value>(d.trim()).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(body.contains("event: job"), "{body}");
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("queued"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("succeeded"),
        "{statuses:?}"
    );
    stop.cancel();
    worker.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_client_of_one_instance_when_another_runs_the_job() {
    let key = "shared:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let secret = "a-shared-token-secret-of-32-characters";
    let api = TestApp::spawn_with(Backend::PostgresFolder, |s| {
        s.roles.worker = false;
        s.master_key = Some(medrelay::config::Secret::new(key));
        s.jwt_secret = Some(medrelay::config::Secret::new(secret));
    })
    .await;
    let objects = api.data_dir.path().join("objects");
    let database = api.settings.database_url.clone();
    let worker = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.roles.api = true;
        s.database_url = database;
        s.storage_url = Some(format!("file://{}", objects.display()));
        s.master_key = Some(medrelay::config::Secret::new(key));
        s.jwt_secret = Some(medrelay::config::Secret::new(secret));
        s.poll_interval = Duration::from_secs(3600);
    })
    .await;
    let token = api.token("two-instances");
    let job = api
        .upload_ok(
            &token,
            corpus_file("001-trivial--minimal-document.pdf"),
            "application/pdf",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let stream = api
        .http
        .get(api.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    // The worker instance polls once an hour: wake it by hand, as a fresh upload there would.
    worker.lifecycle().wake_worker();
    let started = std::time::Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(8), stream.text())
        .await
        .expect("the stream ended")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
    let last = body
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap();
    let last: Value = serde_json::from_str(last.trim()).unwrap();
    assert_eq!(last["status"], "succeeded", "{body}");
    worker.stop().await;
    api.stop().await;
}
