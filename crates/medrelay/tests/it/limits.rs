//! Fair use, against real `medrelay serve` processes over real HTTP: per-user and per-instance
//! limits answer 429 with `Retry-After` and keep nothing; the per-user limits hold across
//! instances sharing a PostgreSQL database; slow and stalled uploads are cut off and leave
//! nothing; Claude calls in flight stay under the instance's cap; the spend guard fails a job
//! instead of calling Claude; the operations routes move to the admin address.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::{heavy_pdf, png, text_pdf};
use crate::harness::{
    Backend, assert_problem, drop_postgres, eventually, fresh_bucket, fresh_postgres, walk,
};
use crate::server::{Server, backend_env, wait_terminal};

const REFUSED_UPLOADS: &str = "medrelay_limit_refusals_total{limit=\"user_concurrent_uploads\"}";

/// An upload whose first kilobyte goes at once and whose rest waits for `gate` to open: it
/// holds its slot until then.
fn gated_body(document: Vec<u8>, mut gate: watch::Receiver<bool>) -> reqwest::Body {
    let document = Bytes::from(document);
    let stream = async_stream_of(move |tx| async move {
        let head = document.len().min(1024);
        let _ = tx.send(Ok(document.slice(..head))).await;
        let _ = gate.wait_for(|open| *open).await;
        let _ = tx.send(Ok(document.slice(head..))).await;
    });
    reqwest::Body::wrap_stream(stream)
}

fn async_stream_of<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn post_document(
    http: &reqwest::Client,
    addr: &str,
    token: &str,
    body: reqwest::Body,
) -> reqwest::Response {
    http.post(format!("{addr}/v1/documents"))
        .bearer_auth(token)
        .header("content-type", "application/pdf")
        .body(body)
        .send()
        .await
        .expect("an answer")
}

async fn upload(http: &reqwest::Client, addr: &str, token: &str, document: Vec<u8>) -> Value {
    let response = post_document(http, addr, token, document.into()).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.json().await.unwrap()
}

/// A 429 as api.md has it: problem+json, `too-many-requests`, retryable, `Retry-After` of at
/// least a second, and a detail for a patient. Returns (Retry-After, detail).
async fn assert_too_many(response: reqwest::Response) -> (u64, String) {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("a 429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let problem = assert_problem(response, 429, "too-many-requests").await;
    assert_eq!(problem["retryable"], true);
    let detail = problem["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("Please"), "{detail}");
    (retry_after, detail)
}

/// 100 parallel uploads by one user: exactly the cap get in, the rest are refused at once
/// with 429 and nothing of them is kept; the server's memory stays bounded; another user is
/// never affected; once the uploads end, the same user may upload again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_has_at_most_its_cap_of_uploads_in_flight() {
    let server = Server::start(&[]);
    let http = reqwest::Client::new();
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let warm = upload(&http, &server.addr, &alice, text_pdf(&["warm up"])).await;
    wait_terminal(&http, &server.addr, &alice, warm["id"].as_str().unwrap()).await;
    let (_, idle_kib) = server.memory_kib();

    let document = text_pdf(&["Lab Report", "Hemoglobin 13.2 g/dL"]);
    let (open, gate) = watch::channel(false);
    let uploads: Vec<_> = (0..100)
        .map(|_| {
            let (http, addr, token) = (http.clone(), server.addr.clone(), alice.clone());
            let body = gated_body(document.clone(), gate.clone());
            tokio::spawn(async move { post_document(&http, &addr, &token, body).await })
        })
        .collect();
    // Every upload reached the server: all but the cap were refused before their body ended.
    eventually(Duration::from_secs(30), "96 refusals", || async {
        let refused = server.metric(REFUSED_UPLOADS).await;
        (refused >= 96.0).then_some(()).ok_or(refused.to_string())
    })
    .await;
    // The instance sees the cap in flight, no more (refused ones let go of theirs at once).
    eventually(Duration::from_secs(5), "4 uploads in flight", || async {
        let in_flight = server.metric("medrelay_uploads_in_flight").await;
        (in_flight == 4.0)
            .then_some(())
            .ok_or(in_flight.to_string())
    })
    .await;
    // Meanwhile another user is not affected.
    let other = upload(&http, &server.addr, &bob, png(200, 100)).await;
    let done = wait_terminal(&http, &server.addr, &bob, other["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");

    open.send(true).unwrap();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for upload in uploads {
        let response = upload.await.unwrap();
        if response.status() == StatusCode::ACCEPTED {
            accepted.push(response.json::<Value>().await.unwrap());
        } else {
            let (_, detail) = assert_too_many(response).await;
            assert!(detail.contains("many documents at once"), "{detail}");
            refused += 1;
        }
    }
    assert_eq!((accepted.len(), refused), (4, 96));
    assert_eq!(server.metric(REFUSED_UPLOADS).await, 96.0);
    let (peak_kib, _) = server.memory_kib();
    assert!(
        peak_kib <= idle_kib + 64 * 1024,
        "peak {peak_kib} KiB, idle {idle_kib} KiB"
    );
    for job in &accepted {
        let done = wait_terminal(&http, &server.addr, &alice, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    // The slots are free again (they are released as each upload ends).
    eventually(Duration::from_secs(10), "alice uploads again", || async {
        let response = post_document(&http, &server.addr, &alice, document.clone().into()).await;
        match response.status() {
            StatusCode::ACCEPTED => Ok(()),
            s => Err(s.to_string()),
        }
    })
    .await;
    // Only the accepted uploads became jobs: 1 + 4 + 1 of alice's, 1 of bob's.
    assert_eq!(server.list_jobs(&alice).await.len(), 6);
    assert_eq!(server.list_jobs(&bob).await.len(), 1);
    // The refused ones, which had begun to write when they were refused, left nothing; the
    // jobs' documents went when they ended.
    let objects = server.data().join("objects");
    eventually(Duration::from_secs(10), "an empty store", || async {
        let files: Vec<_> = walk(&objects).into_iter().filter(|p| p.is_file()).collect();
        files.is_empty().then_some(()).ok_or(format!("{files:?}"))
    })
    .await;
}

/// A fresh master key line and token secret, shared by instances of one deployment.
fn shared_keys() -> (String, String) {
    let key: [u8; 32] = rand::random();
    let secret: [u8; 32] = rand::random();
    let b64 = base64::engine::general_purpose::STANDARD;
    (
        format!("k1:{}", b64.encode(key)),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    )
}

/// Three API instances on one PostgreSQL database and one bucket: a user's uploads in flight,
/// active jobs, uploads per hour and event streams are limited across all three together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_limits_hold_across_three_instances_on_postgres() {
    let (url, name) = fresh_postgres().await;
    let storage = format!("s3://{}/medrelay", fresh_bucket().await);
    let (master_key, secret) = shared_keys();
    // No worker: jobs stay queued, so they count as active.
    let envs = [
        ("MEDRELAY_DATABASE_URL", url.as_str()),
        ("MEDRELAY_STORAGE_URL", storage.as_str()),
        ("MEDRELAY_MASTER_KEY", master_key.as_str()),
        ("MEDRELAY_JWT_SECRET", secret.as_str()),
        ("MEDRELAY_ROLES", "api"),
        ("MEDRELAY_USER_ACTIVE_JOBS", "5"),
        ("MEDRELAY_USER_UPLOADS_PER_HOUR", "7"),
    ];
    let servers: Vec<Server> = (0..3).map(|_| Server::start(&envs)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let http = reqwest::Client::new();
    let alice = servers[0].token("alice");
    let document = text_pdf(&["Discharge summary"]);

    // Uploads in flight: 12 at once, 4 on each instance; 4 in all get in.
    let (open, gate) = watch::channel(false);
    let uploads: Vec<_> = (0..12)
        .map(|i| {
            let (http, addr, token) = (http.clone(), addrs[i % 3].clone(), alice.clone());
            let body = gated_body(document.clone(), gate.clone());
            tokio::spawn(async move { post_document(&http, &addr, &token, body).await })
        })
        .collect();
    eventually(Duration::from_secs(30), "8 refusals", || async {
        let mut refused = 0.0;
        for server in &servers {
            refused += server.metric(REFUSED_UPLOADS).await;
        }
        (refused >= 8.0).then_some(()).ok_or(refused.to_string())
    })
    .await;
    open.send(true).unwrap();
    let mut jobs = Vec::new();
    for upload in uploads {
        let response = upload.await.unwrap();
        if response.status() == StatusCode::ACCEPTED {
            jobs.push(response.json::<Value>().await.unwrap());
        } else {
            assert_too_many(response).await;
        }
    }
    assert_eq!(jobs.len(), 4, "uploads in flight across instances");

    // Active jobs: a fifth fits, a sixth does not, whichever instance it reaches.
    let fifth = eventually(Duration::from_secs(10), "a fifth job", || async {
        let response = post_document(&http, &addrs[1], &alice, document.clone().into()).await;
        match response.status() {
            StatusCode::ACCEPTED => Ok(response.json::<Value>().await.unwrap()),
            s => Err(s.to_string()),
        }
    })
    .await;
    jobs.push(fifth);
    for addr in &addrs {
        let response = post_document(&http, addr, &alice, document.clone().into()).await;
        let (_, detail) = assert_too_many(response).await;
        assert!(detail.contains("still being read"), "{detail}");
    }

    // Event streams: 8 in all, spread over the instances; the ninth is refused anywhere.
    let id = jobs[0]["id"].as_str().unwrap().to_owned();
    let mut streams = Vec::new();
    for i in 0..8 {
        let response = http
            .get(format!("{}/v1/jobs/{id}/events", addrs[i % 3]))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        streams.push(response);
    }
    for addr in &addrs {
        let response = http
            .get(format!("{addr}/v1/jobs/{id}/events"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        let (_, detail) = assert_too_many(response).await;
        assert!(detail.contains("following documents"), "{detail}");
    }
    // A stream that ends frees its slot.
    drop(streams.pop());
    eventually(Duration::from_secs(10), "a freed stream slot", || async {
        let response = http
            .get(format!("{}/v1/jobs/{id}/events", addrs[2]))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::OK => Ok(response),
            s => Err(s.to_string()),
        }
    })
    .await;
    drop(streams);

    // Uploads per hour: deleting jobs frees active slots, not the hour's count (5 so far).
    for job in &jobs {
        let deleted = http
            .delete(format!(
                "{}/v1/jobs/{}",
                addrs[2],
                job["id"].as_str().unwrap()
            ))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    }
    let keyed = |addr: &str| {
        http.post(format!("{addr}/v1/documents"))
            .bearer_auth(&alice)
            .header("idempotency-key", "the-last-of-the-hour")
            .body(document.clone())
    };
    upload(&http, &addrs[1], &alice, document.clone()).await;
    let last = keyed(&addrs[2]).send().await.unwrap();
    assert_eq!(last.status(), StatusCode::ACCEPTED);
    let last: Value = last.json().await.unwrap();
    let response = post_document(&http, &addrs[0], &alice, document.clone().into()).await;
    let (retry_after, detail) = assert_too_many(response).await;
    assert!(detail.contains("last hour"), "{detail}");
    // Exact: when the first of the hour's uploads leaves the window.
    assert!(
        (3000..=3600).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    // A phone that lost the 202 of its last upload replays it: it gets its job, not a 429.
    let replay = keyed(&addrs[0]).send().await.unwrap();
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], last["id"]);

    // Another user was never affected.
    let bob = servers[2].token("bob");
    upload(&http, &addrs[0], &bob, document.clone()).await;

    drop(servers);
    drop_postgres(&name).await;
}

/// Sends a raw HTTP upload that declares `length` bytes, writes `head` at once, then
/// `trickle` bytes every `every` until the server answers; returns the answer's status line
/// and how long it took. The server must answer and close the connection.
async fn raw_upload(
    addr: &str,
    token: &str,
    length: usize,
    head: &[u8],
    trickle: usize,
    every: Duration,
) -> (String, Duration) {
    let host = addr.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(host).await.unwrap();
    let started = Instant::now();
    let request = format!(
        "POST /v1/documents HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/pdf\r\nContent-Length: {length}\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket.write_all(head).await.unwrap();
    let mut sent = head.len();
    let (mut read, mut write) = socket.into_split();
    let sender = tokio::spawn(async move {
        let chunk = vec![b' '; trickle];
        loop {
            tokio::time::sleep(every).await;
            if trickle == 0 || sent >= length {
                continue;
            }
            if write.write_all(&chunk).await.is_err() {
                return;
            }
            sent += trickle;
        }
    });
    let mut answer = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(90), read.read_to_end(&mut answer));
    read_all.await.expect("the server answers and closes").ok();
    let elapsed = started.elapsed();
    sender.abort();
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default().to_owned();
    (status, elapsed)
}

/// A client sending 1 byte per second is cut off by the rate rule, one that stops sending is
/// cut off, and one that keeps a fair rate past the deadline is cut off: each gets 408
/// `upload-timeout`, and nothing remains in the store, the staging area or the database.
async fn slow_uploads_are_cut_off_and_leave_nothing(backend: Backend) {
    let (envs, pg_name) = backend_env(backend).await;
    let env_refs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&env_refs);
    let mut short_envs = env_refs.clone();
    short_envs.push(("MEDRELAY_UPLOAD_DEADLINE", "3s"));
    let short = Server::start(&short_envs);
    let token = server.token("alice");
    let short_token = short.token("alice");

    // The head is a real PDF's first kilobyte: the type is accepted and the store write runs.
    let mut head = text_pdf(&["Referral letter"]);
    head.resize(16 * 1024, b' ');
    let length = 4 * 1024 * 1024;
    let (dribble, stalled, too_long, stalled_short) = tokio::join!(
        raw_upload(
            &server.addr,
            &token,
            length,
            &head,
            1,
            Duration::from_secs(1)
        ),
        raw_upload(
            &server.addr,
            &token,
            length,
            &head,
            0,
            Duration::from_secs(1)
        ),
        // 64 KiB/s keeps the rate, but 4 MiB takes a minute: past the 3 s deadline.
        raw_upload(
            &short.addr,
            &short_token,
            length,
            &head,
            16 * 1024,
            Duration::from_millis(250)
        ),
        // Sends nothing after its head: the deadline's timer ends it (long before the 30 s
        // without a byte would).
        raw_upload(
            &short.addr,
            &short_token,
            length,
            &head,
            0,
            Duration::from_secs(1)
        ),
    );
    for (what, (status, took), within) in [
        ("1 byte per second", dribble, 29..45),
        ("a stalled upload", stalled, 29..45),
        ("past the deadline", too_long, 2..10),
        ("stalled past the deadline", stalled_short, 2..10),
    ] {
        assert!(status.starts_with("HTTP/1.1 408"), "{what}: {status}");
        assert!(
            within.contains(&took.as_secs()),
            "{what}: cut off after {took:?}"
        );
    }

    for (server, envs) in [(&server, &env_refs), (&short, &short_envs)] {
        let data = server.data();
        let (db, store) = server.backends(envs).await;
        assert!(
            db.count_by_status()
                .await
                .unwrap()
                .iter()
                .all(|(_, n)| *n == 0),
            "no job row"
        );
        eventually(Duration::from_secs(5), "nothing stored", || async {
            let objects = store.list_all().await.unwrap();
            let staged = if backend.s3() {
                vec![]
            } else {
                walk(&data.join("objects"))
            };
            (objects.is_empty() && staged.is_empty())
                .then_some(())
                .ok_or(format!("{objects:?} {staged:?}"))
        })
        .await;
        db.close().await;
        assert!(server.metric("medrelay_uploads_cut_off_total").await >= 1.0);
    }
    drop((server, short));
    if let Some(name) = pg_name {
        drop_postgres(&name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_are_cut_off_and_leave_nothing_sqlite_and_folder() {
    slow_uploads_are_cut_off_and_leave_nothing(Backend::SqliteFolder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_are_cut_off_and_leave_nothing_postgres_and_s3() {
    slow_uploads_are_cut_off_and_leave_nothing(Backend::PostgresS3).await
}

/// 1,000 jobs against a Claude that answers 529 to everything: never more calls in flight than
/// `MEDRELAY_ANTHROPIC_CONCURRENCY` (the rest wait for a slot, they do not fail), and every
/// job ends after exactly its 1 + 3 attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_against_an_overloaded_claude_keep_the_call_cap() {
    let mut overloaded = Reply::error(529, "overloaded_error");
    overloaded.delay = Duration::from_millis(10);
    let (mock, base) = Mock::start(vec![], Some(overloaded)).await;
    let server = Server::start(&[
        ("MEDRELAY_PROCESSOR", "anthropic"),
        ("ANTHROPIC_BASE_URL", &base),
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("MEDRELAY_ANTHROPIC_CONCURRENCY", "4"),
        ("MEDRELAY_WORKERS", "16"),
        ("MEDRELAY_RETRY_DELAYS", "50ms,50ms,50ms"),
        ("MEDRELAY_USER_CONCURRENT_UPLOADS", "8"),
        ("MEDRELAY_USER_ACTIVE_JOBS", "1000"),
        ("MEDRELAY_USER_UPLOADS_PER_HOUR", "1000"),
        ("MEDRELAY_USER_PROVIDER_CALLS_PER_DAY", "100000"),
    ]);
    let http = reqwest::Client::new();
    let token = server.token("alice");
    let document = png(16, 16);
    let ids: Vec<String> = futures::future::join_all((0..8).map(|_| {
        let (http, addr, token, document) = (
            http.clone(),
            server.addr.clone(),
            token.clone(),
            document.clone(),
        );
        async move {
            let mut ids = Vec::new();
            for _ in 0..125 {
                let response = http
                    .post(format!("{addr}/v1/documents"))
                    .bearer_auth(&token)
                    .body(document.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                let job: Value = response.json().await.unwrap();
                ids.push(job["id"].as_str().unwrap().to_owned());
            }
            ids
        }
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert_eq!(ids.len(), 1000);
    // The hour's uploads are used up exactly.
    let response = post_document(&http, &server.addr, &token, document.clone().into()).await;
    let (retry_after, _) = assert_too_many(response).await;
    assert!(retry_after > 3000, "Retry-After {retry_after}");
    let exhausted = "medrelay_jobs_finished_total{outcome=\"failed\",reason=\"retries-exhausted\"}";
    eventually(Duration::from_secs(600), "every job failed", || async {
        let failed = server.metric(exhausted).await;
        let progress = format!(
            "{failed} failed, {} calls, max {} in flight",
            mock.calls().len(),
            mock.max_in_flight()
        );
        (failed >= 1000.0).then_some(()).ok_or(progress)
    })
    .await;
    let mut jobs = Vec::new();
    for id in &ids {
        let job = server.job(&token, id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["attempts"], 4, "{job}");
        assert_eq!(job["error"]["code"], "processing-unavailable", "{job}");
        assert_eq!(job["error"]["retryable"], true, "{job}");
        jobs.push(job);
    }
    assert_eq!(mock.calls().len(), 4 * jobs.len(), "one call per attempt");
    assert_eq!(mock.max_in_flight(), 4, "the cap is reached, never passed");
    assert!(server.metric("medrelay_provider_call_waits_total").await > 0.0);
}

/// The spend guard: once a user's provider calls of the day are used up, the next job fails
/// with `daily-limit-reached` (retryable later) without calling Claude; other users go on.
async fn the_spend_guard_fails_a_job_instead_of_calling_claude(backend: Backend) {
    let (mock, base) = Mock::start(vec![], Some(Reply::ok(extraction("read by Claude")))).await;
    let (mut envs, pg_name) = backend_env(backend).await;
    envs.extend([
        ("MEDRELAY_PROCESSOR", "anthropic".into()),
        ("ANTHROPIC_BASE_URL", base),
        ("ANTHROPIC_API_KEY", "sk-ant-test".into()),
        ("MEDRELAY_USER_PROVIDER_CALLS_PER_DAY", "2".into()),
    ]);
    let env_refs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&env_refs);
    let http = reqwest::Client::new();
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let mut ends = Vec::new();
    for _ in 0..3 {
        let job = upload(&http, &server.addr, &alice, text_pdf(&["Prescription"])).await;
        ends.push(wait_terminal(&http, &server.addr, &alice, job["id"].as_str().unwrap()).await);
    }
    assert_eq!(ends[0]["status"], "succeeded");
    assert_eq!(ends[1]["status"], "succeeded");
    assert_eq!(ends[2]["status"], "failed", "{}", ends[2]);
    assert_eq!(ends[2]["error"]["code"], "daily-limit-reached");
    assert_eq!(ends[2]["error"]["retryable"], true);
    assert_eq!(
        ends[2]["attempts"], 1,
        "not retried: the limit holds for a day"
    );
    assert_eq!(
        mock.calls().len(),
        2,
        "the refused job never reached Claude"
    );
    let job = upload(&http, &server.addr, &bob, text_pdf(&["Prescription"])).await;
    let done = wait_terminal(&http, &server.addr, &bob, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(
        server
            .metric("medrelay_limit_refusals_total{limit=\"user_provider_calls_per_day\"}")
            .await,
        1.0
    );
    // A managed failure: the user is not purged, and no document is left.
    assert_eq!(server.list_jobs(&alice).await.len(), 3);
    let (db, store) = server.backends(&env_refs).await;
    eventually(Duration::from_secs(10), "an empty store", || async {
        let left = store.list_all().await.unwrap();
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    db.close().await;
    // A PDF sent to Claude in three parts is three calls, charged before the first: with
    // two left, none is made.
    let carol = server.token("carol");
    let job = upload(&http, &server.addr, &carol, heavy_pdf(250, 10)).await;
    let done = wait_terminal(&http, &server.addr, &carol, job["id"].as_str().unwrap()).await;
    assert_eq!(done["error"]["code"], "daily-limit-reached", "{done}");
    assert_eq!(mock.calls().len(), 3, "carol's parts never reached Claude");
    drop(server);
    if let Some(name) = pg_name {
        drop_postgres(&name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spend_guard_fails_a_job_instead_of_calling_claude_sqlite_and_folder() {
    the_spend_guard_fails_a_job_instead_of_calling_claude(Backend::SqliteFolder).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spend_guard_fails_a_job_instead_of_calling_claude_postgres_and_s3() {
    the_spend_guard_fails_a_job_instead_of_calling_claude(Backend::PostgresS3).await
}

/// With `MEDRELAY_ADMIN_LISTEN`, `/metrics`, `/healthz` and `/readyz` answer there and only
/// there; the app's routes are not on the admin address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_address_alone_serves_the_operations_routes() {
    let server = Server::start(&[("MEDRELAY_ADMIN_LISTEN", "127.0.0.1:0")]);
    let admin = server.admin.clone().expect("an admin address");
    assert_ne!(admin, server.addr);
    let http = reqwest::Client::new();
    let token = server.token("alice");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let public = http
            .get(format!("{}{path}", server.addr))
            .send()
            .await
            .unwrap();
        assert_problem(public, 404, "not-found").await;
        let private = http.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(private.status(), StatusCode::OK, "{path}");
    }
    let jobs = http
        .get(format!("{admin}/v1/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_problem(jobs, 404, "not-found").await;
    let jobs = http
        .get(format!("{}/v1/jobs", server.addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), StatusCode::OK);
    // The OpenAPI document still describes every route.
    let spec: Value = http
        .get(format!("{}/openapi.json", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/metrics"].is_object());
}

/// A finished job's event stream answers its last state and ends without taking one of the
/// user's stream slots (issue #14): with the cap at one and that one held by a stream of a job
/// in progress, the finished job's stream is still answered, and a second stream of the job in
/// progress is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_stream_takes_no_stream_slot() {
    let mut slow = Reply::ok(extraction("read slowly"));
    slow.delay = Duration::from_secs(30);
    let (_mock, base) = Mock::start(vec![Reply::ok(extraction("read at once"))], Some(slow)).await;
    let server = Server::start(&[
        ("MEDRELAY_PROCESSOR", "anthropic"),
        ("ANTHROPIC_BASE_URL", &base),
        ("ANTHROPIC_API_KEY", "sk-ant-test"),
        ("MEDRELAY_USER_EVENT_STREAMS", "1"),
    ]);
    let http = reqwest::Client::new();
    let alice = server.token("alice");
    let events = |id: &str| {
        http.get(format!("{}/v1/jobs/{id}/events", server.addr))
            .bearer_auth(&alice)
            .send()
    };
    let finished = server.upload(&alice, text_pdf(&["Read at once"])).await;
    let finished = finished["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&http, &server.addr, &alice, &finished).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let running = server.upload(&alice, text_pdf(&["Read slowly"])).await;
    let running = running["id"].as_str().unwrap().to_owned();
    let held = events(&running).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);

    let answered = events(&finished).await.unwrap();
    assert_eq!(
        answered.status(),
        StatusCode::OK,
        "the finished job's stream"
    );
    let body = tokio::time::timeout(Duration::from_secs(5), answered.text())
        .await
        .expect("a finished job's stream ends at once")
        .unwrap();
    assert!(body.contains("\"succeeded\""), "{body}");
    // The cap is in force: the held slot is the only one.
    let (_, detail) = assert_too_many(events(&running).await.unwrap()).await;
    assert!(detail.contains("following documents"), "{detail}");
    drop(held);
}
