//! Several instances on one PostgreSQL database and one bucket: what one instance does reaches
//! the work of every other within a second.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::text_pdf;
use crate::harness::{drop_postgres, eventually, fresh_bucket, fresh_postgres};
use crate::server::Server;

/// A worker-only instance listens too: a job deleted through another instance while its
/// Claude call is in flight stops at once, and no further call is made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_elsewhere_stops_the_attempt_on_a_worker_only_instance() {
    let (url, name) = fresh_postgres().await;
    let storage = format!("s3://{}/medrelay", fresh_bucket().await);
    let mut slow = Reply::ok(extraction("read by Claude"));
    slow.delay = Duration::from_secs(20);
    let (mock, base) = Mock::start(vec![], Some(slow)).await;
    let common = [
        ("MEDRELAY_DATABASE_URL", url.as_str()),
        ("MEDRELAY_STORAGE_URL", storage.as_str()),
        (
            "MEDRELAY_MASTER_KEY",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ),
        (
            "MEDRELAY_JWT_SECRET",
            "a-test-secret-of-at-least-thirty-two-bytes",
        ),
        ("MEDRELAY_PROCESSOR", "anthropic"),
        ("ANTHROPIC_BASE_URL", base.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("MEDRELAY_ADMIN_LISTEN", "127.0.0.1:0"),
    ];
    let with_roles = |roles: &'static str| {
        let mut envs = common.to_vec();
        envs.push(("MEDRELAY_ROLES", roles));
        Server::start(&envs)
    };
    let api = with_roles("api");
    let worker = with_roles("worker");
    let http = reqwest::Client::new();
    let alice = api.token("alice");
    let job: Value = http
        .post(format!("{}/v1/documents", api.addr))
        .bearer_auth(&alice)
        .body(text_pdf(&["Discharge summary"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    // The worker's call to Claude is in flight.
    eventually(Duration::from_secs(20), "a call in flight", || async {
        (mock.calls().len() == 1)
            .then_some(())
            .ok_or("no call yet".to_owned())
    })
    .await;
    assert_eq!(worker.metric("medrelay_jobs_running_here").await, 1.0);

    let deleted = http
        .delete(format!("{}/v1/jobs/{id}", api.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let answered = Instant::now();
    eventually(Duration::from_secs(5), "the attempt stopped", || async {
        let running = worker.metric("medrelay_jobs_running_here").await;
        (running == 0.0).then_some(()).ok_or(running.to_string())
    })
    .await;
    assert!(
        answered.elapsed() < Duration::from_millis(1500),
        "stopped {:?} after the delete was answered",
        answered.elapsed()
    );
    // Nothing more reaches Claude for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.calls().len(), 1);
    drop((api, worker));
    drop_postgres(&name).await;
}
