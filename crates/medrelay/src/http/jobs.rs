//! Job routes: poll one, list mine, follow one by server-sent events, delete one, delete all of
//! mine. A job of another user is answered exactly as one that does not exist.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::User;
use crate::error::{ApiError, Problem};
use crate::ids::JobId;
use crate::lifecycle::{DeleteOutcome, Lookup};
use crate::limits::{Permit, STREAM_SLOT_RENEW};
use crate::model::{DeletionReason, Job, JobList, JobStatus};
use crate::state::AppState;

/// How often an event stream re-reads its job when no change was announced. Changes are
/// announced in-process, and across instances by PostgreSQL's NOTIFY; this is a safety net
/// for a missed notification (a reconnecting listener), not the delivery path.
const EVENTS_RECHECK: Duration = Duration::from_secs(10);

/// The live job of this user as the app sees it, or the error the app should see.
async fn live_job(state: &AppState, user: &User, id: &JobId) -> Result<Job, ApiError> {
    match state.lifecycle.lookup(&user.id, id).await? {
        Lookup::Live(row) => Ok(state.lifecycle.view(&row)?),
        Lookup::Expired => Err(ApiError::JobExpired),
        Lookup::Missing => Err(ApiError::JobNotFound),
    }
}

/// Seconds until polling again is useful.
fn poll_after(job: &Job) -> Option<u64> {
    match job.status {
        JobStatus::Succeeded | JobStatus::Failed => None,
        JobStatus::Queued | JobStatus::Processing => Some(2),
        JobStatus::RetryScheduled => {
            let wait = job
                .next_attempt_at
                .map(|at| (at - crate::clock::now()).whole_seconds())
                .unwrap_or(2);
            Some(wait.clamp(1, 600) as u64)
        }
    }
}

/// Poll one job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job; while not terminal it carries Retry-After", body = Job,
            headers(("Retry-After" = Option<u64>, description = "While the job is not terminal: seconds until a poll is useful"))),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job (or another user's)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The job expired and its data was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn get_job(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<JobId>,
) -> Result<Response, ApiError> {
    let job = live_job(&state, &user, &id).await?;
    let retry_after = poll_after(&job);
    let mut response = axum::Json(job).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The caller's jobs, newest first.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's jobs, newest first", body = JobList),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn list_jobs(State(state): State<AppState>, user: User) -> Result<Response, ApiError> {
    let jobs = state.lifecycle.list(&user.id).await?;
    let mut response = axum::Json(JobList { jobs }).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Cancel a job if still running and delete its document, result and keys now.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 404, description = "No such job (or another user's)", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn delete_job(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<JobId>,
) -> Result<StatusCode, ApiError> {
    match state.lifecycle.delete_job(&user.id, &id).await? {
        DeleteOutcome::Deleted | DeleteOutcome::AlreadyGone => Ok(StatusCode::NO_CONTENT),
        DeleteOutcome::NotFound => Err(ApiError::JobNotFound),
    }
}

/// Delete all temporary data of the caller now.
#[utoipa::path(
    delete,
    path = "/v1/me/data",
    tag = "jobs",
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Everything of the caller is deleted"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn delete_my_data(
    State(state): State<AppState>,
    user: User,
) -> Result<StatusCode, ApiError> {
    state
        .lifecycle
        .delete_user_data(&user.id, DeletionReason::AllDataDeletedByUser)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Follow one job: an event `job` with the Job at once and on every change; the stream ends
/// after a terminal state.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "text/event-stream of `job` events, each carrying a Job", content_type = "text/event-stream"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job (or another user's)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The job expired and its data was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many open event streams (per user or per instance); carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn job_events(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<JobId>,
) -> Result<Response, ApiError> {
    let first = live_job(&state, &user, &id).await?;
    if first.status.is_terminal() {
        // One event and the end: nothing stays open, so no stream slot is taken (and the
        // answer costs no write).
        let once = futures::stream::once(std::future::ready(event(&first)));
        return Ok(Sse::new(once).into_response());
    }
    let prefix = state.lifecycle.user_prefix(&user.id);
    // Held (and renewed) while the stream is open; released when it ends.
    let permit = state.limits.admit_stream(&prefix).await?;
    let stream = job_stream(state, user, first, permit);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn job_stream(
    state: AppState,
    user: User,
    first: Job,
    permit: Permit,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut changes = state.lifecycle.subscribe();
    async_stream(move |tx| async move {
        let mut renew = tokio::time::interval(STREAM_SLOT_RENEW);
        renew.tick().await;
        let id = first.id.clone();
        let mut last = (first.status, first.updated_at);
        let done = first.status.is_terminal();
        if tx.send(event(&first)).await.is_err() || done {
            return;
        }
        loop {
            let recheck = tokio::select! {
                // The client left: stop re-reading the job.
                _ = tx.closed() => return,
                changed = changes.recv() => match changed {
                    Ok(changed_id) => changed_id == id,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return,
                },
                _ = tokio::time::sleep(EVENTS_RECHECK) => true,
                _ = renew.tick() => {
                    permit.renew().await;
                    continue;
                }
            };
            if !recheck {
                continue;
            }
            let job = match live_job(&state, &user, &id).await {
                Ok(job) => job,
                // Deleted or expired: nothing more will happen to it.
                Err(_) => return,
            };
            if (job.status, job.updated_at) == last {
                continue;
            }
            last = (job.status, job.updated_at);
            let done = job.status.is_terminal();
            if tx.send(event(&job)).await.is_err() || done {
                return;
            }
        }
    })
}

fn event(job: &Job) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event("job")
        .id(format!(
            "{}",
            job.updated_at.unix_timestamp_nanos() / 1_000_000
        ))
        .json_data(job)
        .unwrap_or_else(|_| Event::default().event("job").data("{}")))
}

/// A stream fed by a task through a small channel (the task ends when the client leaves).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
