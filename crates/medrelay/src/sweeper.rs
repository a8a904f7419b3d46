//! The sweeper role: every `MEDRELAY_SWEEP_INTERVAL`, ends every job whose lifetime is over
//! (in any state, running ones included), deletes its objects and any object older than the
//! TTL (orphans included), drops PHI-free tombstones after a day, and finishes purges.
//!
//! Owns the one-hour guarantee. Safe to run in several instances at once: every step is
//! idempotent, and tombstoning is a compare-and-set on `deleted_at`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::db;

/// How long a PHI-free tombstone (ids, times, reason) is kept, so that a late poll learns
/// that its job expired instead of getting a bare 404.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

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
    let now = db::now_millis();
    let mut expired = 0;
    loop {
        let rows = state.db.expired_jobs(now, 500).await?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            state.running.cancel(&row.id);
            if state
                .db
                .tombstone_job(&row.user_id, &row.id, "expired")
                .await?
                .is_some()
            {
                expired += 1;
            }
            state
                .store
                .delete_prefix(&format!("{}/{}", row.user_prefix, row.id))
                .await?;
            state.publish(&row.id);
        }
    }
    if expired > 0 {
        metrics::counter!("medrelay_deletions_total", "reason" => "expired").increment(expired);
        tracing::info!(expired, "expired jobs deleted");
    }
    state
        .db
        .drop_tombstones(now - db::millis(TOMBSTONE_TTL))
        .await?;
    sweep_objects(state, now).await?;
    // A purge whose purger died is picked up here too.
    crate::purge::run_pending(state).await?;
    Ok(expired)
}

/// Deletes every object older than the TTL, whatever its job row says: documents of jobs that
/// ended without their delete, and orphans of a crash between storing and committing. No
/// object can outlive the TTL by more than one sweep interval.
async fn sweep_objects(state: &AppState, now: i64) -> anyhow::Result<()> {
    let ttl = db::millis(state.settings.temp_ttl);
    // Multipart uploads a crash left incomplete hold parts S3 does not list as objects.
    let aborted = state.store.abort_stale_uploads(now, ttl).await?
        + state.store.sweep_local_staging(now, ttl);
    if aborted > 0 {
        metrics::counter!("medrelay_deletions_total", "reason" => "upload-abandoned")
            .increment(aborted);
        tracing::info!(aborted, "abandoned multipart uploads aborted");
    }
    let objects: Vec<_> = state
        .store
        .list_with_times()
        .await?
        .into_iter()
        // Upload records are removed with their upload, above.
        .filter(|(path, _)| {
            path.parts()
                .next()
                .is_none_or(|p| p.as_ref() != crate::store::UPLOAD_MARKERS)
        })
        .collect();
    let mut oldest_ms = 0i64;
    let mut deleted = 0u64;
    // Objects past the TTL by more than one sweep interval mean deletion is failing: alert.
    let late = ttl + db::millis(state.settings.sweep_interval);
    let past = objects
        .iter()
        .filter(|(_, modified)| now - modified > late)
        .count();
    metrics::gauge!("medrelay_objects_past_ttl").set(past as f64);
    for (path, modified) in objects {
        let age = now - modified;
        if age >= ttl {
            state.store.delete(&path).await?;
            state.store.prune_empty(&path);
            deleted += 1;
        } else {
            oldest_ms = oldest_ms.max(age);
        }
    }
    if deleted > 0 {
        metrics::counter!("medrelay_deletions_total", "reason" => "object-expired")
            .increment(deleted);
        tracing::info!(deleted, "expired objects deleted");
    }
    metrics::gauge!("medrelay_oldest_object_age_seconds").set(oldest_ms as f64 / 1000.0);
    Ok(())
}
