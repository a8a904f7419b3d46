//! A local stand-in for Google's OAuth2 token endpoint and FCM's HTTP v1 `messages:send`, as
//! Google documents them: the token endpoint takes a service-account JWT grant (checked: RS256
//! signature by the key in the credentials file, issuer, scope, audience, lifetime) and issues
//! access tokens; the send endpoint records every request and answers from a script.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{self, KeyPair};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine;
use parking_lot::Mutex;
use serde_json::{Value, json};

pub const PROJECT: &str = "medrelay-test";
pub const CLIENT_EMAIL: &str = "push@medrelay-test.iam.gserviceaccount.com";
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A request to `messages:send`, as received.
#[derive(Clone, Debug)]
pub struct Sent {
    pub at: Instant,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// The body as sent, to scan for what must not be in it.
    pub raw: String,
    pub body: Value,
}

/// A JWT grant the token endpoint received: its claims, and whether its signature verified
/// with the credentials' public key.
#[derive(Clone, Debug)]
pub struct Grant {
    pub grant_type: String,
    pub header: Value,
    pub claims: Value,
    pub signature_ok: bool,
}

/// One scripted answer of `messages:send`.
#[derive(Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Value,
}

impl Answer {
    /// An FCM error, with its code in the details as FCM puts it.
    pub fn error(status: u16, canonical: &str, fcm_code: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: json!({"error": {"code": status, "message": "mock error", "status": canonical,
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                             "errorCode": fcm_code}]}}),
        }
    }
}

struct Shared {
    public_key: Vec<u8>,
    token_uri: String,
    grants: Mutex<Vec<Grant>>,
    sent: Mutex<Vec<Sent>>,
    script: Mutex<VecDeque<Answer>>,
    issued: AtomicUsize,
}

pub struct FcmMock {
    /// What `MEDRELAY_FCM_BASE_URL` is set to.
    pub base_url: String,
    /// A service-account key file whose `token_uri` is this mock.
    pub credentials: PathBuf,
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
}

impl FcmMock {
    pub async fn start() -> FcmMock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let token_uri = format!("{base_url}/token");
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = key.as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("service-account.json");
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "mock-key-1",
            "private_key": pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        });
        std::fs::write(&credentials, account.to_string()).unwrap();
        let shared = Arc::new(Shared {
            public_key: key.public_key().as_ref().to_vec(),
            token_uri,
            grants: Mutex::default(),
            sent: Mutex::default(),
            script: Mutex::default(),
            issued: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::post(token))
            .fallback(send)
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FcmMock {
            base_url,
            credentials,
            shared,
            _dir: dir,
        }
    }

    /// The next answers of `messages:send` (after them: 200).
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.shared.script.lock().extend(answers);
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.shared.sent.lock().clone()
    }

    pub fn grants(&self) -> Vec<Grant> {
        self.shared.grants.lock().clone()
    }
}

/// base64url, with or without padding (`gcp_auth` pads; Google accepts both).
fn b64url(part: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()
}

/// A form body's fields (`application/x-www-form-urlencoded`).
fn form_fields(body: &str) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let Some(hex) = bytes.get(i + 1..i + 3)
                && let Ok(b) = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let form_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let form = form_fields(&body);
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let parts: Vec<&str> = assertion.split('.').collect();
    let decoded = (parts.len() == 3)
        .then(|| {
            let header: Value = serde_json::from_slice(&b64url(parts[0])?).ok()?;
            let claims: Value = serde_json::from_slice(&b64url(parts[1])?).ok()?;
            let signature = b64url(parts[2])?;
            let signed = format!("{}.{}", parts[0], parts[1]);
            let ok = signature::UnparsedPublicKey::new(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                &shared.public_key,
            )
            .verify(signed.as_bytes(), &signature)
            .is_ok();
            Some((header, claims, ok))
        })
        .flatten();
    let Some((header, claims, signature_ok)) = decoded else {
        shared.grants.lock().push(Grant {
            grant_type: form.get("grant_type").cloned().unwrap_or_default(),
            header: Value::Null,
            claims: Value::Null,
            signature_ok: false,
        });
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        );
    };
    let grant_type = form.get("grant_type").cloned().unwrap_or_default();
    let valid = signature_ok
        && form_type
        && grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        && header["alg"] == "RS256"
        && claims["iss"] == CLIENT_EMAIL
        && claims["scope"] == SCOPE
        && claims["aud"] == shared.token_uri.as_str()
        && claims["exp"]
            .as_i64()
            .zip(claims["iat"].as_i64())
            .is_some_and(|(e, i)| e > i && e - i <= 3600);
    shared.grants.lock().push(Grant {
        grant_type,
        header,
        claims,
        signature_ok,
    });
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant"})),
        );
    }
    let n = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::OK,
        axum::Json(
            json!({"access_token": format!("ya29.mock-{n}"), "expires_in": 3599, "token_type": "Bearer"}),
        ),
    )
}

async fn send(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    shared.sent.lock().push(Sent {
        at: Instant::now(),
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        raw: body,
    });
    let answer = shared.script.lock().pop_front().unwrap_or(Answer {
        status: 200,
        retry_after: None,
        body: json!({"name": format!("projects/{PROJECT}/messages/0:1")}),
    });
    let mut response = (
        StatusCode::from_u16(answer.status).unwrap(),
        axum::Json(answer.body),
    )
        .into_response();
    if let Some(secs) = answer.retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    response
}
