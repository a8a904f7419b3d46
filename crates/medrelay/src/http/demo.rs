//! `GET /demo`: one small page to try the service in a browser (sign in, send a document,
//! follow its job, read the result, delete it). HTML, CSS and JavaScript are embedded in the
//! binary and served with a strict Content-Security-Policy: nothing inline, nothing fetched
//! from anywhere but this server. Served only where `MEDRELAY_DEMO` is on (by default with
//! the embedded defaults, off on PostgreSQL or S3).
//!
//! `POST /demo/token` mints a development token for a user name, only on a developer's machine:
//! the token secret generated there (never with a configured secret or an identity provider),
//! a loopback listen address, and a request whose `Host` and `Origin` name the loopback.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::Settings;
use crate::error::ApiError;
use crate::state::AppState;

const INDEX: &str = include_str!("demo/index.html");
const APP_JS: &str = include_str!("demo/app.js");
const APP_CSS: &str = include_str!("demo/app.css");
const ICON: &str = include_str!("demo/icon.svg");

/// Nothing inline, nothing third-party: scripts, styles and requests from this server only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";
/// How long a development token lasts.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The demo's routes, where it is served.
pub fn routes(settings: &Settings) -> Router<AppState> {
    let router = Router::new()
        .route(
            "/demo",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/demo/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/demo/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/demo/icon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        );
    if settings.generates_token_secret() {
        router.route(
            "/demo/token",
            axum::routing::post(dev_token).options(|| async { StatusCode::NO_CONTENT }),
        )
    } else {
        router
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether `Host` (and `Origin`, when sent) name this machine's loopback.
fn local_host(headers: &HeaderMap) -> bool {
    let loopback = |authority: &str| {
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        };
        matches!(host, "localhost" | "127.0.0.1" | "[::1]")
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    host.is_some_and(loopback)
        && origin.is_none_or(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .is_some_and(loopback)
        })
}

#[derive(Deserialize)]
struct TokenRequest {
    user: String,
}

/// A development token for `user` (the demo's sign-in, on a machine that generated its own
/// token secret).
async fn dev_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(request): Json<TokenRequest>,
) -> Result<Response, ApiError> {
    // Only for a page of this machine: a web page elsewhere that rebinds its name to the
    // loopback address (DNS rebinding) sends its own Host and Origin.
    if !local_host(&headers) {
        return Err(ApiError::RouteNotFound);
    }
    let user = request.user.trim();
    let valid = (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ApiError::BadRequest(
            "the user name must be 1 to 64 letters, digits, dots, dashes or underscores",
        ));
    }
    let token = state
        .auth
        .mint(user, DEV_TOKEN_TTL)
        .map_err(ApiError::internal)?;
    let mut response = Json(serde_json::json!({ "token": token })).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
