//! Every temporary byte is encrypted: on disk, in the bucket, in the database, before,
//! during and after processing; a ciphertext moved to another job fails closed; a rotated
//! master key keeps jobs in flight readable.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use medrelay::db::Db;
use medrelay::ids::JobId;
use medrelay::store::Store;

use crate::fixtures::text_pdf;
use crate::harness::{Backend, TestApp, eventually, walk};
use crate::scripted::{Scripted, Step};

on_every_backend!(
    no_plaintext_reaches_the_disk_the_bucket_or_the_database,
    nothing_is_in_plaintext_while_a_slow_job_is_processing,
    a_ciphertext_moved_to_another_job_fails_closed,
);

const MARKER: &str = "CANARY-7731-HEMOGLOBIN";

async fn nothing_is_in_plaintext_while_a_slow_job_is_processing(backend: Backend) {
    let mut gate = None;
    let app = TestApp::spawn_custom(
        backend,
        |_| {},
        |state| gate = Some(Scripted::new(Step::Gated).install(state)),
    )
    .await;
    let gate = gate.unwrap();
    let token = app.token("slow");
    let job = app
        .upload_ok(&token, text_pdf(&["Lab Report", MARKER]), "application/pdf")
        .await;
    let id = job["id"].as_str().unwrap();
    app.wait_status(&token, id, "processing").await;
    let stored = everything_stored(&app).await;
    assert!(!stored.is_empty());
    assert_no_plaintext(&stored, &[MARKER.as_bytes(), b"%PDF-", b"Lab Report"]);
    gate.add_permits(1);
    let done = app.wait_terminal(&token, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_no_plaintext(
        &everything_stored(&app).await,
        &[MARKER.as_bytes(), b"%PDF-"],
    );
    app.stop().await;
}

/// Every file below the data dir and every object in the store, as raw bytes.
async fn everything_stored(app: &TestApp) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for path in walk(app.data_dir.path()) {
        if path.is_file() {
            all.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    let store = app.store();
    for (key, _) in store.list_all().await.unwrap() {
        match store.read(&key).await {
            Ok(bytes) => all.push((format!("object {key}"), bytes.to_vec())),
            // Listed, then deleted by a job that just ended: nothing is stored any more.
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => panic!("reading {key}: {e}"),
        }
    }
    if let Db::Postgres(pool, ..) = app.db() {
        let rows: Vec<(Option<Vec<u8>>,)> = sqlx::query_as("SELECT result FROM jobs")
            .fetch_all(pool)
            .await
            .unwrap();
        for (i, (result,)) in rows.into_iter().enumerate() {
            all.push((format!("postgres result {i}"), result.unwrap_or_default()));
        }
    }
    all
}

fn assert_no_plaintext(stored: &[(String, Vec<u8>)], needles: &[&[u8]]) {
    for (name, bytes) in stored {
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == *needle),
                "{name} contains {:?} in plaintext",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

async fn no_plaintext_reaches_the_disk_the_bucket_or_the_database(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("private");
    let pdf = text_pdf(&["Lab Report", MARKER, "Reference range 12 - 16"]);
    assert!(pdf.windows(5).any(|w| w == b"%PDF-"));
    let first = app.upload_ok(&token, pdf.clone(), "application/pdf").await;
    let second = app.upload_ok(&token, pdf.clone(), "application/pdf").await;

    // At rest before processing.
    let stored = everything_stored(&app).await;
    assert_no_plaintext(&stored, &[MARKER.as_bytes(), b"%PDF-", b"Lab Report"]);
    // Identical uploads leave different stored bytes.
    let store = app.store();
    let read = |id: &str| {
        let prefix = app.user_prefix("private");
        let path = Store::document_key(&prefix, &JobId::from_raw(id));
        async move { store.read(&path).await.unwrap() }
    };
    let (a, b) = (
        read(first["id"].as_str().unwrap()).await,
        read(second["id"].as_str().unwrap()).await,
    );
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b);

    // After processing: the result is kept encrypted, the document is gone.
    app.settings.roles.worker = true;
    app.restart().await;
    for job in [&first, &second] {
        let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(done["result"]["text"].as_str().unwrap().contains(MARKER));
    }
    let stored = everything_stored(&app).await;
    assert_no_plaintext(
        &stored,
        &[MARKER.as_bytes(), b"%PDF-", b"Lab Report", b"lab_report"],
    );
    app.stop().await;
}

async fn a_ciphertext_moved_to_another_job_fails_closed(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("victim");
    let a = app
        .upload_ok(&token, text_pdf(&["first document"]), "application/pdf")
        .await;
    let b = app
        .upload_ok(&token, text_pdf(&["second document"]), "application/pdf")
        .await;
    let prefix = app.user_prefix("victim");
    let store = app.store().clone();
    let path_a = Store::document_key(&prefix, &JobId::from_raw(a["id"].as_str().unwrap()));
    let path_b = Store::document_key(&prefix, &JobId::from_raw(b["id"].as_str().unwrap()));
    // B's ciphertext placed where A's was: a valid ciphertext, of another job.
    let bytes_b = store.read(&path_b).await.unwrap();
    store.put(&path_a, bytes_b).await.unwrap();

    app.settings.roles.worker = true;
    app.restart().await;
    let done_a = app.wait_terminal(&token, a["id"].as_str().unwrap()).await;
    assert_eq!(done_a["status"], "failed", "{done_a}");
    assert_eq!(done_a["error"]["code"], "processing-failed");
    assert_eq!(done_a["error"]["retryable"], true);
    assert!(
        !done_a["error"]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("integrity")
    );
    // B was untouched, but an integrity failure purges everything of its user (B may have
    // succeeded first; the purge then ends it too).
    let done_b = app
        .wait_status(&token, b["id"].as_str().unwrap(), "failed")
        .await;
    assert_eq!(done_b["error"]["code"], "processing-failed");
    assert!(done_b["result"].is_null());
    app.assert_store_empties().await;
    app.stop().await;
}

async fn kek_of(app: &TestApp, id: &str) -> String {
    let Db::Sqlite(pool, ..) = app.db() else {
        unreachable!()
    };
    sqlx::query_scalar("SELECT document_kek FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_master_key_keeps_jobs_in_flight_readable() {
    let old = format!("old:{}", STANDARD.encode([11u8; 32]));
    let new = format!("new:{}", STANDARD.encode([12u8; 32]));
    let mut app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.roles.worker = false;
        s.master_key = Some(medrelay::config::Secret::new(old.clone()));
        // A handed-back job is due again after the first retry delay.
        s.retry_delays = medrelay::config::RetryDelays(vec![Duration::from_millis(200); 3]);
    })
    .await;
    let token = app.token("rotating");
    let before = app
        .upload_ok(&token, text_pdf(&["before rotation"]), "application/pdf")
        .await;
    let before_id = before["id"].as_str().unwrap().to_owned();
    assert_eq!(kek_of(&app, &before_id).await, "old");

    // Rotate: the new key is listed last and encrypts; the old one still decrypts.
    app.settings.master_key = Some(medrelay::config::Secret::new(format!("{old},{new}")));
    app.settings.roles.worker = true;
    app.restart().await;
    let after = app
        .upload_ok(&token, text_pdf(&["after rotation"]), "application/pdf")
        .await;
    let after_id = after["id"].as_str().unwrap().to_owned();
    let done = app.wait_terminal(&token, &before_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["result"]["text"]
            .as_str()
            .unwrap()
            .contains("before rotation")
    );
    let done = app.wait_terminal(&token, &after_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // A queued job whose master key is not configured here waits for it (a configuration
    // problem, not tampering): handed back with its attempts untouched, never failed, nobody
    // purged; once the key is back, it is read.
    app.settings.roles.worker = false;
    app.restart().await;
    let orphaned = app
        .upload_ok(&token, text_pdf(&["orphaned"]), "application/pdf")
        .await;
    assert_eq!(kek_of(&app, orphaned["id"].as_str().unwrap()).await, "new");
    app.settings.master_key = Some(medrelay::config::Secret::new(format!(
        "other:{}",
        STANDARD.encode([13u8; 32])
    )));
    app.settings.roles.worker = true;
    app.restart().await;
    let orphaned_id = orphaned["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "a handed-back attempt", || async {
        let text = app.state().metrics.render();
        text.lines()
            .any(|l| l.starts_with("medrelay_master_key_missing_total{kid=\"new\"}"))
            .then_some(())
            .ok_or("not tried yet".to_owned())
    })
    .await;
    // The metric is counted before the attempt is handed back: wait for the hand-back.
    let row = eventually(
        Duration::from_secs(10),
        "the attempt handed back",
        || async {
            let row = app.row(orphaned_id).await.expect("the row");
            (row.status == medrelay::model::JobStatus::Queued)
                .then_some(row)
                .ok_or("still processing".to_owned())
        },
    )
    .await;
    assert_eq!(row.attempts, 0, "the attempt is not counted");
    assert!(app.purges().await.is_empty(), "nobody is purged");
    app.settings.master_key = Some(medrelay::config::Secret::new(format!("{old},{new}")));
    app.restart().await;
    let done = app.wait_terminal(&token, orphaned_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    app.stop().await;
}
