//! Resumable uploads (tus 1.0) spoken by hand, on every backend: discovery, creation, offsets,
//! the type decided at the request that tells, checksums, termination, expiry, another user's
//! upload, limits, and the job the last byte makes, whose document is the bytes sent.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::StreamExt;
use futures::future::BoxFuture;
use medrelay::model::DocumentResult;
use medrelay::processor::{CallBudget, Document, ProcessError, Processor};
use medrelay::state::AppState;
use parking_lot::Mutex;
use reqwest::StatusCode;

use crate::fixtures::{corpus_file, heavy_pdf, png};
use crate::harness::{Backend, TestApp, assert_problem, eventually};

on_every_backend!(
    discovery_and_creation_follow_the_protocol,
    a_chunked_upload_becomes_its_job_with_the_bytes_sent,
    a_refused_type_is_refused_where_the_bytes_tell_and_the_upload_ends,
    checksums_keep_or_discard_a_request,
    termination_deletion_and_expiry_leave_nothing,
    racing_requests_commit_one_and_an_upload_resumes_after_a_restart_and_elsewhere,
    a_stalled_request_is_cut_at_its_deadline_and_keeps_what_it_brought,
);

/// The documents the processor received (what the worker opened), by content.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Vec<u8>>>>);

impl Received {
    /// Installs a processor that records each document, then does what the configured one does.
    pub fn install(state: &mut AppState) -> Received {
        let received = Received::default();
        state.processor = Arc::new(Capture {
            received: received.clone(),
            configured: state.processor.clone(),
        });
        received
    }

    pub fn contains(&self, bytes: &[u8]) -> bool {
        self.count(bytes) > 0
    }

    /// How many times this document was processed.
    pub fn count(&self, bytes: &[u8]) -> usize {
        self.0
            .lock()
            .iter()
            .filter(|d| d.as_slice() == bytes)
            .count()
    }
}

struct Capture {
    received: Received,
    configured: Arc<dyn Processor>,
}

impl Processor for Capture {
    fn name(&self) -> &'static str {
        "capture"
    }

    fn process<'a>(
        &'a self,
        document: Document,
        budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>> {
        self.received.0.lock().push(document.bytes.to_vec());
        self.configured.process(document, budget)
    }
}

pub async fn spawn(backend: Backend) -> (TestApp, Received) {
    let mut received = None;
    let app = TestApp::spawn_custom(
        backend,
        |_| {},
        |state| received = Some(Received::install(state)),
    )
    .await;
    (app, received.unwrap())
}

/// A tus request to `path` with the protocol header and `token`.
pub(crate) fn tus(app: &TestApp, method: &str, path: &str, token: &str) -> reqwest::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    app.http
        .request(method, app.url(path))
        .bearer_auth(token)
        .header("tus-resumable", "1.0.0")
}

/// Creates an upload of `length` bytes; returns its path (`/v1/uploads/{id}`).
pub(crate) async fn create(app: &TestApp, token: &str, length: usize) -> String {
    let r = tus(app, "POST", "/v1/uploads", token)
        .header("upload-length", length.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    header(&r, "location")
}

pub(crate) async fn patch(
    app: &TestApp,
    token: &str,
    path: &str,
    offset: usize,
    body: &[u8],
) -> reqwest::Response {
    tus(app, "PATCH", path, token)
        .header("upload-offset", offset.to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

async fn offset(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    tus(app, "HEAD", path, token).send().await.unwrap()
}

pub(crate) fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
        .to_str()
        .unwrap()
        .to_owned()
}

/// How much sooner than the TTL an upload expires: the sweeper's early margin, so that no part
/// of an open upload is swept by its age.
fn margin(app: &TestApp) -> Duration {
    app.settings.sweep_interval.min(app.settings.temp_ttl / 12)
}

fn sha256(bytes: &[u8]) -> aws_lc_rs::digest::Digest {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
}

fn id_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

/// Objects of the store under one upload's id.
async fn objects_of(app: &TestApp, id: &str) -> Vec<String> {
    app.objects()
        .await
        .into_iter()
        .filter(|o| o.contains(id))
        .collect()
}

async fn discovery_and_creation_follow_the_protocol(backend: Backend) {
    let (app, _) = spawn(backend).await;
    let alice = app.token("alice");

    // Discovery needs no token and tells the limits.
    let r = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/v1/uploads"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "tus-version"), "1.0.0");
    let extensions = header(&r, "tus-extension");
    for ext in [
        "creation",
        "creation-with-upload",
        "expiration",
        "termination",
        "checksum",
    ] {
        assert!(extensions.split(',').any(|e| e == ext), "{extensions}");
    }
    assert_eq!(
        header(&r, "tus-max-size"),
        app.settings.max_upload_bytes.to_string()
    );
    assert_eq!(header(&r, "tus-checksum-algorithm"), "sha1,sha256");

    // Every other request needs the version, a token and a length.
    let r = app
        .http
        .post(app.url("/v1/uploads"))
        .bearer_auth(&alice)
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "tus-version"), "1.0.0");
    assert_problem(r, 412, "tus-version-unsupported").await;
    let r = app
        .http
        .post(app.url("/v1/uploads"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    assert_problem(r, 401, "unauthorized").await;
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "bad-request").await;
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-defer-length", "1")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "bad-request").await;
    for bad in ["-1", "ten", "1e3", ""] {
        let r = tus(&app, "POST", "/v1/uploads", &alice)
            .header("upload-length", bad)
            .send()
            .await
            .unwrap();
        assert_problem(r, 400, "bad-request").await;
    }
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-length", "0")
        .send()
        .await
        .unwrap();
    assert_problem(r, 400, "empty-document").await;
    let too_big = app.settings.max_upload_bytes + 1;
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-length", too_big.to_string())
        .send()
        .await
        .unwrap();
    assert_problem(r, 413, "document-too-large").await;

    // A creation: a relative Location, the expiry, the protocol header; metadata is ignored.
    let before = std::time::UNIX_EPOCH
        + Duration::from_millis(medrelay::clock::now_millis() as u64 / 1000 * 1000);
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-length", "1000")
        .header("upload-metadata", "filename ZGlhZ25vc2lzLnBkZg==,empty")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "tus-resumable"), "1.0.0");
    let location = header(&r, "location");
    assert!(location.starts_with("/v1/uploads/"), "{location}");
    let expires = httpdate::parse_http_date(&header(&r, "upload-expires")).unwrap();
    let ttl = expires.duration_since(before).unwrap();
    assert!(
        ttl <= app.settings.temp_ttl + Duration::from_secs(1)
            && ttl + Duration::from_secs(5) + margin(&app) >= app.settings.temp_ttl,
        "{ttl:?}"
    );
    let r = offset(&app, &alice, &location).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "upload-offset"), "0");
    assert_eq!(header(&r, "upload-length"), "1000");
    assert_eq!(header(&r, "cache-control"), "no-store");
    assert!(r.headers().get("upload-metadata").is_none(), "never kept");
    // Not a job until its last byte.
    let r = app.get_job(&alice, id_of(&location)).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Another user's upload does not exist, whatever the verb.
    let mallory = app.token("mallory");
    let r = offset(&app, &mallory, &location).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = patch(&app, &mallory, &location, 0, b"%PDF-1.7").await;
    assert_problem(r, 404, "upload-not-found").await;
    let r = tus(&app, "DELETE", &location, &mallory)
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "upload-not-found").await;
    let r = offset(&app, &alice, &location).await;
    assert_eq!(header(&r, "upload-offset"), "0", "untouched by mallory");
    // X-HTTP-Method-Override replaces the method.
    let r = app
        .http
        .post(app.url(&location))
        .bearer_auth(&alice)
        .header("tus-resumable", "1.0.0")
        .header("x-http-method-override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = offset(&app, &alice, &location).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Unfinished uploads count as active jobs.
    let cap = app.settings.user_active_jobs as usize;
    let mut open = Vec::new();
    for _ in 0..cap {
        open.push(create(&app, &alice, 100).await);
    }
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-length", "100")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_some());
    assert_problem(r, 429, "too-many-requests").await;
    // Deleting the user's data ends their uploads too.
    assert_eq!(
        app.delete(&alice, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    for path in &open {
        assert_eq!(
            offset(&app, &alice, path).await.status(),
            StatusCode::NOT_FOUND
        );
    }
    app.assert_store_empties().await;
}

async fn a_chunked_upload_becomes_its_job_with_the_bytes_sent(backend: Backend) {
    let (app, received) = spawn(backend).await;
    let alice = app.token("alice");
    // Over one part (4 MiB) so that a request spans two; the first request too short to tell
    // the type.
    let pdf = heavy_pdf(2, 2560 * 1024);
    let path = create(&app, &alice, pdf.len()).await;
    let id = id_of(&path).to_owned();

    let r = patch(&app, &alice, &path, 0, &pdf[..300]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{:?}", r.text().await);
    assert_eq!(header(&r, "upload-offset"), "300");
    assert!(r.headers().get("upload-expires").is_some());
    assert!(r.headers().get("medrelay-job").is_none());
    // The wrong offset, the wrong content type, past the length: nothing is kept.
    let r = patch(&app, &alice, &path, 0, &pdf[..300]).await;
    assert_problem(r, 409, "upload-offset-mismatch").await;
    let r = tus(&app, "PATCH", &path, &alice)
        .header("upload-offset", "300")
        .header("content-type", "application/pdf")
        .body(pdf[300..400].to_vec())
        .send()
        .await
        .unwrap();
    assert_problem(r, 415, "upload-content-type").await;
    let mut overlong = pdf[300..].to_vec();
    overlong.push(0);
    let r = patch(&app, &alice, &path, 300, &overlong).await;
    assert_problem(r, 413, "upload-length-exceeded").await;
    assert_eq!(
        header(&offset(&app, &alice, &path).await, "upload-offset"),
        "300"
    );

    let middle = 300 + 4_500_000;
    let r = patch(&app, &alice, &path, 300, &pdf[300..middle]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "upload-offset"), middle.to_string());
    let r = app.get_job(&alice, &id).await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "not a job before its last byte"
    );
    let parts = objects_of(&app, &id).await;
    assert!(
        parts.len() >= 3 && parts.iter().all(|o| o.contains("/part-")),
        "{parts:?}"
    );

    let r = patch(&app, &alice, &path, middle, &pdf[middle..]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "upload-offset"), pdf.len().to_string());
    assert_eq!(header(&r, "medrelay-job"), format!("/v1/jobs/{id}"));
    let job = app.job(&alice, &id).await;
    assert_eq!(job["size_bytes"], pdf.len());
    assert_eq!(job["media_type"], "application/pdf");
    // The parts went with the upload: one document is left.
    let left = objects_of(&app, &id).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].ends_with("/document"), "{left:?}");
    // A HEAD after the end (a client that lost the last answer) finds the job.
    let r = offset(&app, &alice, &path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "upload-offset"), pdf.len().to_string());
    assert_eq!(header(&r, "medrelay-job"), format!("/v1/jobs/{id}"));
    let r = tus(&app, "PATCH", &path, &alice)
        .header("upload-offset", pdf.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "medrelay-job"), format!("/v1/jobs/{id}"));

    let done = app.wait_terminal(&alice, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["document"]["page_count"], 2);
    assert!(
        received.contains(&pdf),
        "the worker read exactly the bytes sent"
    );
    app.assert_store_empties().await;

    // A whole (small) document in the creation request, with a push token nobody uses here.
    let small = png(3, 2);
    let r = tus(&app, "POST", "/v1/uploads", &alice)
        .header("upload-length", small.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .header("push-token", "fcm-token-1")
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "upload-offset"), small.len().to_string());
    let job_path = header(&r, "medrelay-job");
    let location = header(&r, "location");
    assert_eq!(job_path, format!("/v1/jobs/{}", id_of(&location)));
    let done = app.wait_terminal(&alice, id_of(&location)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["media_type"], "image/png");
    assert!(received.contains(&small));
}

async fn a_refused_type_is_refused_where_the_bytes_tell_and_the_upload_ends(backend: Backend) {
    let (app, _) = spawn(backend).await;
    let alice = app.token("alice");
    let text = "Diagnosis: this is not a document type we take. ".repeat(100);
    let path = create(&app, &alice, text.len()).await;
    // Too few bytes to tell: kept.
    let r = patch(&app, &alice, &path, 0, &text.as_bytes()[..200]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Enough to tell: refused, and the upload is gone with everything it held.
    let r = patch(&app, &alice, &path, 200, &text.as_bytes()[200..3000]).await;
    assert_problem(r, 415, "unsupported-media-type").await;
    let r = offset(&app, &alice, &path).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(objects_of(&app, id_of(&path)).await.is_empty());

    // The type must be told within a few requests: tiny first chunks are stopped.
    let path = create(&app, &alice, 5000).await;
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    for i in 0..16 {
        let r = patch(&app, &alice, &path, i * 10, &pdf[i * 10..i * 10 + 10]).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let r = patch(&app, &alice, &path, 160, &pdf[160..170]).await;
    assert_problem(r, 400, "bad-request").await;
    assert_eq!(
        app.delete(&alice, &path.replace("uploads", "jobs")).await,
        StatusCode::NOT_FOUND
    );
    let r = tus(&app, "DELETE", &path, &alice).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // A document shorter than the sniffing window is decided by its last byte.
    let tiny = b"not a pdf".to_vec();
    let path = create(&app, &alice, tiny.len()).await;
    let r = patch(&app, &alice, &path, 0, &tiny).await;
    assert_problem(r, 415, "unsupported-media-type").await;
    assert_eq!(
        offset(&app, &alice, &path).await.status(),
        StatusCode::NOT_FOUND
    );
    app.assert_store_empties().await;
}

async fn checksums_keep_or_discard_a_request(backend: Backend) {
    let (app, received) = spawn(backend).await;
    let alice = app.token("alice");
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    let path = create(&app, &alice, pdf.len()).await;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let with_checksum = |offset: usize, body: &[u8], checksum: String| {
        tus(&app, "PATCH", &path, &alice)
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .header("upload-checksum", checksum)
            .body(body.to_vec())
            .send()
    };
    let first = &pdf[..10_000];
    let wrong = format!("sha256 {}", b64(sha256(b"something else").as_ref()));
    let r = with_checksum(0, first, wrong).await.unwrap();
    assert_problem(r, 460, "checksum-mismatch").await;
    assert_eq!(
        header(&offset(&app, &alice, &path).await, "upload-offset"),
        "0"
    );
    let r = with_checksum(0, first, "md5 AAAA".into()).await.unwrap();
    assert_problem(r, 400, "bad-request").await;
    // A chunk damaged in transit is a checksum mismatch, even when its damage also makes it
    // look like a type the service refuses: the upload survives.
    let mut damaged = first.to_vec();
    damaged[0] = b'X';
    let r = with_checksum(
        0,
        &damaged,
        format!("sha256 {}", b64(sha256(first).as_ref())),
    )
    .await
    .unwrap();
    assert_problem(r, 460, "checksum-mismatch").await;
    assert_eq!(
        header(&offset(&app, &alice, &path).await, "upload-offset"),
        "0"
    );
    let r = with_checksum(0, first, format!("sha256 {}", b64(sha256(first).as_ref())))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let rest = &pdf[10_000..];
    let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, rest);
    let r = with_checksum(10_000, rest, format!("sha1 {}", b64(sha1.as_ref())))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let id = id_of(&path).to_owned();
    assert_eq!(header(&r, "medrelay-job"), format!("/v1/jobs/{id}"));
    let done = app.wait_terminal(&alice, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(received.contains(&pdf));
}

async fn termination_deletion_and_expiry_leave_nothing(backend: Backend) {
    let (app, _) = spawn(backend).await;
    let alice = app.token("alice");
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");

    // No termination while a request turns the upload into its job (423); after, 204.
    let path = create(&app, &alice, pdf.len()).await;
    let busy_until = medrelay::clock::now_millis() + 60_000;
    let sql = "UPDATE uploads SET completing_until = $1, completing_token = 'other' WHERE id = $2";
    match app.db() {
        medrelay::db::Db::Sqlite(p, ..) => {
            sqlx::query(sql)
                .bind(busy_until)
                .bind(id_of(&path))
                .execute(p)
                .await
                .unwrap();
        }
        medrelay::db::Db::Postgres(p, ..) => {
            sqlx::query(sql)
                .bind(busy_until)
                .bind(id_of(&path))
                .execute(p)
                .await
                .unwrap();
        }
    }
    let r = tus(&app, "DELETE", &path, &alice).send().await.unwrap();
    assert!(r.headers().get("retry-after").is_some());
    assert_problem(r, 423, "upload-busy").await;
    let r = patch(&app, &alice, &path, 0, &pdf[..5000]).await;
    assert_problem(r, 423, "upload-busy").await;
    assert_eq!(
        app.delete(&alice, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        offset(&app, &alice, &path).await.status(),
        StatusCode::NOT_FOUND
    );

    // Termination: every byte goes now.
    let path = create(&app, &alice, pdf.len()).await;
    let r = patch(&app, &alice, &path, 0, &pdf[..5000]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(!objects_of(&app, id_of(&path)).await.is_empty());
    let r = tus(&app, "DELETE", &path, &alice).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert!(objects_of(&app, id_of(&path)).await.is_empty());
    assert_eq!(
        offset(&app, &alice, &path).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = patch(&app, &alice, &path, 5000, &pdf[5000..]).await;
    assert_problem(r, 404, "upload-not-found").await;
    app.assert_store_empties().await;
    app.stop().await;

    // Expiry: 410 once past the TTL, then swept: 404, no row, no byte.
    let mut received = None;
    let app = TestApp::spawn_custom(
        backend,
        |s| {
            s.temp_ttl = Duration::from_secs(2);
            s.sweep_interval = Duration::from_secs(3600);
        },
        |state| received = Some(Received::install(state)),
    )
    .await;
    let alice = app.token("alice");
    let path = create(&app, &alice, pdf.len()).await;
    let r = patch(&app, &alice, &path, 0, &pdf[..5000]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = offset(&app, &alice, &path).await;
    assert_eq!(r.status(), StatusCode::GONE);
    let r = patch(&app, &alice, &path, 5000, &pdf[5000..]).await;
    assert_problem(r, 410, "upload-expired").await;
    medrelay::sweeper::sweep(app.state()).await.unwrap();
    assert_eq!(
        offset(&app, &alice, &path).await.status(),
        StatusCode::NOT_FOUND
    );
    let id = medrelay::ids::JobId::from_raw(id_of(&path));
    let user = medrelay::ids::UserId::from_raw("alice");
    assert!(app.db().get_upload(&user, &id).await.unwrap().is_none());
    app.assert_store_empties().await;
}

async fn racing_requests_commit_one_and_an_upload_resumes_after_a_restart_and_elsewhere(
    backend: Backend,
) {
    let (mut app, _) = spawn(backend).await;
    let alice = app.token("alice");
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    let path = create(&app, &alice, pdf.len()).await;
    // Two requests at the same offset (a client retrying while its first request still runs):
    // one commits, the other is told the offset moved, and no part of it is left.
    let (a, b) = tokio::join!(
        patch(&app, &alice, &path, 0, &pdf[..8000]),
        patch(&app, &alice, &path, 0, &pdf[..12_000]),
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert!(
        statuses == [204, 409] || statuses == [204, 423],
        "{statuses:?}"
    );
    let winner = if a.status() == StatusCode::NO_CONTENT {
        a
    } else {
        b
    };
    let at: usize = header(&winner, "upload-offset").parse().unwrap();
    eventually(
        Duration::from_secs(5),
        "the loser's part removed",
        || async {
            let parts = objects_of(&app, id_of(&path)).await;
            (parts.len() == 1).then_some(()).ok_or(format!("{parts:?}"))
        },
    )
    .await;

    // The offset lives in the database: a restarted instance resumes the upload, and so does
    // another instance on the same database and store, request by request.
    app.restart().await;
    let r = offset(&app, &alice, &path).await;
    assert_eq!(header(&r, "upload-offset"), at.to_string());
    let other = medrelay::app::start(app.settings.clone()).await.unwrap();
    let elsewhere = format!("http://{}{path}", other.addr);
    let middle = at + (pdf.len() - at) / 2;
    let r = app
        .http
        .patch(&elsewhere)
        .bearer_auth(&alice)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", at.to_string())
        .header("content-type", "application/offset+octet-stream")
        .body(pdf[at..middle].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = offset(&app, &alice, &path).await;
    assert_eq!(header(&r, "upload-offset"), middle.to_string());
    let r = patch(&app, &alice, &path, middle, &pdf[middle..]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    other.stop().await.unwrap();
    let done = app.wait_terminal(&alice, id_of(&path)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["document"]["page_count"], 4);
}

async fn a_stalled_request_is_cut_at_its_deadline_and_keeps_what_it_brought(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.upload_deadline = Duration::from_secs(1)).await;
    let alice = app.token("alice");
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    let path = create(&app, &alice, pdf.len()).await;
    let first = pdf[..8000].to_vec();
    // 8000 bytes, then nothing: a phone whose network stalled.
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Vec::new())
        }),
    );
    let started = std::time::Instant::now();
    let sent = tus(&app, "PATCH", &path, &alice)
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .header("content-length", pdf.len().to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut at the deadline"
    );
    drop(sent);
    eventually(
        Duration::from_secs(5),
        "the stalled request's bytes",
        || async {
            let r = offset(&app, &alice, &path).await;
            let at = header(&r, "upload-offset");
            (at == "8000").then_some(()).ok_or(at)
        },
    )
    .await;
    let r = patch(&app, &alice, &path, 8000, &pdf[8000..]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let done = app.wait_terminal(&alice, id_of(&path)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}
