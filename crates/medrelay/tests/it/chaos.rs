//! The chaos test: three `medrelay serve` processes on one PostgreSQL database and one S3
//! bucket (two `api,worker`, one `worker,sweeper`), a Claude mock answering with a mix of 200,
//! 429 with `retry-after`, 529, 500 and slow answers, users uploading photos, while instances
//! are SIGKILLed and SIGTERMed, S3 becomes unreachable for 10 s, database connections are
//! killed, and jobs and one user's data are deleted in flight.
//!
//! Every answer every client saw is recorded, then checked: every accepted upload ended once,
//! visibly to its owner, or was deleted by its owner; at most 4 provider calls per job; none
//! after its deletion was answered; nobody purged but through the poison-pill guard that the
//! kills themselves trigger; after TTL + one sweep the bucket is empty and no key material is
//! left; no object ever outlived TTL + one sweep interval. One line of figures is printed.
//!
//! `scripts/test` runs a short run (`MEDRELAY_CHAOS` unset); `scripts/chaos` the full one
//! (`MEDRELAY_CHAOS=full`: 30 users, 300 documents).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use base64::Engine;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::claude_mock::extraction;
use crate::fixtures::png;
use crate::harness::{drop_postgres, fresh_bucket, fresh_postgres, terminate_backends};
use crate::server::Server;

const TTL_SECS: u64 = 40;
const SWEEP_MS: u64 = 1000;

/// One recorded provider call: when, and which job (the photo's unique width).
#[derive(Clone, Copy, Debug)]
struct ProviderCall {
    at: Instant,
    width: u32,
}

/// A Claude stand-in answering with a seeded mix: mostly 200, some 429 (`retry-after: 1`), 529,
/// 500, and slow 200s. Each 200 carries the call's number, so two results for one job differ.
#[derive(Clone, Default)]
struct MixedClaude {
    calls: Arc<Mutex<Vec<ProviderCall>>>,
    count: Arc<AtomicUsize>,
}

impl MixedClaude {
    async fn start(self) -> String {
        let state = self.clone();
        let router = axum::Router::new()
            .route(
                "/v1/messages",
                axum::routing::post(move |body: Bytes| {
                    let state = state.clone();
                    async move { state.answer(&body).await }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(32 * 1024 * 1024));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    async fn answer(&self, body: &[u8]) -> axum::response::Response {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let width = jpeg_width_of(body).unwrap_or(0);
        self.calls.lock().push(ProviderCall {
            at: Instant::now(),
            width,
        });
        let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
        let roll: u32 = rng.random_range(0..100);
        let error = |status: u16, kind: &str| {
            let body = json!({"type": "error", "error": {"type": kind, "message": "chaos"}});
            (status, body)
        };
        let (status, body, retry_after, delay) = match roll {
            0..60 => (200, ok_body(n), None, 0),
            60..70 => {
                let (s, b) = error(429, "rate_limit_error");
                (s, b, Some("1"), 0)
            }
            70..80 => {
                let (s, b) = error(529, "overloaded_error");
                (s, b, None, 0)
            }
            80..90 => {
                let (s, b) = error(500, "api_error");
                (s, b, None, 0)
            }
            _ => (200, ok_body(n), None, 1500),
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut response = axum::response::Response::builder()
            .status(status)
            .header("content-type", "application/json");
        if let Some(after) = retry_after {
            response = response.header("retry-after", after);
        }
        response
            .body(axum::body::Body::from(body.to_string()))
            .unwrap()
    }
}

fn ok_body(n: usize) -> Value {
    json!({
        "id": "msg_chaos", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "record_extraction",
                     "input": extraction(&format!("answer of call {n}"))}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 10},
    })
}

/// The width in a request's JPEG (its SOF header), which names the job.
fn jpeg_width_of(body: &[u8]) -> Option<u32> {
    let request: Value = serde_json::from_slice(body).ok()?;
    let data = request["messages"][0]["content"][0]["source"]["data"].as_str()?;
    let jpeg = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    let at = jpeg
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))?;
    let width = jpeg.get(at + 7..at + 9)?;
    Some(u32::from(width[0]) << 8 | u32::from(width[1]))
}

/// A TCP proxy in front of the S3 server that can be cut off (every connection dropped, new
/// ones refused) and restored.
#[derive(Clone)]
struct CuttableProxy {
    down: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> (CuttableProxy, String) {
        let proxy = CuttableProxy {
            down: Arc::default(),
            live: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if state.down.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                state.live.lock().push(task.abort_handle());
            }
        });
        (proxy, format!("http://{addr}"))
    }

    fn cut(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for task in self.live.lock().drain(..) {
                task.abort();
            }
        }
    }
}

/// What one client saw of one upload.
#[derive(Clone, Debug, Default)]
struct Seen {
    user: usize,
    width: u32,
    id: String,
    /// The first terminal state seen, with its result or error.
    ended: Option<Value>,
    /// When its 202 arrived.
    accepted_at: Option<Instant>,
    /// When a delete of it (or of all the user's data) was answered 204.
    deleted_at: Option<Instant>,
}

/// The instances, replaced as they are killed and restarted.
struct Fleet {
    servers: Vec<Option<Server>>,
    dirs: Vec<tempfile::TempDir>,
    envs: Vec<Vec<(&'static str, String)>>,
    /// The API addresses that are up now.
    api: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    fn start(&mut self, i: usize) {
        let envs: Vec<(&str, &str)> = self.envs[i].iter().map(|(k, v)| (*k, v.as_str())).collect();
        let server = Server::start_at(self.dirs[i].path(), &envs, &[]);
        if i < 2 {
            self.api.lock().push(server.addr.clone());
        }
        self.servers[i] = Some(server);
    }

    fn stop(&mut self, i: usize, gracefully: bool) {
        if let Some(mut server) = self.servers[i].take() {
            self.api.lock().retain(|a| *a != server.addr);
            if gracefully {
                server.terminate();
            } else {
                let _ = server.child.kill();
                let _ = server.child.wait();
            }
        }
    }
}

fn any_api(api: &Mutex<Vec<String>>, turn: usize) -> Option<String> {
    let api = api.lock();
    (!api.is_empty()).then(|| api[turn % api.len()].clone())
}

/// One user's session: uploads `docs` photos, one every `pace` (retrying through any instance
/// with the same Idempotency-Key), deletes some right away, follows the others to their end.
async fn user_session(
    user: usize,
    docs: usize,
    pace: Duration,
    token: String,
    api: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop_user: Arc<AtomicBool>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // Users start at different moments, so uploads spread over the whole run.
    let mut turn_at = Instant::now() + pace.mul_f64((user % 7) as f64 / 7.0);
    for doc in 0..docs {
        tokio::time::sleep_until(turn_at.into()).await;
        turn_at += pace;
        if stop_user.load(Ordering::SeqCst) {
            return;
        }
        let width = 200 + (user * docs + doc) as u32;
        let key = format!("u{user}-d{doc}");
        let mut job = None;
        for turn in 0..200 {
            let Some(addr) = any_api(&api, turn + user) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let sent = http
                .post(format!("{addr}/v1/documents"))
                .bearer_auth(&token)
                .header("idempotency-key", &key)
                .body(png(width, 64))
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    job = Some(r.json::<Value>().await.unwrap());
                    break;
                }
                Ok(r) => {
                    let status = r.status();
                    assert!(
                        status == StatusCode::SERVICE_UNAVAILABLE
                            || status == StatusCode::TOO_MANY_REQUESTS
                            || status == StatusCode::REQUEST_TIMEOUT,
                        "an upload answered {status}: {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(job) = job else {
            // Never accepted: nothing to follow (the upload's own retries ran out).
            continue;
        };
        let id = job["id"].as_str().unwrap().to_owned();
        let index = {
            let mut seen = seen.lock();
            seen.push(Seen {
                user,
                width,
                id: id.clone(),
                accepted_at: Some(Instant::now()),
                ..Seen::default()
            });
            seen.len() - 1
        };
        if doc % 7 == 3 {
            // Deleted right away, in flight.
            for turn in 0..100 {
                let Some(addr) = any_api(&api, turn) else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let r = http
                    .delete(format!("{addr}/v1/jobs/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == StatusCode::NO_CONTENT
                {
                    seen.lock()[index].deleted_at = Some(Instant::now());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        }
        // Follow it to its end.
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(TTL_SECS) {
            // Deleted by its owner, or with all of the user's data: nothing more to follow.
            if seen.lock()[index].deleted_at.is_some() || stop_user.load(Ordering::SeqCst) {
                break;
            }
            if let Some(addr) = any_api(&api, user)
                && let Ok(r) = http
                    .get(format!("{addr}/v1/jobs/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await
            {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status == StatusCode::OK
                    && matches!(body["status"].as_str(), Some("succeeded" | "failed"))
                {
                    seen.lock()[index].ended = Some(body);
                    break;
                }
                // User 0's data is deleted while it follows a job: a 404 may arrive just
                // before the session learns of it.
                let purged_user = user == 0 && status == StatusCode::NOT_FOUND;
                if seen.lock()[index].deleted_at.is_none() && !purged_user {
                    assert!(
                        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                        "job {id} answered {status}: {body}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos() {
    let full = std::env::var("MEDRELAY_CHAOS").is_ok_and(|v| v == "full");
    let (users, docs) = if full { (30, 10) } else { (15, 6) };
    let load_for = if full { 240 } else { 50 };
    let (url, name) = fresh_postgres().await;
    let bucket = fresh_bucket().await;
    let storage = format!("s3://{bucket}/medrelay");
    let s3 = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let (proxy, proxied) = CuttableProxy::start(s3.trim_start_matches("http://").to_owned()).await;
    let claude = MixedClaude::default();
    let base = claude.clone().start().await;
    let common: Vec<(&'static str, String)> = vec![
        ("MEDRELAY_DATABASE_URL", url.clone()),
        ("MEDRELAY_STORAGE_URL", storage.clone()),
        ("AWS_ENDPOINT_URL", proxied),
        (
            "MEDRELAY_MASTER_KEY",
            format!(
                "chaos:{}",
                base64::engine::general_purpose::STANDARD.encode([5u8; 32])
            ),
        ),
        (
            "MEDRELAY_JWT_SECRET",
            "chaos-secret-of-at-least-thirty-two-bytes".into(),
        ),
        ("MEDRELAY_PROCESSOR", "anthropic".into()),
        ("ANTHROPIC_BASE_URL", base),
        ("ANTHROPIC_API_KEY", "sk-ant-test".into()),
        ("MEDRELAY_TEMP_TTL", format!("{TTL_SECS}s")),
        ("MEDRELAY_SWEEP_INTERVAL", format!("{SWEEP_MS}ms")),
        ("MEDRELAY_RETRY_DELAYS", "300ms,600ms,1s".into()),
        ("MEDRELAY_LEASE", "3s".into()),
        ("MEDRELAY_SHUTDOWN_GRACE", "2s".into()),
        ("MEDRELAY_WORKERS", "8".into()),
    ];
    let roles = ["api,worker", "api,worker", "worker,sweeper"];
    let mut fleet = Fleet {
        servers: vec![None, None, None],
        dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
        envs: roles
            .iter()
            .map(|r| {
                let mut envs = common.clone();
                envs.push(("MEDRELAY_ROLES", (*r).into()));
                envs
            })
            .collect(),
        api: Arc::default(),
    };
    for i in 0..3 {
        fleet.start(i);
    }
    let token_of = |user: usize| {
        fleet.servers[0]
            .as_ref()
            .unwrap()
            .token(&format!("user-{user}"))
    };
    let tokens: Vec<String> = (0..users).map(token_of).collect();

    // Watch the bucket: the oldest object ever seen (markers of uploads in flight included).
    let store = medrelay::store::Store::open(&storage).unwrap();
    let oldest_seen_ms = Arc::new(AtomicUsize::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (store, oldest, watching) = (store.clone(), oldest_seen_ms.clone(), watching.clone());
        async move {
            while watching.load(Ordering::SeqCst) {
                if let Ok(all) = store.list_with_times().await {
                    let now = medrelay::clock::now_millis();
                    for (_, modified) in all {
                        oldest.fetch_max((now - modified).max(0) as usize, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let stops: Vec<Arc<AtomicBool>> = (0..users).map(|_| Arc::default()).collect();
    let mut sessions = JoinSet::new();
    for (user, token) in tokens.iter().enumerate() {
        sessions.spawn(user_session(
            user,
            docs,
            Duration::from_millis(load_for * 1000 / docs as u64),
            token.clone(),
            fleet.api.clone(),
            seen.clone(),
            stops[user].clone(),
        ));
    }

    // The faults, spread over the load.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let step = Duration::from_millis(load_for * 1000 / 16);
    let (mut kills, mut terms, mut db_kills) = (0, 0, 0);
    let mut purged_user_at = None;
    for round in 0..16 {
        tokio::time::sleep(step).await;
        match round {
            4 => {
                proxy.cut(true);
                tokio::time::sleep(Duration::from_secs(10)).await;
                proxy.cut(false);
            }
            6 | 11 => {
                let i = rng.random_range(0..3);
                fleet.stop(i, true);
                fleet.start(i);
                terms += 1;
            }
            8 => {
                // One user deletes everything while jobs are in flight.
                let http = reqwest::Client::new();
                for turn in 0..50 {
                    if let Some(addr) = any_api(&fleet.api, turn) {
                        let r = http
                            .delete(format!("{addr}/v1/me/data"))
                            .bearer_auth(&tokens[0])
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT) {
                            purged_user_at = Some(Instant::now());
                            stops[0].store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            r if r % 5 == 2 => {
                db_kills += 1;
                terminate_backends(&name).await;
            }
            _ => {}
        }
        if round != 4 {
            let i = rng.random_range(0..3);
            fleet.stop(i, false);
            tokio::time::sleep(Duration::from_millis(200)).await;
            fleet.start(i);
            kills += 1;
        }
    }
    while let Some(session) = sessions.join_next().await {
        session.expect("a user's session saw something wrong");
    }
    if let Some(at) = purged_user_at {
        // Everything of the user accepted before the delete of all their data was answered.
        for s in seen
            .lock()
            .iter_mut()
            .filter(|s| s.user == 0 && s.accepted_at.is_some_and(|a| a < at))
        {
            s.deleted_at.get_or_insert(at);
        }
    }

    // The checks.
    let seen = seen.lock().clone();
    let calls = claude.calls.lock().clone();
    let mut per_job: HashMap<u32, Vec<Instant>> = HashMap::new();
    for call in &calls {
        per_job.entry(call.width).or_default().push(call.at);
    }
    let db = medrelay::db::Db::connect(&url).await.unwrap();
    // Purges: only through the poison-pill guard (a job whose attempts died twice, which the
    // kills cause), never otherwise.
    let mut poisoned = std::collections::HashSet::new();
    for purge in db.purges().await.unwrap() {
        let job = purge.job_id.as_ref().expect("a purge names its job");
        let row = db.get_job_by_id(job).await.unwrap();
        let lost = row.map_or(0, |r| r.lost_leases);
        assert!(
            lost >= 2,
            "a user was purged, not through the poison-pill guard: {purge:?}"
        );
        poisoned.insert(purge.user_prefix.clone());
    }
    let poison_purges = poisoned.len();
    let (mut succeeded, mut failed, mut deleted, mut purged) = (0, 0, 0, 0);
    for s in &seen {
        let calls = per_job.get(&s.width).map_or(0, Vec::len);
        assert!(calls <= 4, "{} provider calls for job {}", calls, s.id);
        if let Some(at) = s.deleted_at {
            let late = per_job
                .get(&s.width)
                .into_iter()
                .flatten()
                .filter(|c| **c > at + Duration::from_millis(50))
                .count();
            assert_eq!(late, 0, "a provider call for job {} after its delete", s.id);
            deleted += 1;
            continue;
        }
        let ended = s
            .ended
            .as_ref()
            .unwrap_or_else(|| panic!("job {} never ended visibly to its owner", s.id));
        match ended["status"].as_str() {
            Some("succeeded") => succeeded += 1,
            Some("failed") if ended["error"]["code"] == "processing-failed" => {
                let row = db
                    .get_job_by_id(&medrelay::ids::JobId::from_raw(s.id.as_str()))
                    .await
                    .unwrap();
                if !row.is_some_and(|r| poisoned.contains(&r.user_prefix)) {
                    purged += 1;
                }
            }
            Some("failed") => failed += 1,
            other => panic!("job {} ended as {other:?}", s.id),
        }
    }
    assert_eq!(
        purged, 0,
        "a job ended by a purge that was not a poison pill"
    );

    // After TTL + one sweep: nothing left anywhere.
    tokio::time::sleep(Duration::from_secs(TTL_SECS) + Duration::from_millis(3 * SWEEP_MS)).await;
    crate::harness::eventually(Duration::from_secs(20), "an empty bucket", || async {
        let left = store.list_all().await.unwrap();
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();
    let medrelay::db::Db::Postgres(pool, ..) = &db else {
        unreachable!()
    };
    let (keys_left,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE document_dek IS NOT NULL OR result_dek IS NOT NULL \
         OR result IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(keys_left, 0, "key material left in the database");
    let oldest = oldest_seen_ms.load(Ordering::SeqCst) as u64;
    assert!(
        oldest < TTL_SECS * 1000 + SWEEP_MS,
        "an object lived {oldest} ms (TTL {TTL_SECS} s + sweep {SWEEP_MS} ms)"
    );
    println!(
        "chaos: {} uploads accepted, {succeeded} succeeded, {failed} failed, {deleted} deleted \
         by their owner; {} provider calls (max {} per job); {kills} SIGKILLs, {terms} SIGTERMs, \
         1 S3 outage of 10 s, {db_kills} database connection kills; {poison_purges} poison-pill \
         purges; oldest object {:.1} s (limit {} s)",
        seen.len(),
        calls.len(),
        per_job.values().map(Vec::len).max().unwrap_or(0),
        oldest as f64 / 1000.0,
        TTL_SECS as f64 + SWEEP_MS as f64 / 1000.0,
    );
    db.close().await;
    for i in 0..3 {
        fleet.stop(i, false);
    }
    drop_postgres(&name).await;
}
