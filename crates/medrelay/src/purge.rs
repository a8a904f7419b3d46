//! The purge of one user's data after an unmanaged failure. The database queues it: a trigger
//! on `jobs.unmanaged_at` inserts into `purges` (both migrations), so no code path can mark an
//! unmanaged failure and forget the purge. This module carries the queued purges out.
//!
//! Order matters: every data key of the user is destroyed first, in one commit, so everything
//! is unreadable at once; only then are the objects deleted. The `purges` rows are the PHI-free
//! audit log (opaque user prefix, reason, counts, times).

use crate::app::AppState;
use crate::worker::unmanaged_failure;

/// Carries out every pending purge. Returns how many it completed.
pub async fn run_pending(state: &AppState) -> anyhow::Result<usize> {
    let mut done = 0;
    while let Some(purge) = state.db.claim_purge().await? {
        let jobs = state
            .db
            .shred_user(&purge.user_prefix, &unmanaged_failure())
            .await?;
        // Jobs of this user running here stop; elsewhere their next heartbeat or write fails.
        state.running.cancel_owner(&purge.user_prefix);
        let objects = state.store.delete_prefix(&purge.user_prefix).await?;
        state
            .db
            .complete_purge(purge.id, jobs.len() as i64, objects as i64)
            .await?;
        metrics::counter!("medrelay_purges_total", "reason" => purge.reason.clone()).increment(1);
        metrics::counter!("medrelay_deletions_total", "reason" => "purge")
            .increment(jobs.len() as u64);
        tracing::warn!(
            purge_id = purge.id,
            user_prefix = %purge.user_prefix,
            reason = %purge.reason,
            jobs = jobs.len(),
            objects,
            "purged every temporary byte of a user"
        );
        for id in &jobs {
            state.publish(id);
        }
        done += 1;
    }
    Ok(done)
}
