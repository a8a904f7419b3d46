//! Operations routes: liveness, readiness, Prometheus metrics. No authentication, no user data.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, Problem};
use crate::model::JobStatus;
use crate::state::AppState;

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// The database and the object store answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String),
        (status = 503, description = "Database or store unreachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    // Not ready is not ready, whatever the cause: 503 either way.
    state
        .lifecycle
        .db()
        .ping()
        .await
        .map_err(ApiError::unavailable)?;
    state
        .lifecycle
        .store()
        .ping()
        .await
        .map_err(ApiError::unavailable)?;
    Ok("ready")
}

/// Prometheus text: jobs by status, upload bytes, outcomes, deletions.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts = state.lifecycle.db().count_by_status().await?;
    for status in JobStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("medrelay_jobs", "status" => status.as_str()).set(n as f64);
    }
    metrics::gauge!("medrelay_jobs_running_here").set(state.lifecycle.running().len() as f64);
    let (uploads, streams) = state.limits.in_flight();
    metrics::gauge!("medrelay_uploads_in_flight").set(uploads as f64);
    metrics::gauge!("medrelay_event_streams_open").set(streams as f64);
    let mut response = (StatusCode::OK, state.metrics.render()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
