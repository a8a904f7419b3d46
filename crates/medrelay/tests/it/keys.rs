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
    let job = api.upload(&alice, text_pdf(&["Vaccination record"])).await;
    let id = job["id"].as_str().unwrap().to_owned();

    // The lagging worker tries, says which key it lacks, and hands the job back each time
    // without using up an attempt.
    let missing = "medrelay_master_key_missing_total{kid=\"k-new\"}";
    eventually(Duration::from_secs(20), "three tries", || async {
        let tries = lagging.metric(missing).await;
        (tries >= 3.0).then_some(()).ok_or(tries.to_string())
    })
    .await;
    let waiting = api.job(&alice, &id).await;
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
    let again = api.job(&alice, &id).await;
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

/// The rotation runbook (docs/operations.md) across two running instances with uploads going
/// on: the new key is added decrypt-only everywhere, then made the encrypting key everywhere,
/// then the old one is retired after TTL + sweep interval. Every job succeeds; nobody is
/// purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_key_rotation_loses_no_job_and_purges_nobody() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (url, name) = fresh_postgres().await;
    let storage = format!("s3://{}/medrelay", fresh_bucket().await);
    let (old, new) = (key_line("k-old"), key_line("k-new"));
    let old_and_new = format!("{old},{new}");
    let prefix = key_line("p").split_once(':').unwrap().1.to_owned();
    let secret = key_line("jwt");
    let phases: [(&str, Option<&str>); 4] = [
        (&old, None),
        // 1. The new key everywhere, decrypt-only.
        (&old_and_new, Some("k-old")),
        // 2. The new key encrypts everywhere.
        (&old_and_new, Some("k-new")),
        // 3. After TTL + sweep interval, the old key retires.
        (&new, None),
    ];
    let start = |dir: &std::path::Path, phase: usize| {
        let (keyring, current) = phases[phase];
        let mut envs = vec![
            ("MEDRELAY_DATABASE_URL", url.as_str()),
            ("MEDRELAY_STORAGE_URL", storage.as_str()),
            ("MEDRELAY_JWT_SECRET", secret.as_str()),
            ("MEDRELAY_PREFIX_KEY", prefix.as_str()),
            ("MEDRELAY_MASTER_KEY", keyring),
            ("MEDRELAY_TEMP_TTL", "12s"),
            ("MEDRELAY_SWEEP_INTERVAL", "1s"),
            ("MEDRELAY_RETRY_DELAYS", "300ms,300ms,300ms"),
            ("MEDRELAY_SHUTDOWN_GRACE", "5s"),
        ];
        if let Some(kid) = current {
            envs.push(("MEDRELAY_MASTER_KEY_CURRENT", kid));
        }
        Server::start_at(dir, &envs, &[])
    };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut servers = [start(dirs[0].path(), 0), start(dirs[1].path(), 0)];
    let addrs = Arc::new(parking_lot::Mutex::new([
        servers[0].addr.clone(),
        servers[1].addr.clone(),
    ]));
    let token = servers[0].token("rotating");
    let stop = Arc::new(AtomicBool::new(false));

    // Uploads go on all the time, each to whichever instance is up, and each job is read back.
    let uploader = tokio::spawn({
        let (addrs, stop, token) = (addrs.clone(), stop.clone(), token.clone());
        async move {
            let http = reqwest::Client::new();
            let mut outcomes: Vec<Value> = Vec::new();
            let mut turn = 0usize;
            while !stop.load(Ordering::SeqCst) {
                turn += 1;
                let addr = addrs.lock()[turn % 2].clone();
                let sent = http
                    .post(format!("{addr}/v1/documents"))
                    .bearer_auth(&token)
                    .body(text_pdf(&["Prescription", "Amoxicillin 500 mg"]))
                    .send()
                    .await;
                let job: Value = match sent {
                    Ok(r) if r.status() == StatusCode::ACCEPTED => r.json().await.unwrap(),
                    // An instance restarting: try the other.
                    _ => continue,
                };
                let id = job["id"].as_str().unwrap().to_owned();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let addr = addrs.lock()[(turn + 1) % 2].clone();
                    let seen = http
                        .get(format!("{addr}/v1/jobs/{id}"))
                        .bearer_auth(&token)
                        .send()
                        .await;
                    if let Ok(r) = seen {
                        let status = r.status();
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        assert_eq!(status, StatusCode::OK, "{body}");
                        if body["status"] == "succeeded" || body["status"] == "failed" {
                            outcomes.push(body);
                            break;
                        }
                    }
                    assert!(std::time::Instant::now() < deadline, "job {id} did not end");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            outcomes
        }
    });

    for phase in 1..phases.len() {
        if phase == 3 {
            // Every data key the old master key wrapped is gone after TTL + sweep interval.
            tokio::time::sleep(Duration::from_secs(14)).await;
        }
        for i in 0..2 {
            servers[i].terminate();
            servers[i] = start(dirs[i].path(), phase);
            addrs.lock()[i] = servers[i].addr.clone();
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = uploader.await.unwrap();
    assert!(outcomes.len() >= 10, "only {} jobs", outcomes.len());
    for job in &outcomes {
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let db = medrelay::db::Db::connect(&url).await.unwrap();
    assert!(db.purges().await.unwrap().is_empty(), "nobody is purged");
    db.close().await;
    drop(servers);
    drop_postgres(&name).await;
}
