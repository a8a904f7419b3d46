//! The worker role: claims due jobs under a lease, runs the processor, stores the result, and
//! ends every job by deleting its document.
//!
//! Owns the job lifecycle after upload. Every write is a compare-and-set on the lease token,
//! so a worker that lost its lease changes nothing. It never logs document bytes or results.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use bytes::Bytes;

use crate::app::AppState;
use crate::crypto::{self, Binding, WrappedKey};
use crate::db::{self, JobRow};
use crate::model::JobError;
use crate::processor::{Document, MediaType, ProcessError, Refusal};
use crate::store::{ObjectKind, Store};

/// Runs until `shutdown`, then drains in-flight jobs for the grace period and releases the
/// leases of those that did not finish, so another instance takes them at once.
pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(state.settings.workers));
    let mut jobs: JoinSet<()> = JoinSet::new();
    // Cancelled only after the grace period: jobs keep running while we drain.
    let hard_stop = CancellationToken::new();
    let poll = state.settings.poll_interval;
    loop {
        while jobs.try_join_next().is_some() {}
        if let Err(e) = crate::purge::run_pending(&state).await {
            tracing::error!(error = %format!("{e:#}"), "a purge failed; retrying");
        }
        end_exhausted(&state).await;
        let free = slots.available_permits();
        if free > 0 {
            let token = uuid::Uuid::new_v4().to_string();
            match state
                .db
                .claim(&token, state.settings.lease, free as i64)
                .await
            {
                Ok(rows) => {
                    let full = rows.len() == free;
                    for row in rows {
                        let permit = slots.clone().acquire_owned().await?;
                        let state = state.clone();
                        let token = token.clone();
                        let hard_stop = hard_stop.clone();
                        let span =
                            tracing::info_span!("job", job_id = %row.id, attempt = row.attempts);
                        jobs.spawn(
                            async move {
                                process_document(&state, row, &token, hard_stop).await;
                                drop(permit);
                                state.wake.notify_one();
                            }
                            .instrument(span),
                        );
                    }
                    if full {
                        // There may be more due jobs: look again without waiting.
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "claiming jobs failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = state.wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
    let grace = state.settings.shutdown_grace;
    let drained =
        tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            in_flight = jobs.len(),
            "grace period over: releasing unfinished jobs"
        );
        hard_stop.cancel();
        while jobs.join_next().await.is_some() {}
    }
    Ok(())
}

/// Ends jobs whose last allowed attempt lost its lease (the worker crashed or hung), deleting
/// their documents.
async fn end_exhausted(state: &AppState) {
    match state.db.fail_exhausted(&retries_exhausted()).await {
        Ok(rows) => {
            for row in rows {
                tracing::warn!(job_id = %row.id, "last attempt lost its lease: job failed");
                metrics::counter!("medrelay_jobs_finished_total", "outcome" => "failed", "reason" => "lease-lost")
                    .increment(1);
                let path = Store::object_path(&row.user_prefix, &row.id, ObjectKind::Document);
                if let Err(e) = state.store.delete(&path).await {
                    tracing::warn!(error = %format!("{e:#}"), "deleting a document failed; the sweeper will retry");
                }
                state.publish(&row.id);
            }
        }
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "ending exhausted jobs failed"),
    }
}

/// Processes one claimed job to its next state.
pub async fn process_document(
    state: &AppState,
    row: JobRow,
    lease_token: &str,
    hard_stop: CancellationToken,
) {
    let cancel = hard_stop.child_token();
    state
        .running
        .insert(&row.id, &row.user_prefix, cancel.clone());
    state.publish(&row.id);
    let heartbeat = spawn_heartbeat(state, &row.id, lease_token, cancel.clone());

    let outcome = tokio::select! {
        outcome = attempt(state, &row) => Some(outcome),
        _ = cancel.cancelled() => None,
    };
    heartbeat.abort();
    state.running.remove(&row.id);

    let Some(outcome) = outcome else {
        if hard_stop.is_cancelled() {
            // Shutdown: hand the job to the next instance; the attempt stays counted.
            if let Err(e) = state.db.release(&row.id, lease_token).await {
                tracing::warn!(error = %format!("{e:#}"), "releasing a lease failed");
            }
        }
        // Otherwise the job was deleted or its lease was lost: whoever did that owns it now.
        return;
    };
    if let Err(e) = finish(state, &row, lease_token, outcome).await {
        // The lease runs out and the job is claimed again; the attempt is already counted.
        tracing::error!(error = %format!("{e:#}"), "recording a job outcome failed");
    }
}

fn spawn_heartbeat(
    state: &AppState,
    job_id: &str,
    lease_token: &str,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let db = state.db.clone();
    let lease = state.settings.lease;
    let job_id = job_id.to_owned();
    let lease_token = lease_token.to_owned();
    tokio::spawn(async move {
        // Three beats per lease: one lost beat does not lose the job.
        let every = (lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            match db.heartbeat(&job_id, &lease_token, lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost: stopping this attempt");
                    cancel.cancel();
                    return;
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "heartbeat failed"),
            }
        }
    })
}

/// One processing attempt: read the document, run the processor, contain any panic.
async fn attempt(state: &AppState, row: &JobRow) -> Result<SealedResult, ProcessError> {
    let media_type = MediaType::parse(&row.media_type)
        .ok_or_else(|| ProcessError::Unmanaged(anyhow::anyhow!("job has an unknown media type")))?;
    let path = Store::object_path(&row.user_prefix, &row.id, ObjectKind::Document);
    let bytes = match state.store.read(&path).await {
        Ok(bytes) => bytes,
        Err(e) => {
            let missing = e
                .downcast_ref::<object_store::Error>()
                .is_some_and(|e| matches!(e, object_store::Error::NotFound { .. }));
            return Err(if missing {
                // A delete of the user's data can race an upload's commit: an ordinary failure,
                // not a reason to purge everything of the user.
                ProcessError::Abort(Refusal::Missing)
            } else {
                ProcessError::Retry {
                    reason: format!("reading the document: {e:#}"),
                    retry_after: None,
                }
            });
        }
    };
    let binding = Binding {
        user_prefix: &row.user_prefix,
        job_id: &row.id,
        kind: ObjectKind::Document.name(),
    };
    let wrapped = row.document_key().ok_or_else(|| {
        ProcessError::Unmanaged(anyhow::anyhow!("the job's document key is missing"))
    })?;
    // Fails closed: no plaintext reaches the processor unless every segment authenticated.
    let plaintext = state
        .keyring
        .unwrap_key(&wrapped, &binding)
        .and_then(|key| crypto::open(&key, &binding, &bytes))
        .map_err(|e| ProcessError::Unmanaged(e.into()))?;
    drop(bytes);
    let document = Document {
        media_type,
        bytes: Bytes::from(plaintext.to_vec()),
    };
    drop(plaintext);
    let processed = AssertUnwindSafe(state.processor.process(document))
        .catch_unwind()
        .await
        .map_err(|_| ProcessError::Unmanaged(anyhow::anyhow!("the processor panicked")))??;
    let json = zeroize::Zeroizing::new(
        serde_json::to_vec(&processed)
            .context("encoding the result")
            .map_err(ProcessError::Unmanaged)?,
    );
    let binding = Binding {
        kind: RESULT_KIND,
        ..binding
    };
    let (key, wrapped) = state
        .keyring
        .new_data_key(&binding)
        .map_err(ProcessError::Unmanaged)?;
    let sealed = crypto::seal(&key, &binding, &json).map_err(ProcessError::Unmanaged)?;
    Ok(SealedResult {
        sealed,
        key: wrapped,
    })
}

/// What `Binding::kind` says for a result.
pub const RESULT_KIND: &str = "result";

/// An encrypted result and its wrapped data key.
pub struct SealedResult {
    sealed: Vec<u8>,
    key: WrappedKey,
}

/// Records the outcome of an attempt with a compare-and-set on the lease.
async fn finish(
    state: &AppState,
    row: &JobRow,
    lease_token: &str,
    outcome: Result<SealedResult, ProcessError>,
) -> anyhow::Result<()> {
    let terminal = match outcome {
        Ok(result) => {
            let won = state
                .db
                .complete(&row.id, lease_token, &result.sealed, &result.key)
                .await?;
            if won {
                metrics::counter!("medrelay_jobs_finished_total", "outcome" => "succeeded")
                    .increment(1);
                tracing::info!("job succeeded");
            }
            won
        }
        Err(ProcessError::Retry {
            reason,
            retry_after,
        }) => {
            tracing::warn!(%reason, "attempt failed transiently");
            if row.attempts < row.max_attempts {
                let delay = retry_delay(&state.settings.retry_delays.0, row.attempts, retry_after);
                let run_at = db::now_millis() + db::millis(delay);
                if state
                    .db
                    .schedule_retry(&row.id, lease_token, run_at)
                    .await?
                {
                    metrics::counter!("medrelay_jobs_retried_total").increment(1);
                    state.publish(&row.id);
                }
                return Ok(());
            }
            fail(
                state,
                row,
                lease_token,
                retries_exhausted(),
                "retries-exhausted",
            )
            .await?
        }
        Err(ProcessError::Abort(refusal)) => {
            fail(state, row, lease_token, refusal.job_error(), "refused").await?
        }
        Err(ProcessError::Unmanaged(cause)) => {
            tracing::error!(error = %format!("{cause:#}"), "unmanaged failure: purging the user");
            let won = fail(state, row, lease_token, unmanaged_failure(), "unmanaged").await?;
            if won {
                // The trigger queued the purge; carry it out now rather than on the next poll.
                state.wake.notify_one();
            }
            won
        }
    };
    if terminal {
        // The document is no longer needed on any terminal path.
        let path = Store::object_path(&row.user_prefix, &row.id, ObjectKind::Document);
        if let Err(e) = state.store.delete(&path).await {
            tracing::warn!(error = %format!("{e:#}"), "deleting a document failed; the sweeper will retry");
        }
        state.publish(&row.id);
    }
    Ok(())
}

async fn fail(
    state: &AppState,
    row: &JobRow,
    lease_token: &str,
    error: JobError,
    why: &'static str,
) -> anyhow::Result<bool> {
    let won = state
        .db
        .fail(&row.id, lease_token, &error, why == "unmanaged")
        .await?;
    if won {
        metrics::counter!("medrelay_jobs_finished_total", "outcome" => "failed", "reason" => why)
            .increment(1);
        tracing::info!(code = %error.code, "job failed");
    }
    Ok(won)
}

/// The delay before retry number `attempts` (1-based): the configured delay plus up to 20%
/// jitter, and never less than the provider's `Retry-After` (capped at five minutes).
pub fn retry_delay(delays: &[Duration], attempts: i64, retry_after: Option<Duration>) -> Duration {
    let index = (attempts.max(1) as usize - 1).min(delays.len().saturating_sub(1));
    let base = delays
        .get(index)
        .copied()
        .unwrap_or(Duration::from_secs(15));
    let jitter = base.mul_f64(rand::rng().random_range(0.0..=0.2));
    let floor = retry_after
        .unwrap_or_default()
        .min(Duration::from_secs(300));
    (base + jitter).max(floor)
}

pub fn retries_exhausted() -> JobError {
    JobError {
        code: "processing-unavailable".into(),
        message: "We could not read your document right now because the service is busy. Please try again in a few minutes.".into(),
        retryable: true,
    }
}

pub fn unmanaged_failure() -> JobError {
    JobError {
        code: "processing-failed".into(),
        message: "Something went wrong while reading your document, and we deleted it to keep it safe. Please upload it again.".into(),
        retryable: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_honour_retry_after() {
        let delays = [
            Duration::from_secs(15),
            Duration::from_secs(60),
            Duration::from_secs(240),
        ];
        for _ in 0..100 {
            let d1 = retry_delay(&delays, 1, None);
            assert!(
                d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(18),
                "{d1:?}"
            );
            let d3 = retry_delay(&delays, 3, None);
            assert!(
                d3 >= Duration::from_secs(240) && d3 <= Duration::from_secs(288),
                "{d3:?}"
            );
        }
        let floored = retry_delay(&delays, 1, Some(Duration::from_secs(100)));
        assert!(floored >= Duration::from_secs(100));
        let capped = retry_delay(&delays, 1, Some(Duration::from_secs(3600)));
        assert!(capped <= Duration::from_secs(300));
    }
}
