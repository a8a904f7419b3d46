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

use crate::app::AppState;
use crate::auth::User;
use crate::crypto::{self, Binding};
use crate::db::JobRow;
use crate::error::{ApiError, Problem};
use crate::model::{DocumentResult, Job, JobList, JobStatus};
use crate::worker::RESULT_KIND;

/// The most jobs `GET /v1/jobs` returns (jobs live an hour at most).
const LIST_LIMIT: i64 = 200;
/// How often an event stream re-reads its job when no change was announced. Changes are
/// announced in-process, and across instances by PostgreSQL's NOTIFY; this is a safety net
/// for a missed notification (a reconnecting listener), not the delivery path.
const EVENTS_RECHECK: Duration = Duration::from_secs(10);

/// The Job of api.md with its result decrypted (for its owner only).
pub(crate) fn job_of(state: &AppState, row: &JobRow) -> Result<Job, ApiError> {
    let mut job = row.to_job();
    if job.status == JobStatus::Succeeded
        && let (Some(sealed), Some(wrapped)) = (&row.result, row.result_key())
    {
        let binding = Binding {
            user_prefix: &row.user_prefix,
            job_id: &row.id,
            kind: RESULT_KIND,
        };
        let json = match state
            .keyring
            .unwrap_key(&wrapped, &binding)
            .and_then(|key| crypto::open(&key, &binding, sealed))
        {
            Ok(json) => json,
            Err(integrity) => {
                // An unmanaged failure: the database queues a purge of this user.
                let db = state.db.clone();
                let id = row.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = db.mark_unmanaged(&id).await {
                        tracing::error!(error = %format!("{e:#}"), "marking an unmanaged failure failed");
                    }
                });
                state.wake.notify_one();
                return Err(ApiError::internal(integrity));
            }
        };
        // serde's message may quote a value of the result: log its position only.
        let result: DocumentResult = serde_json::from_slice(&json).map_err(|e| {
            ApiError::internal(anyhow::anyhow!(
                "a stored result does not decode ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        job.result = Some(result);
    }
    Ok(job)
}

/// The live job of this user, or the error the app should see.
async fn live_job(state: &AppState, user: &User, id: &str) -> Result<JobRow, ApiError> {
    let row = state
        .db
        .get_job_or_tombstone(&user.id, &state.user_prefix(&user.id), id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or(ApiError::JobNotFound)?;
    match row.deleted_reason.as_deref() {
        // Past its lifetime but not yet swept: already gone as far as the app is concerned.
        None if row.deleted_at.is_none() && row.expires_at <= crate::db::now_millis() => {
            Err(ApiError::JobExpired)
        }
        None if row.deleted_at.is_none() => Ok(row),
        Some("expired") => Err(ApiError::JobExpired),
        _ => Err(ApiError::JobNotFound),
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
                .map(|at| (at - time::OffsetDateTime::now_utc()).whole_seconds())
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
        (status = 200, description = "The job; while not terminal it carries Retry-After", body = Job),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job (or another user's)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The job expired and its data was deleted", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn get_job(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = live_job(&state, &user, &id).await?;
    let job = job_of(&state, &row)?;
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
    ),
)]
pub async fn list_jobs(State(state): State<AppState>, user: User) -> Result<Response, ApiError> {
    let rows = state
        .db
        .list_jobs(&user.id, LIST_LIMIT)
        .await
        .map_err(ApiError::unavailable)?;
    let jobs = rows
        .iter()
        .map(|row| job_of(&state, row))
        .collect::<Result<Vec<_>, _>>()?;
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
        (status = 404, description = "No such job (or another user's)", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn delete_job(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let row = match state
        .db
        .tombstone_job(&user.id, &id, "deleted")
        .await
        .map_err(ApiError::unavailable)?
    {
        Some(row) => row,
        None => {
            // Deleting what this user already deleted (or what expired) is success.
            return match state
                .db
                .get_job_or_tombstone(&user.id, &state.user_prefix(&user.id), &id)
                .await
                .map_err(ApiError::unavailable)?
            {
                Some(row) if row.deleted_at.is_some() => Ok(StatusCode::NO_CONTENT),
                _ => Err(ApiError::JobNotFound),
            };
        }
    };
    state.running.cancel(&row.id);
    state
        .store
        .delete_prefix(&format!("{}/{}", row.user_prefix, row.id))
        .await
        .map_err(ApiError::unavailable)?;
    metrics::counter!("medrelay_deletions_total", "reason" => "client").increment(1);
    state.publish(&row.id);
    Ok(StatusCode::NO_CONTENT)
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
    ),
)]
pub async fn delete_my_data(
    State(state): State<AppState>,
    user: User,
) -> Result<StatusCode, ApiError> {
    purge_user(&state, &user.id, "client")
        .await
        .map_err(ApiError::unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes every job and object of one user (also `medrelay purge-user`).
pub async fn purge_user(
    state: &AppState,
    user_id: &str,
    reason: &'static str,
) -> anyhow::Result<(u64, u64)> {
    let jobs = state.db.tombstone_user(user_id, reason).await?;
    state.running.cancel_owner(&state.user_prefix(user_id));
    let objects = state
        .store
        .delete_prefix(&state.user_prefix(user_id))
        .await?;
    metrics::counter!("medrelay_deletions_total", "reason" => reason).increment(jobs);
    tracing::info!(jobs, objects, reason, "user data deleted");
    Ok((jobs, objects))
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
    ),
)]
pub async fn job_events(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = live_job(&state, &user, &id).await?;
    let first = job_of(&state, &row)?;
    let stream = job_stream(state, user, first);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn job_stream(
    state: AppState,
    user: User,
    first: Job,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut changes = state.events.subscribe();
    async_stream(move |tx| async move {
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
            };
            if !recheck {
                continue;
            }
            let row = match live_job(&state, &user, &id).await {
                Ok(row) => row,
                // Deleted or expired: nothing more will happen to it.
                Err(_) => return,
            };
            let Ok(job) = job_of(&state, &row) else {
                return;
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
