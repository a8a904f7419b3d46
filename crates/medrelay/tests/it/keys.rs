//! Master keys across instances: a data key wrapped by a master key an instance lacks is a
//! configuration problem, not tampering. The job waits (its attempts untouched) until an
//! instance with the key takes it; a result such an instance cannot open is a 503; nobody is
//! purged.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::text_pdf;
use crate::harness::{assert_problem, drop_postgres, eventually, fresh_bucket, fresh_postgres};
use crate::server::{Server, wait_terminal};

fn key_line(kid: &str) -> String {
    use base64::Engine;
    let key: [u8; 32] = rand::random();
    format!(
        "{kid}:{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_missing_on_one_instance_delays_jobs_and_purges_nobody() {
    let (url, name) = fresh_postgres().await;
    let storage = format!("s3://{}/medrelay", fresh_bucket().await);
    let (old, new) = (key_line("k-old"), key_line("k-new"));
    let both = format!("{old},{new}");
    let secret = key_line("jwt");
    let start = |roles: &str, keyring: &str| {
        Server::start(&[
            ("MEDRELAY_DATABASE_URL", url.as_str()),
            ("MEDRELAY_STORAGE_URL", storage.as_str()),
            ("MEDRELAY_JWT_SECRET", secret.as_str()),
            ("MEDRELAY_MASTER_KEY", keyring),
            ("MEDRELAY_ROLES", roles),
            ("MEDRELAY_RETRY_DELAYS", "300ms,300ms,300ms"),
            ("MEDRELAY_ADMIN_LISTEN", "127.0.0.1:0"),
        ])
    };
    // The API already encrypts with the new key; the only worker has the old one alone.
    let api = start("api", &both);
    let lagging = start("worker", &old);
    let http = reqwest::Client::new();
    let alice = api.token("alice");
    let job: Value = http
        .post(format!("{}/v1/documents", api.addr))
        .bearer_auth(&alice)
        .body(text_pdf(&["Vaccination record"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();

    // The lagging worker tries, says which key it lacks, and hands the job back each time
    // without using up an attempt.
    let missing = "medrelay_master_key_missing_total{kid=\"k-new\"}";
    eventually(Duration::from_secs(20), "three tries", || async {
        let tries = lagging.metric(missing).await;
        (tries >= 3.0).then_some(()).ok_or(tries.to_string())
    })
    .await;
    let waiting: Value = http
        .get(format!("{}/v1/jobs/{id}", api.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        matches!(waiting["status"].as_str(), Some("queued" | "processing")),
        "{waiting}"
    );
    assert!(waiting["attempts"].as_i64().unwrap() <= 1, "{waiting}");

    // A worker with the key takes it: one attempt, success.
    let current = start("worker", &both);
    let done = wait_terminal(&http, &api.addr, &alice, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");

    // An API instance without the result's key answers 503 (try again), and purges nobody.
    let lagging_api = start("api", &old);
    let response = http
        .get(format!("{}/v1/jobs/{id}", lagging_api.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    assert_problem(response, 503, "service-unavailable").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Value = http
        .get(format!("{}/v1/jobs/{id}", api.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "succeeded", "not purged: {again}");
    assert!(again["result"].is_object());
    let purges = medrelay::db::Db::connect(&url)
        .await
        .unwrap()
        .purges()
        .await
        .unwrap();
    assert!(purges.is_empty(), "{purges:?}");
    assert_eq!(
        http.get(format!("{}/v1/jobs", api.addr))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    drop((api, lagging, current, lagging_api));
    drop_postgres(&name).await;
}
