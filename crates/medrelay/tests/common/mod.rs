//! Test harness: starts the real application on 127.0.0.1:0 with its own data dir, its own
//! database (SQLite file or a fresh PostgreSQL database) and its own store (local folder or a
//! fresh bucket on moto's S3), and drives it over HTTP like the app would.
//!
//! Missing services are failures with a message saying what to start, never silent skips.

#![allow(dead_code)]

pub mod claude_mock;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medrelay::app::{self, Running};
use medrelay::config::Settings;
use reqwest::StatusCode;
use serde_json::Value;

pub const CORPUS: &str = "../../../shared/corpus/pdf-real";

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
               async fn $name() { super::$name($crate::common::Backend::SqliteFolder).await } )*
        }
        mod sqlite_s3 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::common::Backend::SqliteS3).await } )*
        }
        mod postgres_folder {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::common::Backend::PostgresFolder).await } )*
        }
        mod postgres_s3 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name($crate::common::Backend::PostgresS3).await } )*
        }
    };
}

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(CORPUS)
}

pub fn corpus_file(name: &str) -> Vec<u8> {
    let path = corpus_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh PostgreSQL database; panics with advice when the server is down.
pub async fn fresh_postgres() -> (String, String) {
    let admin = std::env::var("MEDRELAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("medrelay_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = connect_admin(&admin).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    (format!("{base}/{name}"), name)
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
    let admin = std::env::var("MEDRELAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = connect_admin(&admin).await;
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
    let mut pg_name = None;
    if backend.postgres() {
        let (url, name) = fresh_postgres().await;
        s.database_url = Some(url);
        pg_name = Some(name);
    }
    if backend.s3() {
        s.storage_url = Some(format!("s3://{}/medrelay", fresh_bucket().await));
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
        let data_dir = tempfile::tempdir().expect("a temp dir");
        let (mut settings, pg_name) = test_settings(backend, data_dir.path()).await;
        tweak(&mut settings);
        let running = app::start(settings.clone()).await.expect("the app starts");
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

    /// Starts the app with a state adjusted by `customize` (for example a slow processor).
    pub async fn spawn_custom(
        backend: Backend,
        tweak: impl FnOnce(&mut Settings),
        customize: impl FnOnce(&mut medrelay::app::AppState),
    ) -> TestApp {
        let data_dir = tempfile::tempdir().expect("a temp dir");
        let (mut settings, pg_name) = test_settings(backend, data_dir.path()).await;
        tweak(&mut settings);
        let mut state = medrelay::app::AppState::new(settings.clone())
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

    pub fn state(&self) -> &medrelay::app::AppState {
        &self.running.as_ref().expect("running").state
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

    /// Polls until the job is succeeded or failed, with a deadline.
    pub async fn wait_terminal(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = self.get_job(token, id).await;
            assert_eq!(response.status(), StatusCode::OK);
            let job: Value = response.json().await.unwrap();
            let status = job["status"].as_str().unwrap();
            if status == "succeeded" || status == "failed" {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {status} after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Polls until the job has `status`, with a deadline; returns it.
    pub async fn wait_status(&self, token: &str, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let job: Value = self.get_job(token, id).await.json().await.unwrap();
            if job["status"] == status {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never {status}: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the job answers 410 `job-expired`, which must happen `within`.
    pub async fn wait_expired(&self, token: &str, id: &str, within: Duration) {
        let started = Instant::now();
        loop {
            let response = self.get_job(token, id).await;
            if response.status() == StatusCode::GONE {
                assert_problem(response, 410, "job-expired").await;
                return;
            }
            assert!(started.elapsed() < within, "job {id} outlived its TTL");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every object in the store (keys and sizes).
    pub async fn objects(&self) -> Vec<String> {
        self.state()
            .store
            .list_all()
            .await
            .expect("listing objects")
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect()
    }

    /// Polls until the store is empty, and on a local folder until no file or folder is left,
    /// with a deadline (deletes follow commits, and folders go with their last file).
    pub async fn assert_store_empties(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let local = matches!(
            self.backend,
            Backend::SqliteFolder | Backend::PostgresFolder
        );
        loop {
            let objects = self.objects().await;
            let left = if local {
                walk(&self.data_dir.path().join("objects"))
            } else {
                Vec::new()
            };
            if objects.is_empty() && left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: objects {objects:?}, files in the object folder {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// A minimal valid PNG of `w` x `h` pixels (grey, uncompressed deflate blocks).
pub fn png(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG");
    out.into_inner()
}

pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 120, 40]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encoding a JPEG");
    out.into_inner()
}

pub fn webp(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba([10, 200, 40, 255]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::WebP)
        .expect("encoding a WebP");
    out.into_inner()
}

/// A one-page PDF whose text is `lines`, built with lopdf (Helvetica, Flate-compressed).
pub fn text_pdf(lines: &[&str]) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let mut operations = vec![
        Operation::new("BT", vec![]),
        Operation::new("Tf", vec!["F1".into(), 12.into()]),
        Operation::new("Td", vec![50.into(), 750.into()]),
        Operation::new("TL", vec![16.into()]),
    ];
    for line in lines {
        operations.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
        operations.push(Operation::new("T*", vec![]));
    }
    operations.push(Operation::new("ET", vec![]));
    let content = Content { operations };
    let mut stream = Stream::new(dictionary! {}, content.encode().unwrap());
    stream.compress().expect("flate compression");
    let content_id = doc.add_object(stream);
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saving a PDF");
    out
}

/// A PDF with one page per entry of `pages`, each showing its text.
pub fn pages_pdf(pages: &[String]) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font_id } });
    let mut kids = Vec::new();
    for text in pages {
        let content = Content {
            operations: vec![
                Operation::new("BT", vec![]),
                Operation::new("Tf", vec!["F1".into(), 12.into()]),
                Operation::new("Td", vec![50.into(), 750.into()]),
                Operation::new("Tj", vec![Object::string_literal(text.as_str())]),
                Operation::new("ET", vec![]),
            ],
        };
        let content_id = doc.add_object(lopdf::Stream::new(
            dictionary! {},
            content.encode().unwrap(),
        ));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
        });
        kids.push(page_id.into());
    }
    let count = kids.len() as i64;
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => kids, "Count" => count,
            "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saving a PDF");
    out
}

/// A PDF of `pages` pages, each carrying `bytes_per_page` of incompressible image-like data.
pub fn heavy_pdf(pages: usize, bytes_per_page: usize) -> Vec<u8> {
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let mut kids = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..pages {
        let data: Vec<u8> = (0..bytes_per_page)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let image = doc.add_object(Stream::new(
            dictionary! {"Type" => "XObject", "Subtype" => "Image", "Width" => 1024, "Height" => (bytes_per_page / 1024) as i64,
                         "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8},
            data,
        ));
        let content = doc.add_object(Stream::new(
            dictionary! {},
            b"q 595 0 0 842 0 0 cm /Im0 Do Q".to_vec(),
        ));
        let page = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content,
            "Resources" => dictionary! {"XObject" => dictionary! {"Im0" => image}},
        });
        kids.push(page.into());
    }
    let count = kids.len() as i64;
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => kids, "Count" => count,
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
    doc.trailer.set("Root", catalog);
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}
