//! The real `medrelay` binary, as an operator and the external checks run it: `serve` with
//! embedded defaults, configuration by environment, file and flags, `token`, `process`,
//! `purge-user`, `openapi`, SIGTERM, and memory while a large upload streams in.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::{
    ContentFilter, corpus_dir, corpus_file, heif_enc, png, record_jpeg, text_pdf, text_pdf_encoded,
};
use crate::harness::{eventually, walk};
use crate::server::{BIN, Server, wait_terminal};

fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    walk(dir)
}

#[tokio::test]
async fn serve_on_embedded_defaults_runs_the_whole_lifecycle_and_forgets() {
    let mut server = Server::start(&[]);
    let http = reqwest::Client::new();
    let alice = server.token("alice");
    let bob = server.token("bob");
    let secret = server.data().join("jwt.secret");
    let mode = std::fs::metadata(&secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    let job: Value = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&alice)
        .header("content-type", "application/pdf")
        .body(corpus_file("006-pdflatex-outline--pdflatex-outline.pdf"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let r = http
        .get(format!("{}/v1/jobs/{id}", server.addr))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let done = wait_terminal(&http, &server.addr, &alice, id).await;
    assert_eq!(done["result"]["document"]["page_count"], 4);
    assert!(
        server.data().join("medrelay.db").exists(),
        "SQLite lives in the data dir"
    );

    let r = http
        .delete(format!("{}/v1/jobs/{id}", server.addr))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let objects = server.data().join("objects");
    assert!(objects.is_dir());
    assert!(
        files_below(&objects).is_empty(),
        "{:?}",
        files_below(&objects)
    );

    let status = server.terminate();
    assert!(status.success(), "a clean exit after SIGTERM: {status:?}");
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish() {
    let mut server = Server::start(&[("MEDRELAY_ROLES", "api,sweeper")]);
    let token = server.token("slow-network");
    let addr = server.addr.clone();
    let pdf = corpus_file("011-google-doc-document--google-doc-document.pdf");
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let chunks: Vec<Vec<u8>> = pdf.chunks(8 * 1024).map(<[u8]>::to_vec).collect();
    let body = futures::stream::unfold(
        (chunks.into_iter(), Some(started_tx)),
        |(mut it, mut tx)| async move {
            let chunk = it.next()?;
            if let Some(tx) = tx.take() {
                let _ = tx.send(());
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            Some((Ok::<_, std::io::Error>(chunk), (it, tx)))
        },
    );
    let upload = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{addr}/v1/documents"))
            .bearer_auth(token)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
    });
    started_rx.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server)
    });
    let response = upload
        .await
        .unwrap()
        .expect("the in-flight upload is answered");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let (status, _server) = status.await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_30_mb_upload_streams_without_holding_the_file_in_memory() {
    // API only, so that no worker reads the document while memory is measured.
    let server = Server::start(&[("MEDRELAY_ROLES", "api")]);
    let token = server.token("big-scan");
    let http = reqwest::Client::new();
    // Warm up allocator and connection pools with a small upload first.
    let warm = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .body(png(16, 16))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), StatusCode::ACCEPTED);
    let (_, before_rss) = server.memory_kib();

    let size = 30 * 1024 * 1024;
    let mut header = b"%PDF-1.7\n".to_vec();
    header.resize(64 * 1024, b' ');
    let chunk = vec![b'x'; 64 * 1024];
    let chunks = std::iter::once(header).chain(std::iter::repeat_n(chunk, size / (64 * 1024) - 1));
    let body =
        reqwest::Body::wrap_stream(futures::stream::iter(chunks.map(Ok::<_, std::io::Error>)));
    let response = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .header("content-length", size.to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["size_bytes"], size);
    let (peak, _) = server.memory_kib();
    let grew_mib = (peak.saturating_sub(before_rss)) as f64 / 1024.0;
    eprintln!(
        "peak RSS {:.1} MiB, grew {grew_mib:.1} MiB while receiving 30 MiB",
        peak as f64 / 1024.0
    );
    assert!(
        grew_mib < 10.0,
        "peak RSS grew by {grew_mib:.1} MiB for a 30 MiB upload"
    );
}

#[test]
fn process_prints_the_result_of_one_file_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pdf = corpus_dir().join("009-pdflatex-geotopo--GeoTopo-komprimiert.pdf");
    let out = Command::new(BIN)
        .args(["process"])
        .arg(&pdf)
        .current_dir(dir.path())
        .env("MEDRELAY_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["document"]["page_count"], 117,
        "the 100-page limit is Claude's, not ours"
    );
    assert!(result["text"].as_str().unwrap().len() > 10_000);
    assert!(!dir.path().join("data").exists(), "process stores nothing");

    let encrypted =
        corpus_dir().join("005-libreoffice-writer-password--libreoffice-writer-password.pdf");
    let out = Command::new(BIN)
        .args(["process"])
        .arg(&encrypted)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("password") && err.contains("document-encrypted"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = Command::new(BIN)
        .args(["process", "/bin/sh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported"));
}

#[tokio::test]
async fn serve_says_once_at_start_that_heic_is_off_and_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let photo = dir.path().join("IMG_0001.HEIC");
    std::fs::write(&photo, heif_enc(&[&record_jpeg(64, 48, None)], &[])).unwrap();
    let log_str = log.to_str().unwrap().to_owned();
    let mut server = Server::start(&[("MEDRELAY_HEIC", "false"), ("TEST_STDERR_FILE", &log_str)]);
    let token = server.token("iphone");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .body(std::fs::read(&photo).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(server.terminate().success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches("HEIC photos are off").count(), 1, "{logged}");
    assert!(logged.contains("MEDRELAY_HEIC=true"), "{logged}");

    // `process` converts it where HEIC is on (the default), and says why not where it is off.
    let out = Command::new(BIN)
        .arg("process")
        .arg(&photo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["document"]["media_type"], "image/heic");
    assert_eq!(
        (
            &result["document"]["pixel_width"],
            &result["document"]["pixel_height"]
        ),
        (&Value::from(64), &Value::from(48))
    );
    let out = Command::new(BIN)
        .arg("process")
        .arg(&photo)
        .env("MEDRELAY_HEIC", "false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MEDRELAY_HEIC"));
}

#[test]
fn openapi_command_prints_the_committed_document() {
    let out = Command::new(BIN).arg("openapi").output().unwrap();
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(&committed_path).unwrap_or_default())
            .unwrap_or(Value::Null);
    assert_eq!(
        printed, committed,
        "docs/openapi.json is out of date: run `cargo run -- openapi > docs/openapi.json`"
    );
    assert!(printed["paths"]["/v1/documents"]["post"].is_object());
    assert!(printed["components"]["schemas"]["Job"].is_object());
}

#[tokio::test]
async fn configuration_comes_from_a_file_the_environment_and_flags_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("medrelay.toml");
    std::fs::write(
        &config,
        "max_upload_bytes = 1000\nworkers = 2\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    // The file says 1000 bytes; the environment says 2000; the listen flag beats both.
    let server = Server::start_in(
        dir,
        &[
            ("MEDRELAY_MAX_UPLOAD_BYTES", "2000"),
            ("MEDRELAY_TEMP_TTL", "5m"),
        ],
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let token = server.token("config");
    let http = reqwest::Client::new();
    let mut body = b"%PDF-1.4\n".to_vec();
    body.resize(1500, b' ');
    let r = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "1500 bytes pass the environment's 2000"
    );
    let job: Value = r.json().await.unwrap();
    let created = time::OffsetDateTime::parse(
        job["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        job["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires - created).whole_seconds(), 300);
    body.resize(2500, b' ');
    let r = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A bad value is refused at start with a message naming it.
    let out = Command::new(BIN)
        .arg("serve")
        .env("MEDRELAY_LEASE", "soon")
        .env("MEDRELAY_DATA_DIR", server.data())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("lease") && err.contains("soon"),
        "{err}"
    );

    // An identity provider without the issuer and audience to check: refused, saying why.
    let missing: [(Option<&str>, Option<&str>); 3] = [
        (None, None),
        (Some("https://id.example/"), None),
        (None, Some("medrelay")),
    ];
    for (issuer, audience) in missing {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env(
                "MEDRELAY_JWKS_URL",
                "https://id.example/.well-known/jwks.json",
            )
            .env("MEDRELAY_DATA_DIR", server.data());
        if let Some(issuer) = issuer {
            command.env("MEDRELAY_JWT_ISSUER", issuer);
        }
        if let Some(audience) = audience {
            command.env("MEDRELAY_JWT_AUDIENCE", audience);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("MEDRELAY_JWT_ISSUER") && err.contains("MEDRELAY_JWT_AUDIENCE"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn purge_user_deletes_every_byte_of_one_user() {
    let mut server = Server::start(&[("MEDRELAY_ROLES", "api")]);
    let http = reqwest::Client::new();
    let gone = server.token("gone");
    let kept = server.token("kept");
    for token in [&gone, &gone, &kept] {
        let r = http
            .post(format!("{}/v1/documents", server.addr))
            .bearer_auth(token)
            .body(png(8, 8))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let objects = server.data().join("objects");
    let count = |dir: &Path| files_below(dir).into_iter().filter(|p| p.is_file()).count();
    assert_eq!(count(&objects), 3);
    let out = Command::new(BIN)
        .args(["purge-user", "gone"])
        .env("MEDRELAY_DATA_DIR", server.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 2 jobs"));
    assert_eq!(count(&objects), 1);
    let list = server.list_jobs(&gone).await;
    assert!(list.is_empty());
    let list = server.list_jobs(&kept).await;
    assert_eq!(list.len(), 1);
    assert!(server.terminate().success());
}

#[tokio::test]
async fn debug_logs_carry_no_patient_content() {
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("stderr.log");
    let log_str = log.to_str().unwrap().to_owned();
    let mut server = Server::start(&[("RUST_LOG", "debug"), ("TEST_STDERR_FILE", &log_str)]);
    let token = server.token("canary-user-4471@example.org");
    let http = reqwest::Client::new();
    let text_marker = "CANARYTEXT9902";
    let file_marker = "canary-file-name-5521.pdf";
    let pdf = text_pdf(&["Discharge summary", text_marker, "Seen on 2026-10-02"]);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(pdf)
            .file_name(file_marker)
            .mime_str("application/pdf")
            .unwrap(),
    );
    let job: Value = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let done = wait_terminal(&http, &server.addr, &token, id).await;
    // A PDF that the PDF library warns about (its trailer's /Size is wrong, its ASCII85 stream
    // lacks its end marker): its warnings, which can quote the document, stay out of the log.
    let mut warned = text_pdf_encoded(
        &["Warned about", text_marker],
        ContentFilter::Ascii85WithoutEnd,
    );
    let size = warned
        .windows(6)
        .rposition(|w| w == b"/Size ")
        .expect("a trailer");
    warned.insert(size + 6, b'9');
    let warned = server.upload(&token, warned).await;
    let warned_done =
        wait_terminal(&http, &server.addr, &token, warned["id"].as_str().unwrap()).await;
    assert_eq!(warned_done["status"], "succeeded", "{warned_done}");
    assert!(
        done["result"]["text"]
            .as_str()
            .unwrap()
            .contains(text_marker),
        "the app gets the text"
    );
    // Follow the events and list the jobs too: every route that carries the result.
    let events = http
        .get(format!("{}/v1/jobs/{id}/events", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(events.contains(text_marker));
    http.get(format!("{}/v1/jobs", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    // A refused upload with a canary name.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"\x7fELF-canary".to_vec()).file_name(file_marker),
    );
    http.post(format!("{}/v1/documents", server.addr))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    http.delete(format!("{}/v1/jobs/{id}", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(server.terminate().success());

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("DEBUG") || logged.contains("debug"),
        "debug logging was on"
    );
    assert!(logged.contains(id), "logs carry ids");
    assert!(!logged.contains("HEIC photos are off"), "on by default");
    for canary in [
        text_marker,
        file_marker,
        "lopdf",
        "pdf_extract",
        "Size entry",
        "ASCII85",
        "canary-user-4471",
        "Discharge summary",
        "%PDF-",
        token.as_str(),
    ] {
        assert!(!logged.contains(canary), "the log contains {canary:?}");
    }
}

fn claude_env(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MEDRELAY_PROCESSOR", "anthropic".into()),
        ("ANTHROPIC_BASE_URL", base.to_owned()),
        ("ANTHROPIC_API_KEY", "sk-ant-test".into()),
        ("MEDRELAY_LEASE", "2s".into()),
        ("MEDRELAY_RETRY_DELAYS", "200ms,200ms,200ms".into()),
    ]
}

fn env_refs<'a>(envs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    envs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn upload_and_wait_for_the_call(server: &Server, mock: &Mock, token: &str) -> String {
    let http = reqwest::Client::new();
    let job: Value = http
        .post(format!("{}/v1/documents", server.addr))
        .bearer_auth(token)
        .body(corpus_file("001-trivial--minimal-document.pdf"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "a call to the provider",
        || async {
            (!mock.calls().is_empty())
                .then_some(())
                .ok_or("no call".to_owned())
        },
    )
    .await;
    job["id"].as_str().unwrap().to_owned()
}

// The mock provider runs on this runtime: keep a thread free while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_sigkill_mid_processing_without_losing_or_doubling_an_attempt() {
    let mut slow = Reply::ok(extraction("never delivered"));
    slow.delay = Duration::from_secs(60);
    let (mock, base) =
        Mock::start(vec![slow], Some(Reply::ok(extraction("after the crash")))).await;
    let dir = tempfile::tempdir().unwrap();
    let envs = claude_env(&base);
    let mut server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let token = server.token("crash-user");
    let id = upload_and_wait_for_the_call(&server, &mock, &token).await;
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();

    let server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let http = reqwest::Client::new();
    let done = wait_terminal(&http, &server.addr, &token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 2,
        "the killed attempt counts once, the rescue once"
    );
    assert_eq!(done["result"]["text"], "after the crash");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mock.calls().len(), 2, "no extra call, no second delivery");
    let objects = server.data().join("objects");
    assert!(
        files_below(&objects).is_empty(),
        "the document is gone: {:?}",
        files_below(&objects)
    );
}

// The mock provider runs on this runtime: keep a thread free while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_a_job_that_cannot_finish_in_the_grace_period() {
    let mut slow = Reply::ok(extraction("too late"));
    slow.delay = Duration::from_secs(60);
    let (mock, base) = Mock::start(vec![slow], Some(Reply::ok(extraction("taken over")))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut envs = claude_env(&base);
    envs.push(("MEDRELAY_SHUTDOWN_GRACE", "300ms".into()));
    envs.push(("MEDRELAY_LEASE", "1m".into()));
    let mut server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let token = server.token("shutdown-user");
    let id = upload_and_wait_for_the_call(&server, &mock, &token).await;
    let stopped = Instant::now();
    assert!(server.terminate().success());
    assert!(stopped.elapsed() < Duration::from_secs(10));

    // The lease is one minute, but it was released: the next instance takes the job at once.
    let server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let done = wait_terminal(&http, &server.addr, &token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not held until the lease ran out"
    );
    assert_eq!(
        done["attempts"], 1,
        "a graceful hand-back does not use up an attempt"
    );
    assert_eq!(done["result"]["text"], "taken over");
}

// The mock provider runs on this runtime: keep a thread free while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_job_in_flight_finish_within_the_grace_period() {
    let mut slowish = Reply::ok(extraction("finished during shutdown"));
    slowish.delay = Duration::from_millis(1500);
    let (mock, base) = Mock::start(vec![slowish], None).await;
    let dir = tempfile::tempdir().unwrap();
    let envs = claude_env(&base);
    let mut server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let token = server.token("patient-user");
    let id = upload_and_wait_for_the_call(&server, &mock, &token).await;
    assert!(server.terminate().success());
    let mut api_only = envs.clone();
    api_only.push(("MEDRELAY_ROLES", "api".into()));
    let server = Server::start_at(dir.path(), &env_refs(&api_only), &[]);
    let http = reqwest::Client::new();
    let job: Value = http
        .get(format!("{}/v1/jobs/{id}", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        job["status"], "succeeded",
        "finished before the old process exited: {job}"
    );
    assert_eq!(job["attempts"], 1);
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_nothing_outlives_the_ttl() {
    let mut slow = Reply::ok(extraction("never"));
    slow.delay = Duration::from_secs(120);
    let (mock, base) = Mock::start(vec![], Some(slow)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut envs = claude_env(&base);
    envs.push(("MEDRELAY_TEMP_TTL", "3s".into()));
    envs.push(("MEDRELAY_SWEEP_INTERVAL", "300ms".into()));
    envs.push(("MEDRELAY_LEASE", "1m".into()));
    let mut server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let token = server.token("crash-ttl");
    let id = upload_and_wait_for_the_call(&server, &mock, &token).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let objects = dir.path().join("data/objects");
    assert!(
        !files_below(&objects).is_empty(),
        "the document is there at the crash"
    );

    let server = Server::start_at(dir.path(), &env_refs(&envs), &[]);
    let http = reqwest::Client::new();
    let started = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the job gone (it must not outlive its TTL after a crash)",
        || async {
            let r = http
                .get(format!("{}/v1/jobs/{id}", server.addr))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            (r.status() == StatusCode::GONE)
                .then_some(())
                .ok_or(r.status().to_string())
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    eventually(Duration::from_secs(5), "nothing left on disk", || async {
        let left = files_below(&objects);
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
}

/// A shared deployment (PostgreSQL or S3) makes up no key: `serve` refuses to start without a
/// master key and a token configuration, says how to make a key, and starts with the line
/// `medrelay keygen` printed. Development (SQLite and a folder) still generates them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_deployment_refuses_to_make_up_keys() {
    let (url, name) = crate::harness::fresh_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let keygen = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(keygen.status.success());
    let line = String::from_utf8(keygen.stdout).unwrap().trim().to_owned();
    let (kid, key) = line.split_once(':').expect("kid:base64");
    assert!(kid.starts_with('k') && key.len() == 44, "{line}");
    let again = Command::new(BIN).arg("keygen").output().unwrap();
    assert_ne!(String::from_utf8(again.stdout).unwrap().trim(), line);

    let serve = |envs: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env("MEDRELAY_LISTEN", "127.0.0.1:0")
            .env("MEDRELAY_DATA_DIR", dir.path().join("data"))
            .env("MEDRELAY_DATABASE_URL", &url)
            .env_remove("MEDRELAY_MASTER_KEY")
            .env_remove("MEDRELAY_JWT_SECRET");
        for (k, v) in envs {
            command.env(k, v);
        }
        command
    };
    for (envs, names) in [
        (vec![], "MEDRELAY_MASTER_KEY"),
        (vec![("MEDRELAY_JWT_SECRET", key)], "MEDRELAY_MASTER_KEY"),
        (
            vec![("MEDRELAY_MASTER_KEY", line.as_str())],
            "MEDRELAY_JWT_SECRET",
        ),
    ] {
        let out = serve(&envs).output().unwrap();
        assert!(!out.status.success(), "started without {names}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names) && err.contains("keygen"), "{err}");
    }
    assert!(
        !dir.path().join("data/master.key").exists()
            && !dir.path().join("data/jwt.secret").exists(),
        "nothing was generated"
    );
    // A key an earlier version generated into the data dir is not taken either: every
    // instance would have its own.
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/master.key"), format!("{key}\n")).unwrap();
    let out = serve(&[("MEDRELAY_JWT_SECRET", key)]).output().unwrap();
    assert!(!out.status.success(), "started on a data-dir key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MEDRELAY_MASTER_KEY"), "{err}");
    // With both, it starts.
    let mut child = serve(&[("MEDRELAY_MASTER_KEY", &line), ("MEDRELAY_JWT_SECRET", key)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("listening on "), "{first}");
    child.kill().unwrap();
    child.wait().unwrap();
    crate::harness::drop_postgres(&name).await;
}
