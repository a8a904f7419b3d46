//! The sweeper role: every `MEDRELAY_SWEEP_INTERVAL`, has `lifecycle` end every job whose
//! lifetime is over and every resumable upload past its TTL, delete every object older than the TTL, drop day-old tombstones and lapsed
//! fair-use rows, and finish purges whose purger died.
//!
//! Owns the schedule of the one-hour guarantee, not its rules (those are `lifecycle`'s).
//! Safe to run in several instances at once: every step is idempotent.

use tokio_util::sync::CancellationToken;

use crate::clock::now_millis;
use crate::state::AppState;

pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        if let Err(e) = sweep(&state).await {
            tracing::warn!(error = %format!("{e:#}"), "sweep failed; retrying next interval");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(state.settings.sweep_interval) => {}
        }
    }
}

/// One sweep: every step runs even when an earlier one failed (each failure is logged and
/// counted, and the next round retries). Returns how many jobs it expired, or the first error.
pub async fn sweep(state: &AppState) -> anyhow::Result<u64> {
    let lifecycle = &state.lifecycle;
    let now = now_millis();
    let mut first_error: Option<anyhow::Error> = None;
    let mut step = |what: &str, outcome: anyhow::Result<()>| {
        if let Err(e) = outcome {
            crate::store::sweep_failed(what, &format!("{e:#}"));
            first_error.get_or_insert(e);
        }
    };
    let expired = match lifecycle.expire_due(now).await {
        Ok(n) => n,
        Err(e) => {
            step("ending expired jobs", Err(e.into()));
            0
        }
    };
    step(
        "ending expired resumable uploads",
        lifecycle
            .expire_uploads(now)
            .await
            .map(drop)
            .map_err(Into::into),
    );
    step(
        "dropping old tombstones",
        lifecycle
            .drop_old_tombstones(now)
            .await
            .map(drop)
            .map_err(Into::into),
    );
    // Object ages are judged at the listing, not at the start of the round.
    step(
        "deleting expired objects",
        lifecycle
            .sweep_objects(now_millis())
            .await
            .map_err(Into::into),
    );
    // Fair-use rows that lapsed: slots an instance did not release, day-old provider calls.
    step(
        "dropping lapsed fair-use rows",
        state
            .limits
            .drop_lapsed(now)
            .await
            .map(drop)
            .map_err(Into::into),
    );
    // Keys and results cleared since the last round leave SQLite's WAL.
    step(
        "emptying the database's write-ahead log",
        lifecycle.db().forget_history().await.map_err(Into::into),
    );
    // A purge whose purger died is picked up here too.
    step(
        "finishing pending purges",
        crate::purge::run_pending(lifecycle)
            .await
            .map(drop)
            .map_err(Into::into),
    );
    match first_error {
        None => Ok(expired),
        Some(e) => Err(e),
    }
}
