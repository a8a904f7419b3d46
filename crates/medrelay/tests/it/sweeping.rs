//! The sweeper goes on: an object it cannot delete is counted, logged and retried next round,
//! and never shields the objects listed after it. What it forgets is forgotten in SQLite's
//! files too.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use medrelay::clock::now_millis;
use medrelay::config::Settings;
use medrelay::crypto::Keyring;
use medrelay::db::Db;
use medrelay::lifecycle::{Lifecycle, Rules};
use medrelay::store::Store;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

/// A store that refuses to delete the keys containing `refused` while `refusing` is set.
#[derive(Debug)]
struct RefusingDeletes {
    inner: Arc<dyn ObjectStore>,
    refused: String,
    refusing: Arc<AtomicBool>,
}

impl fmt::Display for RefusingDeletes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RefusingDeletes({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for RefusingDeletes {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        let refused = self.refused.clone();
        let refusing = self.refusing.clone();
        locations
            .then(move |location| {
                let (inner, refused, refusing) = (inner.clone(), refused.clone(), refusing.clone());
                async move {
                    let location = location?;
                    if refusing.load(Ordering::SeqCst) && location.as_ref().contains(&refused) {
                        return Err(object_store::Error::Generic {
                            store: "refusing",
                            source: "this object cannot be deleted now".into(),
                        });
                    }
                    inner.delete(&location).await.map(|()| location)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeletable_object_does_not_stop_the_sweep_and_is_retried() {
    let metrics = medrelay::telemetry::Metrics::global();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("s.db").display()))
        .await
        .unwrap();
    let refusing = Arc::new(AtomicBool::new(true));
    let store = Store::open(&format!("file://{}", dir.path().join("objects").display()))
        .unwrap()
        .wrapped(|inner| {
            Arc::new(RefusingDeletes {
                inner,
                refused: "stuck".into(),
                refusing: refusing.clone(),
            })
        });
    // Three orphans (no job rows), listed in key order with the stuck one in the middle.
    for key in [
        "a/orphan-1/document",
        "b/stuck/document",
        "c/orphan-2/document",
    ] {
        store
            .put(&Path::from(key), Bytes::from_static(b"sealed bytes"))
            .await
            .unwrap();
    }
    let mut settings = Settings::defaults();
    settings.temp_ttl = Duration::from_millis(50);
    let keyring = Keyring::parse(&format!("k1:{}", base64_of([7u8; 32]))).unwrap();
    let lifecycle = Lifecycle::new(
        db.clone(),
        store.clone(),
        keyring,
        Rules::from_settings(&settings),
        None,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The round goes on past the object it cannot delete, and says the round failed nowhere
    // that would stop the next one.
    lifecycle.sweep_objects(now_millis()).await.unwrap();
    let left: Vec<String> = store
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(left, vec!["b/stuck/document".to_owned()]);
    let failures = metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("medrelay_sweep_failures_total "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert!(
        failures >= Some(1.0),
        "the failure is counted: {failures:?}"
    );

    // The next round deletes it once it can be deleted.
    refusing.store(false, Ordering::SeqCst);
    lifecycle.sweep_objects(now_millis()).await.unwrap();
    assert!(store.list_all().await.unwrap().is_empty());
    db.close().await;
}

fn base64_of(bytes: [u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Keys and results cleared from rows are gone from SQLite's files: `secure_delete` zeroes
/// freed cells and overflow pages (without it, a sealed result's overflow pages go to the free
/// list as they were: this test fails), and the sweeper's checkpoint empties the WAL that held
/// the pages as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleared_keys_and_results_survive_nowhere_in_sqlite_files() {
    use medrelay::crypto::WrappedKey;
    use medrelay::db::NewJob;
    use medrelay::ids::{JobId, UserId, UserPrefix};
    use medrelay::model::DeletionReason;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.db");
    let db = Db::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let canary: Vec<u8> = b"WRAPPED-KEY-CANARY-0123456789-".repeat(2);
    let files_hold_canary = || {
        ["f.db", "f.db-wal"].iter().any(|name| {
            std::fs::read(dir.path().join(name))
                .is_ok_and(|bytes| bytes.windows(canary.len()).any(|w| w == canary))
        })
    };
    // A page of jobs, half of them cleared: the cleared ones' keys must go.
    let now = now_millis();
    let ids: Vec<JobId> = (0..20)
        .map(|i| JobId::from_raw(format!("job-{i:02}")))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let bytes = if i % 2 == 0 {
            canary.clone()
        } else {
            vec![b'.'; 60]
        };
        db.insert_job(&NewJob {
            id: id.clone(),
            user_id: UserId::from_raw("u"),
            user_prefix: UserPrefix::from_raw("p"),
            media_type: "application/pdf",
            size_bytes: 1,
            max_attempts: 4,
            idempotency_key: None,
            document_key: WrappedKey {
                kid: "k".into(),
                bytes,
            },
            push_token: None,
            now,
            created_at: now,
            expires_at: now + 3_600_000,
        })
        .await
        .unwrap();
    }
    assert!(
        files_hold_canary(),
        "the key is written (the check can see it)"
    );
    // Half of them succeed with a sealed result large enough for overflow pages, which a
    // cleared column hands to the free list as they were.
    let lease = medrelay::ids::LeaseToken::from_raw("l");
    let claimed = db.claim(&lease, Duration::from_secs(60), 20).await.unwrap();
    assert_eq!(claimed.len(), 20);
    let result = canary.repeat(200);
    for id in ids.iter().skip(1).step_by(2) {
        let key = WrappedKey {
            kid: "k".into(),
            bytes: vec![b'.'; 60],
        };
        assert!(db.complete(id, &lease, &result, &key).await.unwrap());
    }
    for id in &ids {
        db.tombstone_job(id, DeletionReason::DeletedByUser)
            .await
            .unwrap()
            .expect("a live job");
    }
    db.forget_history().await.unwrap();
    assert!(
        !files_hold_canary(),
        "a cleared key or result is left in the files"
    );
    db.close().await;
}

/// An S3 server in front of moto that fails `AbortMultipartUpload` while `failing` is set
/// (every other request passes through).
async fn s3_failing_aborts(failing: Arc<AtomicBool>) -> String {
    use axum::extract::Request;
    use axum::response::IntoResponse;
    let upstream = std::env::var("AWS_ENDPOINT_URL").expect("scripts/test starts moto");
    let http = reqwest::Client::new();
    let router = axum::Router::new().fallback(move |request: Request| {
        let (failing, http, upstream) = (failing.clone(), http.clone(), upstream.clone());
        async move {
            let aborting = request.method() == axum::http::Method::DELETE
                && request
                    .uri()
                    .query()
                    .is_some_and(|q| q.contains("uploadId"));
            if aborting && failing.load(Ordering::SeqCst) {
                return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "injected").into_response();
            }
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let url = format!(
                "{upstream}{}",
                parts.uri.path_and_query().map_or("/", |p| p.as_str())
            );
            let mut forwarded = http.request(parts.method, url).body(body);
            for (name, value) in &parts.headers {
                if name != axum::http::header::HOST {
                    forwarded = forwarded.header(name, value);
                }
            }
            let answer = forwarded.send().await.unwrap();
            let mut response = axum::response::Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            response
                .body(axum::body::Body::from(answer.bytes().await.unwrap()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// A multipart upload a crash left behind keeps its marker while aborting it fails (so the
/// next round tries again), and both go once the abort succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_marker_stays_until_its_upload_is_aborted() {
    let storage = format!("s3://{}/medrelay", crate::harness::fresh_bucket().await);
    let store = Store::open(&storage).unwrap();
    // What a crash mid-upload leaves: a multipart upload with a part, and its marker.
    let path = Path::from("p/crashed-upload/document");
    let mut writer = store.writer(&path);
    writer
        .write(Bytes::from(vec![7u8; 6 * 1024 * 1024]))
        .await
        .unwrap();
    drop(writer);
    let markers = || async {
        store
            .list_all()
            .await
            .unwrap()
            .into_iter()
            .filter(|(p, _)| p.as_ref().starts_with("_uploads/"))
            .count()
    };
    assert_eq!(markers().await, 1);

    let failing = Arc::new(AtomicBool::new(true));
    let endpoint = s3_failing_aborts(failing.clone()).await;
    let sweeper = crate::server::Server::start(&[
        ("MEDRELAY_STORAGE_URL", storage.as_str()),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        (
            "MEDRELAY_MASTER_KEY",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ),
        (
            "MEDRELAY_JWT_SECRET",
            "a-test-secret-of-at-least-thirty-two-bytes",
        ),
        ("MEDRELAY_ROLES", "api,sweeper"),
        ("MEDRELAY_TEMP_TTL", "1s"),
        ("MEDRELAY_SWEEP_INTERVAL", "200ms"),
    ]);
    // Two failed rounds: the abort was retried, and the marker is still there.
    crate::harness::eventually(Duration::from_secs(30), "failed aborts", || async {
        let failures = sweeper.metric("medrelay_sweep_failures_total").await;
        (failures >= 2.0).then_some(()).ok_or(failures.to_string())
    })
    .await;
    assert_eq!(markers().await, 1, "the marker outlives a failed abort");
    let metrics = reqwest::get(format!("{}/metrics", sweeper.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("medrelay_oldest_temporary_object_seconds "),
        "the gauge of the oldest temporary byte is exported"
    );
    failing.store(false, Ordering::SeqCst);
    crate::harness::eventually(Duration::from_secs(30), "the upload aborted", || async {
        let left = markers().await;
        (left == 0).then_some(()).ok_or(left.to_string())
    })
    .await;
}
