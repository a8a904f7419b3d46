//! Test harness: starts the real application on 127.0.0.1:0 with its own data dir, its own
//! database (SQLite file or a fresh PostgreSQL database) and its own store (local folder or a
//! fresh bucket on moto's S3), and drives it over HTTP like the app would.
//!
//! Missing services are failures with a message saying what to start, never silent skips.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medrelay::app::{self, Running};
use medrelay::config::Settings;
use medrelay::db::{Db, JobRow, PurgeRow};
use medrelay::ids::{JobId, UserId, UserPrefix};
use medrelay::lifecycle::Lifecycle;
use medrelay::state::AppState;
use medrelay::store::Store;
use reqwest::StatusCode;
use serde_json::Value;

/// The database and store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    SqliteFolder,
    SqliteS3,
    PostgresFolder,
    PostgresS3,
}

impl Backend {
    pub fn postgres(self) -> bool {
        matches!(self, Backend::PostgresFolder | Backend::PostgresS3)
    }
    pub fn s3(self) -> bool {
        matches!(self, Backend::SqliteS3 | Backend::PostgresS3)
    }
}

/// Generates one `#[tokio::test]` per backend for each named async fn taking a [`Backend`].
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite_folder {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::harness::Backend::SqliteFolder).await } )*
        }
        mod sqlite_s3 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::harness::Backend::SqliteS3).await } )*
        }
        mod postgres_folder {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::harness::Backend::PostgresFolder).await } )*
        }
        mod postgres_s3 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::harness::Backend::PostgresS3).await } )*
        }
    };
}

/// Waits until `check` says yes: it is polled every 20 ms and answers `Ok(value)` when the
/// awaited thing happened, or `Err(what it sees now)`. Fails after `within`, naming `what`
/// and the last thing seen. The one way tests wait for something asynchronous.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh PostgreSQL database; panics with advice when the server is down.
pub async fn fresh_postgres() -> (String, String) {
    let admin = admin_url();
    let name = format!("medrelay_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = connect_admin(&admin).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    (format!("{base}/{name}"), name)
}

fn admin_url() -> String {
    std::env::var("MEDRELAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn connect_admin(admin: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {admin} ({e}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or run scripts/test, or set MEDRELAY_TEST_DATABASE_URL."
            )
        })
}

pub async fn drop_postgres(name: &str) {
    let mut conn = connect_admin(&admin_url()).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await;
}

/// A fresh bucket on the S3 server named by AWS_ENDPOINT_URL (moto in scripts/test).
pub async fn fresh_bucket() -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!(
            "S3 tests need an S3 server: run scripts/test (it starts moto), or start \
             `moto_server -H 127.0.0.1 -p PORT` and set AWS_ENDPOINT_URL=http://127.0.0.1:PORT \
             with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    });
    let bucket = format!("medrelay-{}", uuid::Uuid::new_v4().simple());
    // moto takes an unsigned CreateBucket; object_store has no bucket management.
    let response = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!("S3 server at {endpoint} is not reachable ({e}): run scripts/test")
        });
    assert!(
        response.status().is_success(),
        "creating bucket {bucket}: {}",
        response.status()
    );
    bucket
}

/// Settings for a test app: port 0, its own data dir, fast polling.
pub async fn test_settings(backend: Backend, data_dir: &Path) -> (Settings, Option<String>) {
    let mut s = Settings::defaults();
    s.listen = "127.0.0.1:0".into();
    s.data_dir = data_dir.to_path_buf();
    s.poll_interval = Duration::from_millis(50);
    s.workers = 4;
    // This test binary is not medrelay: the sandbox re-executes the real one.
    s.sandbox_exe = Some(PathBuf::from(env!("CARGO_BIN_EXE_medrelay")));
    let mut pg_name = None;
    if backend.postgres() {
        let (url, name) = fresh_postgres().await;
        s.database_url = Some(url);
        pg_name = Some(name);
    }
    if backend.s3() {
        s.storage_url = Some(format!("s3://{}/medrelay", fresh_bucket().await));
    }
    if s.is_shared_deployment() {
        // A shared deployment generates no keys: configure them, as an operator must.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        s.master_key = Some(medrelay::config::Secret::new(format!(
            "test:{}",
            b64.encode(rand::random::<[u8; 32]>())
        )));
        s.jwt_secret = Some(medrelay::config::Secret::new(
            b64.encode(rand::random::<[u8; 32]>()),
        ));
    }
    (s, pg_name)
}

pub struct TestApp {
    pub backend: Backend,
    pub addr: String,
    pub http: reqwest::Client,
    pub running: Option<Running>,
    pub data_dir: tempfile::TempDir,
    pub settings: Settings,
    pg_name: Option<String>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_custom(backend, tweak, |_| {}).await
    }

    /// Starts the app with a state adjusted by `customize` (for example a scripted processor).
    pub async fn spawn_custom(
        backend: Backend,
        tweak: impl FnOnce(&mut Settings),
        customize: impl FnOnce(&mut AppState),
    ) -> TestApp {
        let data_dir = tempfile::tempdir().expect("a temp dir");
        let (mut settings, pg_name) = test_settings(backend, data_dir.path()).await;
        tweak(&mut settings);
        let mut state = app::build_state(settings.clone())
            .await
            .expect("the state builds");
        customize(&mut state);
        let listener = tokio::net::TcpListener::bind(&settings.listen)
            .await
            .unwrap();
        let running = app::start_with(state, listener)
            .await
            .expect("the app starts");
        TestApp {
            backend,
            addr: format!("http://{}", running.addr),
            http: reqwest::Client::new(),
            running: Some(running),
            data_dir,
            settings,
            pg_name,
        }
    }

    /// Stops the app and starts a new one on the same database, store and data dir.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("a clean stop");
        }
        let running = app::start(self.settings.clone())
            .await
            .expect("the app restarts");
        self.addr = format!("http://{}", running.addr);
        self.running = Some(running);
    }

    pub fn state(&self) -> &AppState {
        &self.running.as_ref().expect("running").state
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.state().lifecycle
    }

    pub fn db(&self) -> &Db {
        self.lifecycle().db()
    }

    pub fn store(&self) -> &Store {
        self.lifecycle().store()
    }

    /// The opaque prefix of a user's objects.
    pub fn user_prefix(&self, user: &str) -> UserPrefix {
        self.lifecycle().user_prefix(&UserId::from_raw(user))
    }

    /// A job's row, live or tombstoned, whoever owns it.
    pub async fn row(&self, id: &str) -> Option<JobRow> {
        self.db()
            .get_job_by_id(&JobId::from_raw(id))
            .await
            .expect("reading a job row")
    }

    /// The purge audit log, newest first.
    pub async fn purges(&self) -> Vec<PurgeRow> {
        self.db().purges().await.expect("reading the purges")
    }

    /// Waits until a purge is recorded as complete; returns the audit log.
    pub async fn wait_purged(&self) -> Vec<PurgeRow> {
        eventually(Duration::from_secs(10), "a completed purge", || async {
            let purges = self.purges().await;
            if purges.iter().any(|p| p.completed_at.is_some()) {
                Ok(purges)
            } else {
                Err(format!("{purges:?}"))
            }
        })
        .await
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.expect("a clean stop");
        }
        if let Some(name) = self.pg_name.take() {
            drop_postgres(&name).await;
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.state()
            .auth
            .mint(user, Duration::from_secs(3600))
            .expect("minting a token")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.addr)
    }

    pub async fn upload(
        &self,
        token: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> reqwest::Response {
        self.http
            .post(self.url("/v1/documents"))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .expect("upload request")
    }

    /// Uploads and returns the job JSON, asserting a 202.
    pub async fn upload_ok(&self, token: &str, bytes: Vec<u8>, content_type: &str) -> Value {
        let response = self.upload(token, bytes, content_type).await;
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["id"].as_str().expect("an id");
        assert_eq!(location.as_deref(), Some(format!("/v1/jobs/{id}").as_str()));
        body
    }

    pub async fn get_job(&self, token: &str, id: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("get job request")
    }

    /// `GET /v1/jobs/{id}` as JSON, whatever the status.
    pub async fn job(&self, token: &str, id: &str) -> Value {
        self.get_job(token, id)
            .await
            .json()
            .await
            .expect("a JSON body")
    }

    /// `DELETE` of a path as this token's user: the status.
    pub async fn delete(&self, token: &str, path: &str) -> StatusCode {
        self.http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("delete request")
            .status()
    }

    /// Polls until the job is succeeded or failed.
    pub async fn wait_terminal(&self, token: &str, id: &str) -> Value {
        let what = format!("job {id} succeeded or failed");
        eventually(Duration::from_secs(60), &what, || async {
            let response = self.get_job(token, id).await;
            assert_eq!(response.status(), StatusCode::OK);
            let job: Value = response.json().await.unwrap();
            match job["status"].as_str() {
                Some("succeeded" | "failed") => Ok(job),
                _ => Err(job.to_string()),
            }
        })
        .await
    }

    /// `GET /v1/jobs` as this token's user: the `jobs` list.
    pub async fn list_jobs(&self, token: &str) -> Vec<Value> {
        let list: Value = self
            .http
            .get(self.url("/v1/jobs"))
            .bearer_auth(token)
            .send()
            .await
            .expect("list request")
            .json()
            .await
            .expect("a job list");
        list["jobs"].as_array().expect("a jobs array").clone()
    }

    /// Polls until the job has `status`; returns it.
    pub async fn wait_status(&self, token: &str, id: &str, status: &str) -> Value {
        let what = format!("job {id} {status}");
        eventually(Duration::from_secs(20), &what, || async {
            let job = self.job(token, id).await;
            if job["status"] == status {
                Ok(job)
            } else {
                Err(job.to_string())
            }
        })
        .await
    }

    /// Polls until the job answers 410 `job-expired`, which must happen `within`.
    pub async fn wait_expired(&self, token: &str, id: &str, within: Duration) {
        let what = format!("job {id} expired (it must not outlive its TTL)");
        let response = eventually(within, &what, || async {
            let response = self.get_job(token, id).await;
            if response.status() == StatusCode::GONE {
                Ok(response)
            } else {
                Err(response.status().to_string())
            }
        })
        .await;
        assert_problem(response, 410, "job-expired").await;
    }

    /// Every object in the store (keys).
    pub async fn objects(&self) -> Vec<String> {
        self.store()
            .list_all()
            .await
            .expect("listing objects")
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect()
    }

    /// Polls until the store is empty, and on a local folder until no file or folder is left
    /// (deletes follow commits, and folders go with their last file).
    pub async fn assert_store_empties(&self) {
        let local = !self.backend.s3();
        eventually(Duration::from_secs(10), "an empty store", || async {
            let objects = self.objects().await;
            let left = if local {
                walk(&self.data_dir.path().join("objects"))
            } else {
                Vec::new()
            };
            if objects.is_empty() && left.is_empty() {
                Ok(())
            } else {
                Err(format!("objects {objects:?}, files {left:?}"))
            }
        })
        .await
    }
}

/// Every file and folder below `dir` (not `dir` itself).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

/// Asserts a problem+json answer with this status and code, and returns it.
pub async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("a problem body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.len() > 10),
        "{body}"
    );
    assert!(body["retryable"].is_boolean(), "{body}");
    assert!(body["title"].is_string(), "{body}");
    body
}

/// Kills every connection to the database `name` (what a failover or an operator does).
/// Returns how many it killed.
pub async fn terminate_backends(name: &str) -> usize {
    let mut conn = connect_admin(&admin_url()).await;
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .fetch_all(&mut conn)
    .await
    .expect("terminating backends");
    killed.len()
}
