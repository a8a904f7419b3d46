//! The sweeper role: every `MEDRELAY_SWEEP_INTERVAL`, has `lifecycle` end every job whose
//! lifetime is over, delete every object older than the TTL, drop day-old tombstones and lapsed
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

/// One sweep. Returns how many jobs it expired.
pub async fn sweep(state: &AppState) -> anyhow::Result<u64> {
    let lifecycle = &state.lifecycle;
    let now = now_millis();
    let expired = lifecycle.expire_due(now).await?;
    lifecycle.drop_old_tombstones(now).await?;
    lifecycle.sweep_objects(now).await?;
    // Fair-use rows that lapsed: slots an instance did not release, day-old provider calls.
    state.limits.drop_lapsed(now).await?;
    // A purge whose purger died is picked up here too.
    crate::purge::run_pending(lifecycle).await?;
    Ok(expired)
}
