//! Push notifications without patient data (issue #15): an upload's `Push-Token` is kept
//! sealed with its job only; when the job ends, one FCM HTTP v1 data-only message (job id and
//! status) goes to it, authorised by an access token from the service-account JWT grant; a
//! deleted job sends nothing; FCM's errors are retried or drop the token. Against a local mock
//! of Google's token endpoint and of `messages:send` (`fcm_mock.rs`).

use std::time::Duration;

use medrelay::ids::JobId;
use medrelay::model::JobStatus;
use medrelay::processor::MediaType;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fcm_mock::{self, Answer, FcmMock};
use crate::fixtures::{corpus_file, png, text_pdf};
use crate::harness::{Backend, TestApp, assert_problem, eventually};
use crate::scripted::{Scripted, Step};

on_every_backend!(
    a_finished_job_pushes_its_id_and_status_and_nothing_else,
    a_job_deleted_before_its_end_pushes_nothing_and_keeps_no_token,
    a_resumable_upload_carries_its_push_token_to_its_job,
);

/// What the phone would send: an FCM registration token.
const DEVICE: &str = "eXk1:APA91bF-device_token.for-tests";
/// Text of the document that must never reach FCM.
const MARKER: &str = "Metoprolol 47.5 mg PUSHMARKER";

async fn app_with_fcm(backend: Backend, fcm: &FcmMock) -> TestApp {
    let (credentials, base) = (fcm.credentials.clone(), fcm.base_url.clone());
    TestApp::spawn_with(backend, move |s| {
        s.fcm_credentials_file = Some(credentials);
        s.fcm_base_url = base;
    })
    .await
}

async fn post_with_push(
    app: &TestApp,
    token: &str,
    body: Vec<u8>,
    content_type: &str,
    device: &str,
) -> reqwest::Response {
    app.http
        .post(app.url("/v1/documents"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .header("push-token", device)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Uploads a PDF with a push token; the job, after asserting a 202.
async fn upload_with_push(app: &TestApp, token: &str, body: Vec<u8>, device: &str) -> Value {
    let response = post_with_push(app, token, body, "application/pdf", device).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.json().await.unwrap()
}

/// Waits for `n` requests to `messages:send`.
async fn wait_sent(fcm: &FcmMock, n: usize) -> Vec<fcm_mock::Sent> {
    eventually(Duration::from_secs(20), "pushes sent", || async {
        let sent = fcm.sent();
        if sent.len() >= n {
            Ok(sent)
        } else {
            Err(format!("{} of {n}; grants: {:?}", sent.len(), fcm.grants()))
        }
    })
    .await
}

/// The request as Google documents it, carrying the job and its end only.
fn assert_push(sent: &fcm_mock::Sent, job_id: &str, status: &str) {
    assert_eq!(
        sent.path,
        format!("/v1/projects/{}/messages:send", fcm_mock::PROJECT)
    );
    let auth = sent.authorization.as_deref().unwrap_or_default();
    assert!(auth.starts_with("Bearer ya29.mock-"), "{auth}");
    assert!(
        sent.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let body = &sent.body;
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let message = body["message"].as_object().unwrap();
    let mut keys: Vec<&str> = message.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["android", "apns", "data", "token"],
        "no notification block"
    );
    assert_eq!(message["token"], DEVICE);
    assert_eq!(message["data"], json!({"job_id": job_id, "status": status}));
    assert_eq!(message["android"]["priority"], "high");
    assert_eq!(message["apns"]["headers"]["apns-push-type"], "background");
    assert_eq!(message["apns"]["headers"]["apns-priority"], "5");
    assert_eq!(
        message["apns"]["payload"],
        json!({"aps": {"content-available": 1}})
    );
    for secret in ["PUSHMARKER", "Metoprolol", "application/pdf", "pdf"] {
        assert!(!sent.raw.contains(secret), "{secret} in {}", sent.raw);
    }
}

async fn a_finished_job_pushes_its_id_and_status_and_nothing_else(backend: Backend) {
    let fcm = FcmMock::start().await;
    let app = app_with_fcm(backend, &fcm).await;
    let token = app.token("pushed");

    let job = upload_with_push(&app, &token, text_pdf(&[MARKER]), DEVICE).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = wait_sent(&fcm, 1).await;
    assert_push(&sent[0], &id, "succeeded");

    // The access token came from a valid JWT grant of the service account.
    let grants = fcm.grants();
    assert!(!grants.is_empty());
    let grant = &grants[0];
    assert!(grant.signature_ok);
    assert_eq!(grant.header["alg"], "RS256");
    assert_eq!(
        grant.grant_type,
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    assert_eq!(grant.claims["scope"], fcm_mock::SCOPE);

    // The token went with the push: nothing of the device is left in the row.
    let row = app.row(&id).await.unwrap();
    assert!(row.push_token.is_none() && row.push_kek.is_none() && row.push_dek.is_none());

    // A refused document fails, and the device hears "failed", nothing more.
    let encrypted = corpus_file("005-libreoffice-writer-password--libreoffice-writer-password.pdf");
    let job = upload_with_push(&app, &token, encrypted, DEVICE).await;
    let failed_id = job["id"].as_str().unwrap().to_owned();
    let done = app.wait_terminal(&token, &failed_id).await;
    assert_eq!(done["status"], "failed", "{done}");
    let sent = wait_sent(&fcm, 2).await;
    assert_push(&sent[1], &failed_id, "failed");
    assert!(!sent[1].raw.contains("password") && !sent[1].raw.contains("encrypted"));

    // A job without a token pushes nothing; each job pushed exactly once.
    let plain = app
        .upload_ok(&token, text_pdf(&["no token"]), "application/pdf")
        .await;
    app.wait_terminal(&token, plain["id"].as_str().unwrap())
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fcm.sent().len(), 2);
    app.stop().await;
}

async fn a_job_deleted_before_its_end_pushes_nothing_and_keeps_no_token(backend: Backend) {
    let fcm = FcmMock::start().await;
    let (credentials, base) = (fcm.credentials.clone(), fcm.base_url.clone());
    let mut gate = None;
    let app = TestApp::spawn_custom(
        backend,
        move |s| {
            s.fcm_credentials_file = Some(credentials);
            s.fcm_base_url = base;
        },
        |state| {
            gate = Some(
                Scripted::new(Step::Gated)
                    .on(MediaType::Png, Step::Panic)
                    .install(state),
            )
        },
    )
    .await;
    let gate = gate.unwrap();
    let token = app.token("deleting");
    let job = upload_with_push(&app, &token, text_pdf(&[MARKER]), DEVICE).await;
    let id = job["id"].as_str().unwrap().to_owned();
    app.wait_status(&token, &id, "processing").await;

    // Kept sealed: the row holds no byte of the token in the clear.
    let row = app.row(&id).await.unwrap();
    let sealed = row.push_token.clone().expect("a sealed token");
    assert!(row.push_kek.is_some() && row.push_dek.is_some());
    assert!(!sealed.windows(DEVICE.len()).any(|w| w == DEVICE.as_bytes()));
    assert!(!sealed.windows(12).any(|w| w == &DEVICE.as_bytes()[..12]));

    assert_eq!(
        app.delete(&token, &format!("/v1/jobs/{id}")).await,
        StatusCode::NO_CONTENT
    );
    let row = app.row(&id).await.unwrap();
    assert!(row.push_token.is_none() && row.push_kek.is_none() && row.push_dek.is_none());
    // The attempt was stopped; the gate stays shut, so no later job can finish here either.

    // A user's purge of everything before the end sends nothing either.
    let job = upload_with_push(&app, &token, text_pdf(&[MARKER]), DEVICE).await;
    let second = job["id"].as_str().unwrap().to_owned();
    app.wait_status(&token, &second, "processing").await;
    assert_eq!(
        app.delete(&token, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    let row = app.row(&second).await.unwrap();
    assert!(row.push_token.is_none() && row.push_dek.is_none());

    // An unmanaged failure (a panicking processor) purges its user: neither the failed job nor
    // the user's other job, still processing, pushes anything.
    let waiting = upload_with_push(&app, &token, text_pdf(&[MARKER]), DEVICE).await;
    let waiting = waiting["id"].as_str().unwrap().to_owned();
    app.wait_status(&token, &waiting, "processing").await;
    let response = post_with_push(&app, &token, png(8, 8), "image/png", DEVICE).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    app.wait_purged().await;
    let row = app.row(&waiting).await.unwrap();
    assert!(row.push_token.is_none() && row.push_dek.is_none());
    // Every job of this test is deleted or purged: whatever attempt still waits may run on
    // now, and none may push.
    gate.add_permits(10);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(fcm.sent().is_empty(), "{:?}", fcm.sent());
    app.stop().await;
}

/// The next tests exercise the FCM client; the database does not matter to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_unavailable_is_retried_and_an_unregistered_token_is_dropped() {
    let fcm = FcmMock::start().await;
    let app = app_with_fcm(Backend::SqliteFolder, &fcm).await;
    let token = app.token("retried");

    // 503 with Retry-After, then 429, then accepted: three requests, one push.
    fcm.script([
        Answer {
            retry_after: Some(1),
            ..Answer::error(503, "UNAVAILABLE", "UNAVAILABLE")
        },
        Answer::error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
    ]);
    let job = upload_with_push(&app, &token, text_pdf(&["retry"]), DEVICE).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let sent = wait_sent(&fcm, 3).await;
    for s in &sent {
        assert_push(s, &id, "succeeded");
    }
    // The first retry waited for FCM's Retry-After (1 s), the second for the backoff.
    assert!(sent[1].at - sent[0].at >= Duration::from_secs(1));
    assert!(sent[2].at - sent[1].at >= Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fcm.sent().len(), 3, "no push after it was accepted");

    // UNREGISTERED: the token is dropped, not retried.
    fcm.script([Answer::error(404, "NOT_FOUND", "UNREGISTERED")]);
    let job = upload_with_push(&app, &token, text_pdf(&["gone"]), DEVICE).await;
    let gone = job["id"].as_str().unwrap().to_owned();
    wait_sent(&fcm, 4).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fcm.sent().len(), 4, "an unregistered token is not retried");
    assert!(app.row(&gone).await.unwrap().push_token.is_none());

    // A token FCM calls malformed is dropped too; an error FCM does not pin on the token (a
    // bare 404: a wrong project or URL) is the operator's to fix, and not retried either.
    fcm.script([
        Answer::error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        Answer {
            status: 404,
            retry_after: None,
            body: json!({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
        },
    ]);
    for n in [5, 6] {
        let job = upload_with_push(&app, &token, text_pdf(&["refused"]), DEVICE).await;
        wait_sent(&fcm, n).await;
        app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fcm.sent().len(), 6, "neither is retried");

    // Every outcome is counted.
    let metrics = app.state().metrics.render();
    for outcome in ["sent", "token_dropped", "rejected"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("medrelay_push_total{{outcome=\"{outcome}\"}}"))),
            "{outcome}"
        );
    }
    assert!(metrics.contains("medrelay_push_retries_total"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_push_token_is_refused_and_without_credentials_none_is_kept() {
    // Without FCM credentials: the header is checked, then not kept.
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| s.roles.worker = false).await;
    let token = app.token("no-push");
    for bad in ["has space", "quote\"d", &"a".repeat(4097)] {
        let response = post_with_push(&app, &token, text_pdf(&["x"]), "application/pdf", bad).await;
        let problem = assert_problem(response, 400, "bad-request").await;
        assert!(problem["detail"].as_str().unwrap().contains("Push-Token"));
    }
    let job = upload_with_push(&app, &token, text_pdf(&["x"]), DEVICE).await;
    let row = app.row(job["id"].as_str().unwrap()).await.unwrap();
    assert!(row.push_token.is_none() && row.push_dek.is_none());
    assert_eq!(
        app.objects().await.len(),
        1,
        "only the accepted upload's object"
    );
    app.stop().await;
}

/// The token is taken once: whichever instance takes it sends, a second take finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_token_is_taken_once() {
    let fcm = FcmMock::start().await;
    let (credentials, base) = (fcm.credentials.clone(), fcm.base_url.clone());
    let app = TestApp::spawn_with(Backend::PostgresFolder, move |s| {
        s.roles.worker = false;
        s.fcm_credentials_file = Some(credentials);
        s.fcm_base_url = base;
    })
    .await;
    let token = app.token("once");
    let job = upload_with_push(&app, &token, text_pdf(&["x"]), DEVICE).await;
    let id = JobId::from_raw(job["id"].as_str().unwrap());
    let row = app.db().get_job_by_id(&id).await.unwrap().unwrap();
    assert_eq!(row.status, JobStatus::Queued);
    assert!(row.push_token.is_some());
    let takes = futures::future::join_all((0..8).map(|_| app.db().take_push_token(&id))).await;
    let taken = takes.into_iter().filter(|t| *t.as_ref().unwrap()).count();
    assert_eq!(taken, 1);
    assert!(
        app.db()
            .get_job_by_id(&id)
            .await
            .unwrap()
            .unwrap()
            .push_token
            .is_none()
    );
    app.stop().await;
}

/// A tus request to `path` with the protocol header and `token`.
fn tus(app: &TestApp, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
    app.http
        .request(method, app.url(path))
        .bearer_auth(token)
        .header("tus-resumable", "1.0.0")
}

async fn a_resumable_upload_carries_its_push_token_to_its_job(backend: Backend) {
    let fcm = FcmMock::start().await;
    let app = app_with_fcm(backend, &fcm).await;
    let token = app.token("pushed");
    let pdf = text_pdf(&[MARKER]);
    let created = tus(&app, reqwest::Method::POST, "/v1/uploads", &token)
        .header("upload-length", pdf.len().to_string())
        .header("push-token", DEVICE)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let path = created.headers()["location"].to_str().unwrap().to_owned();
    let id = path.rsplit('/').next().unwrap().to_owned();
    // Sealed in the upload's row: never in the clear.
    let (sealed,): (Option<Vec<u8>>,) = match app.db() {
        medrelay::db::Db::Sqlite(p, ..) => {
            sqlx::query_as("SELECT push_token FROM uploads WHERE id = $1")
                .bind(&id)
                .fetch_one(p)
                .await
                .unwrap()
        }
        medrelay::db::Db::Postgres(p, ..) => {
            sqlx::query_as("SELECT push_token FROM uploads WHERE id = $1")
                .bind(&id)
                .fetch_one(p)
                .await
                .unwrap()
        }
    };
    let sealed = sealed.expect("kept, sealed");
    assert!(!sealed.windows(DEVICE.len()).any(|w| w == DEVICE.as_bytes()));
    let half = pdf.len() / 2;
    for (from, to) in [(0, half), (half, pdf.len())] {
        let r = tus(&app, reqwest::Method::PATCH, &path, &token)
            .header("upload-offset", from.to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(pdf[from..to].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = wait_sent(&fcm, 1).await;
    assert_eq!(sent.len(), 1);
    assert_push(&sent[0], &id, "succeeded");
    // Nothing of the device is left.
    let row = app.row(&id).await.unwrap();
    assert!(row.push_token.is_none() && row.push_kek.is_none() && row.push_dek.is_none());
}
