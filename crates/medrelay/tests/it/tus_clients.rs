//! Resumable uploads with the real tus clients a phone team would use: `tus-js-client` (run by
//! node) and `tuspy`, each driven by a small script (`tests/tus/client.{mjs,py}`) that
//! `scripts/test` installs. On SQLite with the local folder and on PostgreSQL with S3: a 20 MiB
//! upload in 1 MiB chunks; one cut mid-chunk and resumed; one resumed after the server was
//! SIGKILLed and restarted; a termination; an expired upload. Every job that results succeeds
//! and its document is the bytes sent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures::heavy_pdf;
use crate::harness::{Backend, TestApp, eventually, fresh_bucket, fresh_postgres};
use crate::server::{Server, wait_terminal};
use crate::tus::{Received, spawn};

const MIB: usize = 1024 * 1024;

/// One of the two real clients.
#[derive(Clone, Copy, Debug)]
enum Client {
    TusJs,
    TusPy,
}

impl Client {
    /// Runs the client's driver with `args`; returns the JSON line it prints.
    async fn run(self, args: &[&str]) -> Value {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tus");
        let missing = "the real tus clients are not installed: run scripts/test (which installs \
                       tuspy and tus-js-client under target/ and exports MEDRELAY_TEST_PYTHON and \
                       MEDRELAY_TUS_JS), or `source scripts/services.sh` in this shell first";
        let mut command = match self {
            Client::TusJs => {
                let modules = std::env::var("MEDRELAY_TUS_JS").expect(missing);
                assert!(
                    Path::new(&modules).join("tus-js-client").is_dir(),
                    "{missing}"
                );
                let mut c = tokio::process::Command::new("node");
                c.arg(dir.join("client.mjs"))
                    .env("MEDRELAY_TUS_JS", modules);
                c
            }
            Client::TusPy => {
                let python = std::env::var("MEDRELAY_TEST_PYTHON").expect(missing);
                let mut c = tokio::process::Command::new(python);
                c.arg(dir.join("client.py"));
                c
            }
        };
        let out = command
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{self:?} could not start ({e}): {missing}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{self:?} driver failed: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{self:?} printed {stdout:?} ({e}); stderr: {stderr}"))
    }
}

/// A file holding `bytes`, for a client to upload.
fn file_of(dir: &Path, bytes: &[u8]) -> PathBuf {
    let path = dir.join("document.pdf");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn ok(result: &Value) -> &Value {
    assert_eq!(result["ok"], true, "{result}");
    result
}

/// The job id of a finished client run (`Medrelay-Job: /v1/jobs/{id}`), which is its
/// upload's id.
fn job_id(result: &Value) -> String {
    let job = result["job"]
        .as_str()
        .unwrap_or_else(|| panic!("no job in {result}"));
    let id = job
        .strip_prefix("/v1/jobs/")
        .expect("a job path")
        .to_owned();
    let url = result["url"].as_str().unwrap();
    assert!(
        url.ends_with(&format!("/v1/uploads/{id}")),
        "{url} vs {job}"
    );
    id
}

/// A TCP proxy in front of a server that counts what the client sends and, once, cuts every
/// connection when that count passes a mark (a phone losing its network mid-request).
struct Proxy {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let (s, c) = (sent.clone(), cut_at.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (sent, cut_at) = (s.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let cut = Arc::new(AtomicBool::new(false));
                    let cut_up = cut.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let before = sent.fetch_add(n as u64, Ordering::SeqCst);
                            let mark = cut_at.load(Ordering::SeqCst);
                            if before + n as u64 > mark {
                                // Forward up to the mark, then drop the connection (once).
                                let keep = mark.saturating_sub(before) as usize;
                                let _ = server_write.write_all(&buf[..keep]).await;
                                cut_at.store(u64::MAX, Ordering::SeqCst);
                                cut_up.store(true, Ordering::SeqCst);
                                break;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if cut.load(Ordering::SeqCst) {
                                break;
                            }
                            match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if client_write.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    };
                    // Either side ending ends the connection: a cut closes it for the client.
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Proxy { addr, sent, cut_at }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/uploads", self.addr)
    }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

async fn head(app: &TestApp, token: &str, url: &str) -> reqwest::Response {
    app.http
        .head(url)
        .bearer_auth(token)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap()
}

fn upload_offset(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Upload-Offset in {:?}", r.headers()))
}

macro_rules! with_both_clients {
    ($($name:ident),* $(,)?) => {
        mod sqlite_folder_tus_js {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::SqliteFolder, super::Client::TusJs).await } )*
        }
        mod sqlite_folder_tuspy {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::SqliteFolder, super::Client::TusPy).await } )*
        }
        mod postgres_s3_tus_js {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::PostgresS3, super::Client::TusJs).await } )*
        }
        mod postgres_s3_tuspy {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(super::Backend::PostgresS3, super::Client::TusPy).await } )*
        }
    };
}

with_both_clients!(
    twenty_mib_in_one_mib_chunks_then_cut_mid_chunk_and_resumed,
    resumed_after_the_server_was_sigkilled_and_restarted,
    termination_and_expiry,
);

async fn twenty_mib_in_one_mib_chunks_then_cut_mid_chunk_and_resumed(
    backend: Backend,
    client: Client,
) {
    let (app, received) = spawn(backend).await;
    let token = app.token("commuter");
    let dir = tempfile::tempdir().unwrap();
    let pdf = heavy_pdf(5, 4 * MIB);
    assert!(pdf.len() > 20 * MIB);
    let file = file_of(dir.path(), &pdf);
    let file = file.to_str().unwrap();
    let endpoint = app.url("/v1/uploads");
    let chunk = MIB.to_string();

    // 20 MiB in 1 MiB chunks, with a push token on every request.
    let run = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--push-token",
            "fcm-device-1",
            "--metadata",
        ])
        .await;
    let id = job_id(ok(&run));
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["size_bytes"], pdf.len());
    assert_eq!(done["result"]["document"]["page_count"], 5);
    assert!(received.contains(&pdf), "the document is the bytes sent");

    // The network drops in the middle of the sixth chunk: the client gives up, and what arrived
    // of that chunk is kept.
    let proxy = Proxy::start(addr_of(&app.addr)).await;
    proxy
        .cut_at
        .store((5 * MIB + MIB / 2) as u64, Ordering::SeqCst);
    let cut = client
        .run(&[
            "--endpoint",
            &proxy.endpoint(),
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
        ])
        .await;
    assert_eq!(cut["ok"], false, "the connection was cut: {cut}");
    let url = cut["url"]
        .as_str()
        .expect("the upload was created")
        .to_owned();
    let kept = eventually(
        Duration::from_secs(10),
        "the cut chunk's bytes kept",
        || async {
            let offset = upload_offset(&head(&app, &token, &url).await);
            (offset > 5 * MIB as u64)
                .then_some(offset)
                .ok_or(offset.to_string())
        },
    )
    .await;
    assert!(kept < pdf.len() as u64, "{kept}");
    // The same client resumes from the server's offset and finishes.
    let before = proxy.sent.load(Ordering::SeqCst);
    let resumed = client
        .run(&[
            "--endpoint",
            &proxy.endpoint(),
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--resume-url",
            &url,
        ])
        .await;
    let id = job_id(ok(&resumed));
    assert_eq!(resumed["restarted"], false, "{resumed}");
    let resent = proxy.sent.load(Ordering::SeqCst) - before;
    assert!(
        resent < pdf.len() as u64 - kept + MIB as u64 / 4,
        "only what was missing is sent again: {resent} bytes for {} missing",
        pdf.len() as u64 - kept
    );
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(received.count(&pdf), 2);
    app.assert_store_empties().await;
}

async fn termination_and_expiry(backend: Backend, client: Client) {
    let mut received = None;
    let app = TestApp::spawn_custom(
        backend,
        |s| {
            s.temp_ttl = Duration::from_secs(6);
            s.sweep_interval = Duration::from_secs(3600);
        },
        |state| received = Some(Received::install(state)),
    )
    .await;
    let received = received.unwrap();
    let token = app.token("commuter");
    let dir = tempfile::tempdir().unwrap();
    let pdf = heavy_pdf(2, 2 * MIB);
    let file = file_of(dir.path(), &pdf);
    let file = file.to_str().unwrap();
    let endpoint = app.url("/v1/uploads");
    let chunk = MIB.to_string();
    let stop = MIB.to_string();

    // Termination: the client's DELETE; every byte of the upload goes.
    let run = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--stop-after",
            &stop,
            "--terminate",
        ])
        .await;
    assert_eq!(ok(&run)["terminated"], true, "{run}");
    let url = run["url"].as_str().unwrap();
    assert_eq!(
        head(&app, &token, url).await.status(),
        StatusCode::NOT_FOUND
    );
    app.assert_store_empties().await;

    // Expiry: an upload left for longer than the TTL is gone; the client that comes back
    // starts a new upload, which succeeds.
    let run = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--stop-after",
            &stop,
        ])
        .await;
    let old = ok(&run)["url"].as_str().unwrap().to_owned();
    assert!(upload_offset(&head(&app, &token, &old).await) >= MIB as u64);
    tokio::time::sleep(Duration::from_millis(6100)).await;
    assert_eq!(head(&app, &token, &old).await.status(), StatusCode::GONE);
    medrelay::sweeper::sweep(app.state()).await.unwrap();
    assert_eq!(
        head(&app, &token, &old).await.status(),
        StatusCode::NOT_FOUND
    );
    app.assert_store_empties().await;
    let again = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--resume-url",
            &old,
        ])
        .await;
    assert_eq!(ok(&again)["restarted"], true, "{again}");
    let id = job_id(&again);
    assert!(!old.ends_with(&id), "a new upload");
    // Quick, before this short TTL ends the job too.
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(received.contains(&pdf));
}

async fn resumed_after_the_server_was_sigkilled_and_restarted(backend: Backend, client: Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut envs: Vec<(&str, String)> = Vec::new();
    let mut pg = None;
    if backend.postgres() {
        let (url, name) = fresh_postgres().await;
        envs.push(("MEDRELAY_DATABASE_URL", url));
        pg = Some(name);
    }
    if backend.s3() {
        envs.push((
            "MEDRELAY_STORAGE_URL",
            format!("s3://{}", fresh_bucket().await),
        ));
    }
    let env_refs = |extra: &[(&'static str, String)]| -> Vec<(&str, String)> {
        envs.iter().chain(extra).cloned().collect()
    };
    let refs = |v: &[(&str, String)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, s)| ((*k).to_owned(), s.clone()))
            .collect()
    };
    let start = |extra: Vec<(&'static str, String)>| {
        let all = refs(&env_refs(&extra));
        let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::start_at(dir.path(), &pairs, &[])
    };
    let mut server = start(Vec::new());
    let token = server.token("commuter");
    let files = tempfile::tempdir().unwrap();
    let pdf = heavy_pdf(3, 2 * MIB);
    let file = file_of(files.path(), &pdf);
    let file = file.to_str().unwrap();
    let endpoint = format!("{}/v1/uploads", server.addr);
    let chunk = MIB.to_string();
    let stop = (3 * MIB).to_string();

    let run = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--stop-after",
            &stop,
        ])
        .await;
    let url = ok(&run)["url"].as_str().unwrap().to_owned();
    assert!(run["offset"].as_u64().unwrap() >= 3 * MIB as u64, "{run}");
    // SIGKILL: no shutdown, nothing flushed; then a new process on the same port and data.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let listen = server.addr.trim_start_matches("http://").to_owned();
    let server = start(vec![("MEDRELAY_LISTEN", listen)]);
    let resumed = client
        .run(&[
            "--endpoint",
            &endpoint,
            "--token",
            &token,
            "--file",
            file,
            "--chunk-size",
            &chunk,
            "--resume-url",
            &url,
        ])
        .await;
    let id = job_id(ok(&resumed));
    assert_eq!(
        resumed["restarted"], false,
        "resumed, not started again: {resumed}"
    );
    assert!(url.ends_with(&id));
    let http = reqwest::Client::new();
    let done = wait_terminal(&http, &server.addr, &token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["size_bytes"], pdf.len());
    assert_eq!(done["result"]["document"]["page_count"], 3);
    drop(server);
    if let Some(name) = pg {
        crate::harness::drop_postgres(&name).await;
    }
}
