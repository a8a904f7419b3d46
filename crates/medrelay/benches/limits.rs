//! How close medrelay runs to the limits of this machine (issue #14): every figure beside a
//! baseline measured in the same run, each repeated in rounds, printed as min / median / max
//! of the value and of the ratio.
//!
//! 1. **Latency** (SQLite server): the first event of a finished job's event stream; a tiny
//!    PDF's 202 → terminal event, against `medrelay process` of the same file.
//! 2. **Claim** (the library on SQLite and PostgreSQL): one claim with 10,000 and 50,000 jobs
//!    finished and 10,000 / 50,000 queued for later, against the claim on an empty table.
//! 3. **Queue throughput** (the library, 16 workers): medrelay's insert (with its fair-use
//!    check), claim and completion, against a textbook insert + claim + complete loop on the
//!    same engine, pool and durability; writing transactions per job on PostgreSQL; then a
//!    sustained load at 80 % of that maximum, finished jobs piling up, in 10 s windows.
//! 4. **Polls** (wrk, 64 connections): `GET /v1/jobs/{id}` of a finished job against the same
//!    server's `/healthz`, on SQLite and on PostgreSQL.
//! 5. **Uploads** (roles `api,sweeper`): server CPU per 32 MiB upload and the aggregate of 16
//!    concurrent ones, against a minimal C HTTP sink that `write()`s the body to a file;
//!    encryption's added CPU against AES-256-GCM plus one copy of the same bytes.
//! 6. **2,000 Claude calls in flight** (a mock that answers after 10 s at the earliest):
//!    server RSS and CPU while waiting, and every job's outcome.
//!
//! Run by `scripts/bench` (which builds the release binary and the sink, and installs wrk):
//! `cargo bench -p medrelay --bench limits -- BIN SINK`. Settings: `MEDRELAY_BENCH_ROUNDS`
//! (3), `MEDRELAY_BENCH_SECS` (3), `MEDRELAY_BENCH_IN_FLIGHT` (2000),
//! `MEDRELAY_TEST_DATABASE_URL` (PostgreSQL; default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `MEDRELAY_BENCH_ONLY` (a comma-separated list of `latency`, `claim`, `throughput`,
//! `sustained`, `polls`, `uploads`, `in-flight`; default all), `MEDRELAY_BENCH_SUSTAIN_SECS`
//! (60; the 10-minute run is 600).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use medrelay::crypto::WrappedKey;
use medrelay::db::{Db, InsertCaps, NewJob};
use medrelay::ids::{JobId, LeaseToken, UserId, UserPrefix};
use tokio::process::Command;

mod support;
use support::{Server, bench_dir, client, env_number, fail, fmt, load_wrk, median, small_pdf};

const MIB: usize = 1024 * 1024;
const LARGE: usize = 32 * MIB;

struct Settings {
    rounds: usize,
    secs: u64,
    in_flight: usize,
    dir: PathBuf,
    pg_url: String,
}

/// One figure: its values per round, and its baseline's in the same rounds.
struct Figure {
    what: String,
    unit: &'static str,
    values: Vec<f64>,
    baseline: String,
    baselines: Vec<f64>,
    goal: String,
}

impl Figure {
    fn new(what: &str, unit: &'static str, baseline: &str, goal: &str) -> Figure {
        Figure {
            what: what.into(),
            unit,
            values: vec![],
            baseline: baseline.into(),
            baselines: vec![],
            goal: goal.into(),
        }
    }

    fn push(&mut self, value: f64, baseline: f64) {
        self.values.push(value);
        self.baselines.push(baseline);
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let (Some(bin), Some(sink)) = (args.next(), args.next()) else {
        fail("usage: cargo bench --bench limits -- /abs/medrelay /abs/sink".into())
    };
    let settings = Settings {
        rounds: env_number("MEDRELAY_BENCH_ROUNDS", 3),
        secs: env_number("MEDRELAY_BENCH_SECS", 3) as u64,
        in_flight: env_number("MEDRELAY_BENCH_IN_FLIGHT", 2000),
        dir: bench_dir().0,
        pg_url: std::env::var("MEDRELAY_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let started = Instant::now();
    let figures = runtime.block_on(async {
        let bin = PathBuf::from(bin);
        let mut figures = Vec::new();
        let only = std::env::var("MEDRELAY_BENCH_ONLY").unwrap_or_default();
        let run = |phase: &str| {
            let yes = only.is_empty() || only.split(',').any(|p| p.trim() == phase);
            if yes {
                eprintln!("== {phase}");
            }
            yes
        };
        if run("latency") {
            figures.extend(latency(&bin, &settings).await);
        }
        if run("claim") {
            figures.extend(claims(&settings).await);
        }
        if run("throughput") {
            figures.extend(throughput(&settings).await);
        }
        if run("sustained") {
            figures.extend(sustained(&settings).await);
        }
        if run("polls") {
            figures.extend(polls(&bin, &settings).await);
        }
        if run("uploads") {
            figures.extend(uploads(&bin, Path::new(&sink), &settings).await);
        }
        if run("in-flight") {
            figures.extend(in_flight(&bin, &settings).await);
        }
        figures
    });
    print_report(&figures, &settings, started.elapsed());
}

// --- 1. latency -------------------------------------------------------------------------------

async fn latency(bin: &Path, s: &Settings) -> Vec<Figure> {
    let server = Server::start("sqlite", bin, &[], &s.dir).await;
    let pdf = small_pdf();
    let file = s
        .dir
        .join(format!("medrelay-bench-{}.pdf", std::process::id()));
    std::fs::write(&file, &pdf).expect("the tiny PDF");
    let http = client(4);
    let mut first = Figure::new(
        "first SSE event of a finished job, p50",
        "ms",
        "— (the goal is absolute)",
        "≤ 2 ms",
    );
    let mut terminal = Figure::new(
        "tiny PDF, 202 → terminal event, p50",
        "ms",
        "`medrelay process` of the same file, p50",
        "≤ 1.5×",
    );
    let finished = support::processed_job(&server, &pdf).await;
    for round in 0..s.rounds {
        let mut processing = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let out = Command::new(bin)
                .arg("process")
                .arg(&file)
                .env("MEDRELAY_DATA_DIR", s.dir.join("process-data"))
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .unwrap_or_else(|e| fail(format!("medrelay process: {e}")));
            if !out.success() {
                fail(format!("medrelay process {} failed: {out}", file.display()));
            }
            processing.push(ms(t.elapsed()));
        }
        let mut ends = Vec::new();
        for _ in 0..20 {
            let response = http
                .post(format!("{}/v1/documents", server.url))
                .bearer_auth(&server.token)
                .body(pdf.clone())
                .send()
                .await
                .unwrap_or_else(|e| fail(format!("upload: {e}")));
            let accepted = Instant::now();
            let id = support::job_id(&response.text().await.unwrap_or_default());
            let stream = events(&http, &server, &id).await;
            let mut stream = std::pin::pin!(stream);
            let mut seen = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains("\"succeeded\"") || seen.contains("\"failed\"") {
                    break;
                }
            }
            ends.push(ms(accepted.elapsed()));
        }
        let mut firsts = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let stream = events(&http, &server, &finished).await;
            let mut stream = std::pin::pin!(stream);
            let _ = stream.next().await;
            firsts.push(ms(t.elapsed()));
        }
        first.push(median(firsts), f64::NAN);
        terminal.push(median(ends), median(processing));
        eprintln!("  round {}/{}", round + 1, s.rounds);
    }
    let _ = std::fs::remove_file(&file);
    server.stop().await;
    vec![first, terminal]
}

async fn events(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> {
    http.get(format!("{}/v1/jobs/{id}/events", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| fail(format!("events of {id}: {e}")))
        .bytes_stream()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// --- 2. claim ---------------------------------------------------------------------------------

/// A SQLite database in the bench dir, or a fresh PostgreSQL database, opened (and migrated)
/// as medrelay opens it; the guard drops it.
async fn database(s: &Settings, postgres: bool) -> (Db, String, Box<dyn FnOnce() + Send>) {
    if postgres {
        let name = format!("medrelay_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&s.pg_url).await.unwrap_or_else(|e| {
            fail(format!(
                "PostgreSQL at {} ({e}): start it (scripts/services.sh does)",
                s.pg_url
            ))
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| fail(format!("creating {name}: {e}")));
        let base = s
            .pg_url
            .rsplit_once('/')
            .map_or(s.pg_url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        let db = Db::connect(&url)
            .await
            .unwrap_or_else(|e| fail(format!("{name}: {e:#}")));
        let drop_it = move || {
            let _ = std::process::Command::new("psql")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-qc"])
                .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        admin.close().await;
        (db, url, Box::new(drop_it))
    } else {
        let dir = tempfile::tempdir_in(&s.dir).expect("a temp dir");
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let db = Db::connect(&url)
            .await
            .unwrap_or_else(|e| fail(format!("SQLite: {e:#}")));
        (db, url, Box::new(move || drop(dir)))
    }
}

/// `body` on the database's pool, whichever engine it is (`p` is the pool).
macro_rules! either {
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            Db::Sqlite($p, ..) => $body,
            Db::Postgres($p, ..) => $body,
        }
    };
}

async fn raw(db: &Db, sql: String) {
    either!(db, |p| sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .execute(p)
        .await
        .map(|_| ()))
    .unwrap_or_else(|e| fail(format!("{sql}: {e}")));
}

/// Adds `n` finished jobs and `n` jobs queued for later.
async fn backlog(db: &Db, n: usize, tag: &str) {
    let now = medrelay::clock::now_millis();
    for (status, run_at) in [("succeeded", now - 1000), ("queued", now + 3_600_000)] {
        let columns = "id, user_id, user_prefix, status, media_type, size_bytes, attempts, \
                       max_attempts, run_at, created_at, updated_at, expires_at";
        let values = format!(
            "'{tag}-{status}-' || n, 'u', 'p', '{status}', 'application/pdf', 1, 1, 4, {run_at}, \
             {now}, {now}, {}",
            now + 3_600_000
        );
        raw(
            db,
            match db {
                Db::Sqlite(..) => format!(
                    "WITH RECURSIVE series(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM series \
                     WHERE n < {n}) INSERT INTO jobs ({columns}) SELECT {values} FROM series"
                ),
                Db::Postgres(..) => format!(
                    "INSERT INTO jobs ({columns}) SELECT {values} \
                     FROM generate_series(1, {n}) AS series(n)"
                ),
            },
        )
        .await;
    }
    raw(db, "ANALYZE".into()).await;
}

fn new_job(user: &str) -> NewJob {
    let now = medrelay::clock::now_millis();
    NewJob {
        id: JobId::from_raw(uuid::Uuid::new_v4().to_string()),
        user_id: UserId::from_raw(user),
        user_prefix: UserPrefix::from_raw(user),
        media_type: "application/pdf",
        size_bytes: 1,
        max_attempts: 4,
        idempotency_key: None,
        document_key: WrappedKey {
            kid: "k".into(),
            bytes: vec![0; 60],
        },
        push_token: None,
        now,
        created_at: now,
        expires_at: now + 3_600_000,
    }
}

/// Median µs of one claim (one due job, claimed), over `n` claims.
async fn claim_cost(db: &Db, n: usize) -> f64 {
    let lease = LeaseToken::from_raw("bench");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        db.insert_job(&new_job("claimer"))
            .await
            .unwrap_or_else(|e| fail(format!("insert: {e}")));
        let t = Instant::now();
        let claimed = db
            .claim(&lease, Duration::from_secs(60), 1)
            .await
            .unwrap_or_else(|e| fail(format!("claim: {e}")));
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if claimed.len() != 1 {
            fail(format!("a claim took {} jobs, not 1", claimed.len()));
        }
    }
    median(samples)
}

async fn claims(s: &Settings) -> Vec<Figure> {
    let mut figures = Vec::new();
    for postgres in [false, true] {
        let engine = if postgres { "PostgreSQL" } else { "SQLite" };
        let mut at = [10_000usize, 50_000].map(|n| {
            Figure::new(
                &format!("one claim, {n} finished + {n} queued for later ({engine})"),
                "µs",
                "the same claim on an empty table",
                "≤ 2×",
            )
        });
        for round in 0..s.rounds {
            let (db, _, drop_it) = database(s, postgres).await;
            let empty = claim_cost(&db, 200).await;
            backlog(&db, 10_000, "a").await;
            let ten = claim_cost(&db, 200).await;
            backlog(&db, 40_000, "b").await;
            let fifty = claim_cost(&db, 200).await;
            at[0].push(ten, empty);
            at[1].push(fifty, empty);
            db.close().await;
            drop_it();
            eprintln!("  {engine} round {}/{}", round + 1, s.rounds);
        }
        figures.extend(at);
    }
    figures
}

// --- 3. queue throughput ----------------------------------------------------------------------

const WORKERS: usize = 16;

/// Microseconds spent in each step of the loops, summed over their workers (the profile
/// printed with a figure that misses its goal).
#[derive(Default)]
struct Steps {
    insert: AtomicUsize,
    claim: AtomicUsize,
    complete: AtomicUsize,
}

impl Steps {
    fn add(field: &AtomicUsize, since: Instant) {
        field.fetch_add(since.elapsed().as_micros() as usize, Ordering::Relaxed);
    }

    fn report(&self, what: &str, jobs: f64) {
        let per = |f: &AtomicUsize| f.load(Ordering::Relaxed) as f64 / jobs.max(1.0);
        eprintln!(
            "    {what}: µs per job (summed over workers): insert {:.0}, claim {:.0}, complete {:.0}",
            per(&self.insert),
            per(&self.claim),
            per(&self.complete)
        );
    }
}

/// What the server's `lifecycle::announce_changes` does with the claims and successes of its
/// workers on PostgreSQL (the database's trigger leaves those to the instance): ids gathered
/// while the previous `NOTIFY` is on its way and for the server's gap after it, sent together.
/// Nothing on SQLite.
struct Announcer {
    pending: parking_lot::Mutex<Vec<JobId>>,
    wake: tokio::sync::Notify,
    stopping: std::sync::atomic::AtomicBool,
}

impl Announcer {
    fn start(db: &Db) -> (Arc<Announcer>, tokio::task::JoinHandle<()>) {
        let announcer = Arc::new(Announcer {
            pending: parking_lot::Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        let (db, me) = (db.clone(), announcer.clone());
        let task = tokio::spawn(async move {
            loop {
                me.wake.notified().await;
                let batch = std::mem::take(&mut *me.pending.lock());
                if !batch.is_empty() {
                    let sent = tokio::time::Instant::now();
                    db.announce(&batch)
                        .await
                        .unwrap_or_else(|e| fail(format!("announce: {e}")));
                    if !me.stopping.load(Ordering::Acquire) {
                        tokio::time::sleep_until(sent + medrelay::lifecycle::ANNOUNCE_GAP).await;
                    }
                }
                if me.stopping.load(Ordering::Acquire) && me.pending.lock().is_empty() {
                    return;
                }
            }
        });
        (announcer, task)
    }

    fn push(&self, id: JobId) {
        self.pending.lock().push(id);
        self.wake.notify_one();
    }

    async fn stop(&self, task: tokio::task::JoinHandle<()>) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
        task.await
            .unwrap_or_else(|e| fail(format!("the announcer: {e}")));
    }
}

/// One worker of the queue loops: medrelay's insert (checking `caps`), claim and completion,
/// each claim and success announced as the server does.
struct QueueWorker {
    db: Db,
    lease: LeaseToken,
    key: WrappedKey,
    caps: InsertCaps,
    steps: Arc<Steps>,
    announcer: Arc<Announcer>,
}

impl QueueWorker {
    fn new(
        db: &Db,
        name: String,
        caps: InsertCaps,
        steps: Arc<Steps>,
        announcer: Arc<Announcer>,
    ) -> QueueWorker {
        QueueWorker {
            announcer,
            db: db.clone(),
            lease: LeaseToken::from_raw(name),
            key: WrappedKey {
                kid: "k".into(),
                bytes: vec![0; 60],
            },
            caps,
            steps,
        }
    }

    /// Inserts a job of `user`, claims one (maybe another worker's) and completes it; how many
    /// jobs it completed.
    async fn job(&self, user: &str) -> usize {
        let (db, steps) = (&self.db, &self.steps);
        let t = Instant::now();
        let inserted = db
            .insert_job_admitted(&new_job(user), None, self.caps, |_| ())
            .await;
        Steps::add(&steps.insert, t);
        if !matches!(inserted, Ok(Ok(_))) {
            fail("insert failed".into());
        }
        let t = Instant::now();
        let claimed = db
            .claim(&self.lease, Duration::from_secs(60), 1)
            .await
            .unwrap_or_else(|e| fail(format!("claim: {e}")));
        Steps::add(&steps.claim, t);
        let mut completed = 0;
        for row in claimed {
            self.announcer.push(row.id.clone());
            let t = Instant::now();
            let done = db
                .complete(&row.id, &self.lease, b"result", &self.key)
                .await;
            Steps::add(&steps.complete, t);
            if !matches!(done, Ok(true)) {
                fail(format!("complete: {done:?}"));
            }
            self.announcer.push(row.id);
            completed += 1;
        }
        completed
    }
}

/// Jobs/s of `WORKERS` tasks, each running insert → claim → complete for `secs`.
async fn medrelay_loop(db: &Db, secs: u64) -> f64 {
    let steps = Arc::new(Steps::default());
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    // medrelay's default caps: each user stays far below them here, so every insert is
    // admitted, and each one checks them.
    let caps = InsertCaps {
        since: medrelay::clock::now_millis() - 3_600_000,
        active_jobs: 20,
        uploads_per_window: 120,
    };
    let (announcer, announcing) = Announcer::start(db);
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let worker = QueueWorker::new(
                db,
                format!("lease-{w}"),
                caps,
                steps.clone(),
                announcer.clone(),
            );
            let done = done.clone();
            tokio::spawn(async move {
                // Many users with a few jobs each, as a phone app has (one user sending
                // hundreds of jobs a second would be stopped by the hourly limit).
                let mut n = 0usize;
                while Instant::now() < until {
                    n += 1;
                    let completed = worker.job(&format!("user-{w}-{}", n % 64)).await;
                    done.fetch_add(completed, Ordering::Relaxed);
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
    announcer.stop(announcing).await;
    let jobs = done.load(Ordering::Relaxed) as f64;
    steps.report("medrelay", jobs);
    jobs / secs as f64
}

/// Which table the textbook loop runs on.
#[derive(Clone, Copy, PartialEq)]
enum Table {
    /// A table of its own: an id, a status, a time, a lease, and the partial index a claim
    /// needs.
    Bare,
    /// medrelay's `jobs`, with its indexes and triggers: what the schema costs, apart from
    /// medrelay's statements.
    Jobs,
}

/// The textbook loop on the same pool: insert, claim the oldest queued (SKIP LOCKED on
/// PostgreSQL), complete, one statement each.
async fn raw_loop(db: &Db, secs: u64, table: Table) -> f64 {
    if table == Table::Bare {
        raw(
            db,
            "CREATE TABLE IF NOT EXISTS raw_jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, \
             run_at BIGINT NOT NULL, lease TEXT)"
                .into(),
        )
        .await;
        raw(
            db,
            "CREATE INDEX IF NOT EXISTS raw_jobs_queued ON raw_jobs (run_at) \
             WHERE status = 'queued'"
                .into(),
        )
        .await;
    }
    let postgres = matches!(db, Db::Postgres(..));
    let (insert, claim, complete) = match (table, postgres) {
        (Table::Bare, false) => (
            "INSERT INTO raw_jobs VALUES ($1, 'queued', $2, NULL)",
            "UPDATE raw_jobs SET status = 'running', lease = $1 WHERE id = (SELECT id FROM \
             raw_jobs WHERE status = 'queued' ORDER BY run_at LIMIT 1) RETURNING id",
            "UPDATE raw_jobs SET status = 'done', lease = NULL WHERE id = $1 AND lease = $2",
        ),
        (Table::Bare, true) => (
            "INSERT INTO raw_jobs VALUES ($1, 'queued', $2, NULL)",
            "UPDATE raw_jobs SET status = 'running', lease = $1 WHERE id = (SELECT id FROM \
             raw_jobs WHERE status = 'queued' ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING id",
            "UPDATE raw_jobs SET status = 'done', lease = NULL WHERE id = $1 AND lease = $2",
        ),
        (Table::Jobs, _) => (
            "INSERT INTO jobs (id, user_id, user_prefix, status, media_type, size_bytes, \
             attempts, max_attempts, run_at, created_at, updated_at, expires_at) \
             VALUES ($1, 'u', 'p', 'queued', 'application/pdf', 1, 0, 4, $2, $2, $2, $2 + 3600000)",
            if postgres {
                "UPDATE jobs SET status = 'processing', lease_token = $1 WHERE id = (SELECT id \
                 FROM jobs WHERE deleted_at IS NULL AND status IN ('queued', 'retry_scheduled') \
                 ORDER BY run_at LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
            } else {
                "UPDATE jobs SET status = 'processing', lease_token = $1 WHERE id = (SELECT id \
                 FROM jobs WHERE deleted_at IS NULL AND status IN ('queued', 'retry_scheduled') \
                 ORDER BY run_at LIMIT 1) RETURNING id"
            },
            "UPDATE jobs SET status = 'succeeded', lease_token = NULL WHERE id = $1 \
             AND lease_token = $2",
        ),
    };
    let steps = Arc::new(Steps::default());
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (db, done, steps) = (db.clone(), done.clone(), steps.clone());
            tokio::spawn(async move {
                let lease = format!("lease-{w}");
                while Instant::now() < until {
                    let id = uuid::Uuid::new_v4().to_string();
                    let now = medrelay::clock::now_millis();
                    let t = Instant::now();
                    either!(&db, |p| sqlx::query(insert)
                        .bind(&id)
                        .bind(now)
                        .execute(p)
                        .await
                        .map(|_| ()))
                    .unwrap_or_else(|e| fail(format!("raw insert: {e}")));
                    Steps::add(&steps.insert, t);
                    let claimed: Option<String> = either!(&db, |p| sqlx::query_scalar(claim)
                        .bind(&lease)
                        .fetch_optional(p)
                        .await)
                    .unwrap_or_else(|e| fail(format!("raw claim: {e}")));
                    if let Some(claimed) = claimed {
                        either!(&db, |p| sqlx::query(complete)
                            .bind(&claimed)
                            .bind(&lease)
                            .execute(p)
                            .await
                            .map(|_| ()))
                        .unwrap_or_else(|e| fail(format!("raw complete: {e}")));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    futures::future::join_all(tasks).await;
    let jobs = done.load(Ordering::Relaxed) as f64;
    steps.report(
        match table {
            Table::Bare => "textbook, own table",
            Table::Jobs => "textbook, medrelay's jobs table",
        },
        jobs,
    );
    jobs / secs as f64
}

async fn xid(db: &Db) -> i64 {
    match db {
        Db::Postgres(p, ..) => sqlx::query_scalar("SELECT txid_current()")
            .fetch_one(p)
            .await
            .unwrap_or_else(|e| fail(format!("txid_current: {e}"))),
        Db::Sqlite(..) => 0,
    }
}

async fn throughput(s: &Settings) -> Vec<Figure> {
    let mut figures = Vec::new();
    for postgres in [false, true] {
        let engine = if postgres { "PostgreSQL" } else { "SQLite" };
        let mut jobs = Figure::new(
            &format!("queue jobs/s, {WORKERS} workers ({engine})"),
            "jobs/s",
            "textbook insert + claim + complete loop, same pool and durability",
            "≥ 0.8×",
        );
        let mut schema = Figure::new(
            &format!("  the textbook loop on medrelay's jobs table ({engine})"),
            "jobs/s",
            "the textbook loop on its own table",
            "— (where the time goes)",
        );
        let mut commits = Figure::new(
            "writing transactions per job (PostgreSQL)",
            "",
            "insert, claim, complete: 3",
            "≤ 3",
        );
        for round in 0..s.rounds {
            let (db, _, drop_it) = database(s, postgres).await;
            // Alternate which goes first.
            let (ours, theirs, per_job) = if round % 2 == 0 {
                let before = xid(&db).await;
                let ours = medrelay_loop(&db, s.secs).await;
                let per_job = (xid(&db).await - before - 1) as f64 / (ours * s.secs as f64);
                (ours, raw_loop(&db, s.secs, Table::Bare).await, per_job)
            } else {
                let theirs = raw_loop(&db, s.secs, Table::Bare).await;
                let before = xid(&db).await;
                let ours = medrelay_loop(&db, s.secs).await;
                let per_job = (xid(&db).await - before - 1) as f64 / (ours * s.secs as f64);
                (ours, theirs, per_job)
            };
            jobs.push(ours, theirs);
            schema.push(raw_loop(&db, s.secs, Table::Jobs).await, theirs);
            if postgres {
                commits.push(per_job, 3.0);
            }
            db.close().await;
            drop_it();
            eprintln!("  {engine} round {}/{}", round + 1, s.rounds);
        }
        figures.push(jobs);
        figures.push(schema);
        if postgres {
            figures.push(commits);
        }
    }
    figures
}

/// Throughput under sustained load: `MEDRELAY_BENCH_SUSTAIN_SECS` of jobs offered at 80 % of
/// the maximum just measured, every finished job left in the table (inside the TTL, as in
/// production), counted in windows of 10 s: the last window against the first.
async fn sustained(s: &Settings) -> Vec<Figure> {
    let secs = env_number("MEDRELAY_BENCH_SUSTAIN_SECS", 60) as u64;
    let mut figures = Vec::new();
    for postgres in [false, true] {
        let engine = if postgres { "PostgreSQL" } else { "SQLite" };
        let (db, _, drop_it) = database(s, postgres).await;
        let max = medrelay_loop(&db, s.secs).await;
        let rate = 0.8 * max;
        let windows = (secs / 10).max(2) as usize;
        let counts: Arc<Vec<AtomicUsize>> =
            Arc::new((0..windows).map(|_| AtomicUsize::new(0)).collect());
        let start = Instant::now();
        let until = start + Duration::from_secs(10 * windows as u64);
        // Each worker offers its share of the rate on a fixed schedule.
        let every = Duration::from_secs_f64(WORKERS as f64 / rate);
        // medrelay's default caps, checked by every insert, and users as a phone app has them:
        // many, each far below the hourly cap over the whole run (at 2,000 jobs/s for ten
        // minutes, about 18 jobs per user). A user past the cap would be refused in service.
        let caps = InsertCaps {
            since: medrelay::clock::now_millis() - 3_600_000,
            active_jobs: 20,
            uploads_per_window: 120,
        };
        let steps = Arc::new(Steps::default());
        let (announcer, announcing) = Announcer::start(&db);
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| {
                let worker = QueueWorker::new(
                    &db,
                    format!("sustain-{w}"),
                    caps,
                    steps.clone(),
                    announcer.clone(),
                );
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut ticks = tokio::time::interval(every);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n = 0usize;
                    while Instant::now() < until {
                        ticks.tick().await;
                        n += 1;
                        let completed = worker.job(&format!("sustain-{w}-{}", n % 4096)).await;
                        let window = (start.elapsed().as_secs() / 10) as usize;
                        if let Some(count) = counts.get(window) {
                            count.fetch_add(completed, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        futures::future::join_all(tasks).await;
        announcer.stop(announcing).await;
        let per_window: Vec<f64> = counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed) as f64 / 10.0)
            .collect();
        eprintln!(
            "  {engine}: maximum {max:.0} jobs/s, offered {rate:.0}; jobs/s per 10 s: {}",
            per_window
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut figure = Figure::new(
            &format!(
                "sustained 80 % load for {} s, last 10 s ({engine})",
                10 * windows
            ),
            "jobs/s",
            "its first 10 s",
            "≥ 0.95× (no decline)",
        );
        figure.push(per_window[windows - 1], per_window[0]);
        figures.push(figure);
        db.close().await;
        drop_it();
    }
    figures
}

// --- 4. polls ---------------------------------------------------------------------------------

async fn polls(bin: &Path, s: &Settings) -> Vec<Figure> {
    let mut figures = Vec::new();
    for postgres in [false, true] {
        let engine = if postgres { "PostgreSQL" } else { "SQLite" };
        let database = if postgres {
            Some(database(s, true).await)
        } else {
            None
        };
        let b64 = |bytes: [u8; 32]| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let key = format!("k1:{}", b64([7; 32]));
        let secret = b64([8; 32]);
        let mut envs: Vec<(&str, &str)> = vec![];
        if let Some((_, url, _)) = &database {
            envs.extend([
                ("MEDRELAY_DATABASE_URL", url.as_str()),
                ("MEDRELAY_MASTER_KEY", key.as_str()),
                ("MEDRELAY_JWT_SECRET", secret.as_str()),
            ]);
        }
        let server = Server::start(
            if postgres { "postgres" } else { "sqlite" },
            bin,
            &envs,
            &s.dir,
        )
        .await;
        let id = support::processed_job(&server, &small_pdf()).await;
        let mut rate = Figure::new(
            &format!("GET /v1/jobs/{{id}} of a finished job, 64 connections ({engine})"),
            "req/s",
            "the same server's /healthz",
            "≥ 0.5×",
        );
        let mut p99 = Figure::new(
            &format!("  its p99 ({engine})"),
            "ms",
            "/healthz's p99",
            "≤ 2×",
        );
        let secs = Duration::from_secs(s.secs);
        for round in 0..s.rounds {
            let job_url = format!("{}/v1/jobs/{id}", server.url);
            let health_url = format!("{}/healthz", server.url);
            let (job, health) = if round % 2 == 0 {
                let job = load_wrk(&job_url, Some(&server.token), 64, secs).await;
                (job, load_wrk(&health_url, None, 64, secs).await)
            } else {
                let health = load_wrk(&health_url, None, 64, secs).await;
                (
                    load_wrk(&job_url, Some(&server.token), 64, secs).await,
                    health,
                )
            };
            rate.push(job.rps, health.rps);
            p99.push(job.p99_ms, health.p99_ms);
            eprintln!("  {engine} round {}/{}", round + 1, s.rounds);
        }
        server.stop().await;
        if let Some((db, _, drop_it)) = database {
            db.close().await;
            drop_it();
        }
        figures.extend([rate, p99]);
    }
    figures
}

// --- 5. uploads -------------------------------------------------------------------------------

/// The minimal sink: `SINK DIR` prints its port, then answers every request with 200 after
/// writing its body to a file in DIR.
struct Sink {
    child: tokio::process::Child,
    url: String,
}

async fn start_sink(sink: &Path, dir: &Path) -> Sink {
    let mut child = Command::new(sink)
        .arg(dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| fail(format!("starting the sink {}: {e}", sink.display())));
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap_or_else(|e| fail(format!("the sink's port: {e}")));
    Sink {
        child,
        url: format!("http://127.0.0.1:{}", line.trim()),
    }
}

fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    support::ticks(&stat, 0) / support::TICKS_PER_S
}

/// Uploads `file` with curl `n` times at once to `url`; seconds of wall time.
async fn curl_uploads(url: &str, token: Option<&str>, file: &Path, n: usize) -> (f64, Vec<String>) {
    let t = Instant::now();
    let runs: Vec<_> = (0..n)
        .map(|_| {
            let mut cmd = Command::new("curl");
            // No `Expect: 100-continue`: the sink does not answer it, and curl would wait a
            // second before sending the body.
            cmd.args([
                "-sS",
                "--fail",
                "-H",
                "Content-Type: application/pdf",
                "-H",
                "Expect:",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()));
            if let Some(token) = token {
                cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
            }
            cmd.arg(url).output()
        })
        .collect();
    let outs = futures::future::join_all(runs).await;
    let took = t.elapsed().as_secs_f64();
    let bodies = outs
        .into_iter()
        .map(|o| {
            let o = o.unwrap_or_else(|e| fail(format!("curl: {e}")));
            if !o.status.success() {
                fail(format!(
                    "curl to {url}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    (took, bodies)
}

/// CPU seconds of AES-256-GCM sealing `len` bytes in 64 KiB segments plus one copy of them,
/// on this thread.
fn seal_and_copy(len: usize) -> f64 {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9u8; 32]).expect("a key"));
    let data = vec![0x5au8; len];
    // Ten times over: /proc counts CPU in ticks of 10 ms.
    const TIMES: usize = 10;
    let t = thread_cpu();
    for _ in 0..TIMES {
        let mut copy = Vec::with_capacity(len);
        copy.extend_from_slice(&data);
        for (i, segment) in copy.chunks_mut(64 * 1024).enumerate() {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    segment,
                )
                .expect("sealing");
            let _ = std::hint::black_box(tag);
        }
        std::hint::black_box(&copy);
    }
    (thread_cpu() - t) / TIMES as f64
}

fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    support::ticks(&stat, 0) / support::TICKS_PER_S
}

async fn uploads(bin: &Path, sink: &Path, s: &Settings) -> Vec<Figure> {
    let work = tempfile::tempdir_in(&s.dir).expect("a temp dir");
    let file = work.path().join("upload.pdf");
    std::fs::write(&file, support::pdf_like(LARGE, 1)).expect("the upload file");
    let sink_dir = work.path().join("sink");
    std::fs::create_dir_all(&sink_dir).expect("the sink's dir");
    let server = Server::start(
        "uploads",
        bin,
        &[
            ("MEDRELAY_ROLES", "api,sweeper"),
            ("MEDRELAY_USER_CONCURRENT_UPLOADS", "64"),
        ],
        &s.dir,
    )
    .await;
    let sink = start_sink(sink, &sink_dir).await;
    let sink_pid = sink.child.id().expect("the sink runs");
    let mut cpu = Figure::new(
        "server CPU per 32 MiB upload",
        "ms",
        "the minimal C sink",
        "≤ 2×",
    );
    let mut aggregate = Figure::new(
        "16 concurrent 32 MiB uploads, aggregate",
        "MiB/s",
        "the same sink",
        "≥ 0.9×",
    );
    let mut crypto = Figure::new(
        "encryption's added server CPU per 32 MiB (medrelay − sink)",
        "ms",
        "AES-256-GCM + one copy of 32 MiB, in process",
        "≤ 1.5×",
    );
    let upload_url = format!("{}/v1/documents", server.url);
    let http = client(16);
    let delete_all = |bodies: Vec<String>| {
        let http = http.clone();
        let server_url = server.url.clone();
        let token = server.token.clone();
        async move {
            for body in bodies {
                let id = support::job_id(&body);
                let _ = http
                    .delete(format!("{server_url}/v1/jobs/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
            }
        }
    };
    // One after the other, CPU summed over all (/proc counts in ticks of 10 ms).
    const ONE_BY_ONE: usize = 8;
    for round in 0..s.rounds {
        let (mut ours, mut theirs) = (0.0, 0.0);
        for _ in 0..ONE_BY_ONE {
            let before = server.cpu();
            let (_, bodies) = curl_uploads(&upload_url, Some(&server.token), &file, 1).await;
            ours += server.cpu() - before;
            delete_all(bodies).await;
            let before = cpu_of(sink_pid);
            curl_uploads(&sink.url, None, &file, 1).await;
            theirs += cpu_of(sink_pid) - before;
        }
        let (ours, theirs) = (
            ours * 1e3 / ONE_BY_ONE as f64,
            theirs * 1e3 / ONE_BY_ONE as f64,
        );
        cpu.push(ours, theirs);
        crypto.push(ours - theirs, seal_and_copy(LARGE) * 1e3);
        let (took, bodies) = curl_uploads(&upload_url, Some(&server.token), &file, 16).await;
        let ours = 16.0 * 32.0 / took;
        delete_all(bodies).await;
        let (took, _) = curl_uploads(&sink.url, None, &file, 16).await;
        aggregate.push(ours, 16.0 * 32.0 / took);
        eprintln!("  round {}/{}", round + 1, s.rounds);
    }
    server.stop().await;
    drop(sink);
    vec![cpu, aggregate, crypto]
}

// --- 6. calls in flight -----------------------------------------------------------------------

/// A Messages API mock: holds each request at least `hold`, and until the gate opens; counts
/// requests in flight.
async fn claude_mock(
    hold: Duration,
    gate: tokio::sync::watch::Receiver<bool>,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use axum::routing::post;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (inside, done) = (in_flight.clone(), answered.clone());
    let app = axum::Router::new().route(
        "/v1/messages",
        post(move || {
            let (inside, done, mut gate) = (inside.clone(), done.clone(), gate.clone());
            async move {
                inside.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                let _ = gate.wait_for(|open| *open).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                axum::Json(serde_json::json!({
                    "id": "msg_bench", "type": "message", "role": "assistant",
                    "model": "claude-bench",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "record_extraction",
                        "input": {
                            "document": {"type": "lab_report", "title": "Blood count",
                                "date": "2026-10-02", "language": "en", "page_count": 1},
                            "summary": "Normal.", "patient": {"name": null, "date_of_birth": null},
                            "providers": [], "diagnoses": [], "medications": [],
                            "lab_results": [], "allergies": [], "procedures": [],
                            "follow_up": [], "text": "bench"}}],
                    "stop_reason": "tool_use",
                    "usage": {"input_tokens": 10, "output_tokens": 10}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the mock");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), in_flight, answered)
}

/// A field of `/proc/PID/status`, trimmed (empty when absent).
fn proc_status(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or(String::new(), |v| v.trim().to_owned())
}

fn rss_mib(pid: u32) -> f64 {
    proc_status(pid, "VmRSS:")
        .split_whitespace()
        .next()
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

async fn in_flight(bin: &Path, s: &Settings) -> Vec<Figure> {
    let n = s.in_flight;
    let mut rss = Figure::new(
        &format!("{n} Claude calls in flight: server RSS"),
        "MiB",
        "— (the goal is absolute)",
        "< 300 MB",
    );
    let mut cpu = Figure::new(
        &format!("{n} Claude calls in flight: server CPU while waiting"),
        "% of a core",
        "— (the goal is absolute)",
        "< 10 %",
    );
    let mut ok = Figure::new(
        &format!("{n} Claude calls in flight: jobs succeeded"),
        "%",
        "— (the goal is absolute)",
        "100 %",
    );
    let pdf = small_pdf();
    for round in 0..s.rounds {
        let (open, gate) = tokio::sync::watch::channel(false);
        let (base, inside, answered) = claude_mock(Duration::from_secs(10), gate).await;
        let workers = n.to_string();
        let server = Server::start(
            "in-flight",
            bin,
            &[
                ("MEDRELAY_PROCESSOR", "anthropic"),
                ("ANTHROPIC_BASE_URL", &base),
                ("ANTHROPIC_API_KEY", "sk-ant-bench"),
                ("MEDRELAY_WORKERS", &workers),
                ("MEDRELAY_ANTHROPIC_CONCURRENCY", &workers),
                ("MEDRELAY_USER_PROVIDER_CALLS_PER_DAY", "1000000"),
                // One user sends them all, 32 at a time; an upload slowed past a second by
                // the load takes a slot of its user's.
                ("MEDRELAY_USER_CONCURRENT_UPLOADS", "64"),
                ("MEDRELAY_LEASE", "5m"),
            ],
            &s.dir,
        )
        .await;
        let http = client(32);
        let ids = Arc::new(parking_lot::Mutex::new(Vec::new()));
        futures::stream::iter(0..n)
            .for_each_concurrent(32, |_| {
                let (http, ids, pdf) = (http.clone(), ids.clone(), pdf.clone());
                let (url, token, log) =
                    (server.url.clone(), server.token.clone(), server.log.clone());
                async move {
                    let response = http
                        .post(format!("{url}/v1/documents"))
                        .bearer_auth(&token)
                        .body(pdf)
                        .send()
                        .await
                        .unwrap_or_else(|e| fail(format!("upload: {e}")));
                    let status = response.status();
                    let answer = response.text().await.unwrap_or_default();
                    if status != reqwest::StatusCode::ACCEPTED {
                        fail(format!(
                            "upload: {status} {answer}; the server's log ends with:\n{}",
                            support::tail(&log)
                        ));
                    }
                    ids.lock().push(support::job_id(&answer));
                }
            })
            .await;
        let deadline = Instant::now() + Duration::from_secs(120);
        while inside.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                fail(format!(
                    "only {} of {n} calls reached the mock",
                    inside.load(Ordering::SeqCst)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // All calls wait: measure the server over 5 s of waiting.
        let before = server.cpu();
        tokio::time::sleep(Duration::from_secs(5)).await;
        cpu.push((server.cpu() - before) / 5.0 * 100.0, f64::NAN);
        rss.push(rss_mib(server.pid), f64::NAN);
        let field = |name: &str| proc_status(server.pid, name);
        eprintln!(
            "    while waiting: threads {}, RSS {} (anonymous {}), file descriptors {}",
            field("Threads:"),
            field("VmRSS:"),
            field("RssAnon:"),
            std::fs::read_dir(format!("/proc/{}/fd", server.pid)).map_or(0, |d| d.count())
        );
        open.send_replace(true);
        let ids = std::mem::take(&mut *ids.lock());
        let mut succeeded = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        for id in &ids {
            loop {
                let job: serde_json::Value = http
                    .get(format!("{}/v1/jobs/{id}", server.url))
                    .bearer_auth(&server.token)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .unwrap_or_else(|e| fail(format!("GET {id}: {e}")))
                    .json()
                    .await
                    .unwrap_or_else(|e| fail(format!("GET {id}: {e}")));
                match job["status"].as_str() {
                    Some("succeeded") => {
                        succeeded += 1;
                        break;
                    }
                    Some("failed") => break,
                    _ if Instant::now() > deadline => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        ok.push(100.0 * succeeded as f64 / n as f64, f64::NAN);
        eprintln!(
            "  round {}/{}: {} answered, {succeeded} succeeded",
            round + 1,
            s.rounds,
            answered.load(Ordering::SeqCst)
        );
        server.stop().await;
    }
    vec![rss, cpu, ok]
}

// --- report -----------------------------------------------------------------------------------

fn triple(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{} / {} / {}",
        fmt(min),
        fmt(median(values.to_vec())),
        fmt(max)
    )
}

fn print_report(figures: &[Figure], s: &Settings, took: Duration) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} rounds; loads of {} s; data dirs in {}; {:.0} s in all.\n",
        s.rounds,
        s.secs,
        s.dir.display(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| what | value min / median / max | baseline (same run) | baseline min / median / max | ratio min / median / max | goal |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for f in figures {
        let has_baseline = f.baselines.iter().all(|b| b.is_finite());
        let (baseline, ratio) = if has_baseline {
            let ratios: Vec<f64> = f
                .values
                .iter()
                .zip(&f.baselines)
                .map(|(v, b)| v / b)
                .collect();
            (triple(&f.baselines), format!("{}×", triple(&ratios)))
        } else {
            ("—".into(), "—".into())
        };
        let _ = writeln!(
            out,
            "| {} | {} {} | {} | {baseline} | {ratio} | {} |",
            f.what,
            triple(&f.values),
            f.unit,
            f.baseline,
            f.goal
        );
    }
    print!("{out}");
}
