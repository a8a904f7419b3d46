//! The worker role: claims due jobs, runs the processor on each within a lease, and hands the
//! outcome to `lifecycle`, which records it and ends the job.
//!
//! Owns concurrency (`MEDRELAY_WORKERS` slots), heartbeats, panic containment and the drain
//! on shutdown. It never reads, writes or deletes an object itself, and never logs document
//! bytes or results.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lifecycle::Claimed;
use crate::model::DocumentResult;
use crate::processor::ProcessError;
use crate::state::AppState;

/// Runs until `shutdown`, then drains in-flight jobs for the grace period and hands back
/// those that did not finish, so another instance takes them at once.
pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lifecycle = &state.lifecycle;
    let slots = Arc::new(Semaphore::new(state.settings.workers));
    let mut jobs: JoinSet<()> = JoinSet::new();
    // Cancelled only after the grace period: jobs keep running while we drain.
    let hard_stop = CancellationToken::new();
    let poll = state.settings.poll_interval;
    let maintenance = AbortOnDrop(tokio::spawn(maintain(state.clone(), shutdown.clone())));
    loop {
        while jobs.try_join_next().is_some() {}
        let free = slots.available_permits();
        if free > 0 {
            match lifecycle.claim(free).await {
                Ok(claimed) => {
                    let full = claimed.len() == free;
                    for job in claimed {
                        let permit = slots.clone().acquire_owned().await?;
                        let state = state.clone();
                        let hard_stop = hard_stop.clone();
                        let span = tracing::info_span!("job", job_id = %job.id(), attempt = job.attempts());
                        jobs.spawn(
                            async move {
                                process_document(&state, job, hard_stop).await;
                                drop(permit);
                                state.lifecycle.wake_worker();
                            }
                            .instrument(span),
                        );
                    }
                    if full {
                        // There may be more due jobs: look again without waiting.
                        continue;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming jobs failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = lifecycle.worker_woken() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
    drop(maintenance);
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

/// The worker's periodic work, on its own timer (every `MEDRELAY_POLL_INTERVAL`, and at once
/// when a purge is due) rather than once per job: pending purges, leases that ran out
/// (queued again, or ended when they keep dying).
async fn maintain(state: AppState, shutdown: CancellationToken) {
    let lifecycle = &state.lifecycle;
    loop {
        if let Err(e) = crate::purge::run_pending(lifecycle).await {
            tracing::error!(error = %e, "a purge failed; retrying");
        }
        if let Err(e) = lifecycle.end_exhausted().await {
            tracing::warn!(error = %e, "ending exhausted jobs failed");
        }
        if let Err(e) = lifecycle.rescue_lost_leases().await {
            tracing::warn!(error = %e, "queuing jobs with lost leases again failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = lifecycle.maintenance_woken() => {}
            _ = tokio::time::sleep(state.settings.poll_interval) => {}
        }
    }
}

/// Processes one claimed job to its next state.
pub async fn process_document(state: &AppState, job: Claimed, hard_stop: CancellationToken) {
    let lifecycle = &state.lifecycle;
    let cancel = hard_stop.child_token();
    lifecycle.begin(&job, cancel.clone());
    // Stops beating however this function ends, a panic included: a dead attempt must not
    // keep its lease alive.
    let heartbeat = AbortOnDrop(spawn_heartbeat(state, &job, cancel.clone()));

    // A panic anywhere in the attempt (not only in the processor) is an unmanaged failure.
    let outcome = tokio::select! {
        outcome = AssertUnwindSafe(attempt(state, &job)).catch_unwind() => {
            Some(outcome.unwrap_or_else(|_| Err(panicked("an attempt panicked"))))
        }
        _ = cancel.cancelled() => None,
    };
    drop(heartbeat);
    lifecycle.stopped(&job);

    let Some(outcome) = outcome else {
        if hard_stop.is_cancelled() {
            // Shutdown: hand the job to the next instance at once.
            lifecycle.hand_back(&job).await;
        }
        // Otherwise the job was deleted or its lease was lost: whoever did that owns it now.
        return;
    };
    let recorded = AssertUnwindSafe(lifecycle.finish(&job, outcome))
        .catch_unwind()
        .await;
    let failed = match recorded {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        // Recording the outcome itself panicked: end the job as an unmanaged failure.
        Err(_) => match lifecycle
            .finish(&job, Err(panicked("recording an outcome panicked")))
            .await
        {
            Ok(()) => return,
            Err(e) => e.to_string(),
        },
    };
    // The lease runs out and the job is claimed again; the attempt is already counted.
    tracing::error!(error = %failed, "recording a job outcome failed");
}

/// A panic, as the unmanaged failure it is. Its message is never kept: it may quote content.
fn panicked(what: &'static str) -> ProcessError {
    ProcessError::Unmanaged(anyhow::anyhow!(what))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_heartbeat(
    state: &AppState,
    job: &Claimed,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let lifecycle = state.lifecycle.clone();
    let lease = state.settings.lease;
    let job = job.clone();
    tokio::spawn(async move {
        // Three beats per lease: one lost beat does not lose the job.
        let every = (lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            match lifecycle.heartbeat(&job).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost: stopping this attempt");
                    cancel.cancel();
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    })
}

/// One processing attempt: open the document, run the processor.
async fn attempt(state: &AppState, job: &Claimed) -> Result<DocumentResult, ProcessError> {
    let document = state.lifecycle.document(job).await?;
    let budget = state.limits.provider_budget(job.user_prefix());
    state.processor.process(document, &budget).await
}
