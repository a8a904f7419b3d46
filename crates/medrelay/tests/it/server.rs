//! A real `medrelay serve` process on a fresh data dir, driven from outside as an operator
//! and the app would: its address, tokens from `medrelay token`, SIGTERM, its memory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Backend, eventually, fresh_bucket, fresh_postgres};

pub const BIN: &str = env!("CARGO_BIN_EXE_medrelay");

/// A `medrelay serve` child process on a fresh data dir.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The admin address, when `MEDRELAY_ADMIN_LISTEN` was set.
    pub admin: Option<String>,
    /// The token secret given in the environment, if any (else the data dir's).
    jwt_secret: Option<String>,
    data_dir: std::path::PathBuf,
    _owned: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(envs: &[(&str, &str)]) -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        Self::start_in(data_dir, envs, &[])
    }

    pub fn start_in(data_dir: tempfile::TempDir, envs: &[(&str, &str)], args: &[&str]) -> Server {
        let mut server = Self::start_at(data_dir.path(), envs, args);
        server._owned = Some(data_dir);
        server
    }

    /// Starts on a folder the caller keeps (to restart on the same data after a kill).
    pub fn start_at(data_dir: &Path, envs: &[(&str, &str)], args: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(data_dir)
            .args(args)
            .arg("serve")
            .env("MEDRELAY_LISTEN", "127.0.0.1:0")
            .env("MEDRELAY_DATA_DIR", data_dir.join("data"))
            .env("MEDRELAY_POLL_INTERVAL", "100ms")
            .env_remove("MEDRELAY_DATABASE_URL")
            .env_remove("MEDRELAY_STORAGE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(log) = envs
            .iter()
            .find(|(k, _)| *k == "TEST_STDERR_FILE")
            .map(|(_, v)| *v)
        {
            cmd.stderr(std::fs::File::create(log).unwrap());
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // A shared deployment (PostgreSQL or S3) generates no keys: give it the data dir's
        // own, derived from its path, so that a restart on the same dir finds them again.
        let env = |name: &str| envs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let shared = env("MEDRELAY_DATABASE_URL").is_some_and(|u| u.starts_with("postgres"))
            || env("MEDRELAY_STORAGE_URL").is_some_and(|u| u.starts_with("s3://"));
        let mut jwt_secret = env("MEDRELAY_JWT_SECRET").map(str::to_owned);
        if shared && env("MEDRELAY_MASTER_KEY").is_none() {
            cmd.env(
                "MEDRELAY_MASTER_KEY",
                format!("test:{}", derived_secret(data_dir, "master key")),
            );
        }
        if shared && jwt_secret.is_none() && env("MEDRELAY_JWKS_URL").is_none() {
            let secret = derived_secret(data_dir, "token secret");
            cmd.env("MEDRELAY_JWT_SECRET", &secret);
            jwt_secret = Some(secret);
        }
        let mut child = cmd.spawn().expect("starting medrelay serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve prints its address");
        let addr = line
            .split("listening on ")
            .nth(1)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_owned();
        assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
        assert!(!addr.ends_with(":0"), "the real port is printed: {addr}");
        let admin = env("MEDRELAY_ADMIN_LISTEN").map(|_| {
            let line = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("serve prints its admin address");
            line.strip_prefix("admin listening on ")
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .trim()
                .to_owned()
        });
        Server {
            child,
            addr,
            admin,
            jwt_secret,
            data_dir: data_dir.to_path_buf(),
            _owned: None,
        }
    }

    pub fn data(&self) -> std::path::PathBuf {
        self.data_dir.join("data")
    }

    pub fn token(&self, user: &str) -> String {
        let mut cmd = Command::new(BIN);
        cmd.args(["token", "--user", user])
            .env("MEDRELAY_DATA_DIR", self.data());
        if let Some(secret) = &self.jwt_secret {
            cmd.env("MEDRELAY_JWT_SECRET", secret);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `POST /v1/documents` of `body` as this token's user, which must be accepted: the Job.
    pub async fn upload(&self, token: &str, body: Vec<u8>) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/documents", self.addr))
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    /// `GET /v1/jobs/{id}` as this token's user: the body, whatever the status.
    pub async fn job(&self, token: &str, id: &str) -> Value {
        reqwest::Client::new()
            .get(format!("{}/v1/jobs/{id}", self.addr))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null)
    }

    /// `GET /v1/jobs` as this token's user: the `jobs` list.
    pub async fn list_jobs(&self, token: &str) -> Vec<Value> {
        let list: Value = reqwest::Client::new()
            .get(format!("{}/v1/jobs", self.addr))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["jobs"].as_array().unwrap().clone()
    }

    /// The value of one series of `/metrics` (0 when it was never counted), read where the
    /// operations routes are served.
    pub async fn metric(&self, series: &str) -> f64 {
        let base = self.admin.as_deref().unwrap_or(&self.addr);
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// The server's database and store, opened as it opened them from `envs`.
    pub async fn backends(
        &self,
        envs: &[(&str, &str)],
    ) -> (medrelay::db::Db, medrelay::store::Store) {
        let env = |name: &str| {
            envs.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        let data = self.data();
        let db = medrelay::db::Db::connect(
            &env("MEDRELAY_DATABASE_URL")
                .unwrap_or_else(|| format!("sqlite://{}", data.join("medrelay.db").display())),
        )
        .await
        .unwrap();
        let store = medrelay::store::Store::open(
            &env("MEDRELAY_STORAGE_URL")
                .unwrap_or_else(|| format!("file://{}", data.join("objects").display())),
        )
        .unwrap();
        (db, store)
    }

    /// Peak and current resident memory of the server, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn wait_terminal(http: &reqwest::Client, addr: &str, token: &str, id: &str) -> Value {
    let what = format!("job {id} succeeded or failed");
    eventually(Duration::from_secs(60), &what, || async {
        let job: Value = http
            .get(format!("{addr}/v1/jobs/{id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match job["status"].as_str() {
            Some("succeeded" | "failed") => Ok(job),
            _ => Err(job.to_string()),
        }
    })
    .await
}

/// The environment of a server on `backend`: a fresh PostgreSQL database and a fresh bucket
/// where it uses them. Returns the variables and the database's name, to drop at the end.
pub async fn backend_env(backend: Backend) -> (Vec<(&'static str, String)>, Option<String>) {
    let mut envs = Vec::new();
    let mut pg_name = None;
    if backend.postgres() {
        let (url, name) = fresh_postgres().await;
        envs.push(("MEDRELAY_DATABASE_URL", url));
        pg_name = Some(name);
    }
    if backend.s3() {
        envs.push((
            "MEDRELAY_STORAGE_URL",
            format!("s3://{}/medrelay", fresh_bucket().await),
        ));
    }
    (envs, pg_name)
}

/// 32 bytes derived from a data dir's path and `what`, in base64: stable for the dir.
fn derived_secret(data_dir: &Path, what: &str) -> String {
    use base64::Engine;
    let mut input = data_dir.as_os_str().as_encoded_bytes().to_vec();
    input.extend_from_slice(what.as_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}
