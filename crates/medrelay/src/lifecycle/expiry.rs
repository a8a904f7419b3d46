//! The one-hour limit: every job whose lifetime is over ends (in any state, a running one is
//! stopped), its objects go, and every object older than the TTL goes whatever its row says
//! (orphans of a crash included), as do uploads a crash left incomplete. PHI-free tombstones
//! go after a day. Safe in several instances at once: every step is idempotent.

use super::end::End;
use super::{Error, Lifecycle, TOMBSTONE_TTL};
use crate::clock::millis;
use crate::model::DeletionReason;

impl Lifecycle {
    /// Ends every job past its `expires_at` (`now`, unix ms). Returns how many it ended.
    pub async fn expire_due(&self, now: i64) -> Result<u64, Error> {
        let mut expired = 0;
        loop {
            let rows = self.db().expired_jobs(now, 500).await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let reason = DeletionReason::Expired;
                if let Some(row) = self.db().tombstone_job(&row.id, reason).await? {
                    self.forget_job_quietly(&row.user_prefix, &row.id, End::Deleted(reason))
                        .await;
                    expired += 1;
                }
            }
        }
        if expired > 0 {
            tracing::info!(expired, "expired jobs deleted");
        }
        Ok(expired)
    }

    /// Removes tombstones older than a day.
    pub async fn drop_old_tombstones(&self, now: i64) -> Result<u64, Error> {
        Ok(self
            .db()
            .drop_tombstones(now - millis(TOMBSTONE_TTL))
            .await?)
    }

    /// Deletes every object that would pass the TTL before the next sweep, whatever its job
    /// row says: documents of jobs that ended without their delete, and orphans of a crash
    /// between storing and committing. No object outlives TTL + one sweep interval.
    pub async fn sweep_objects(&self, now: i64) -> Result<(), Error> {
        let ttl = millis(self.rules().temp_ttl);
        let store = self.store();
        let aborted = store
            .remove_abandoned_uploads(now, ttl)
            .await
            .map_err(Error::Unavailable)?;
        if aborted > 0 {
            metrics::counter!("medrelay_deletions_total", "reason" => "upload-abandoned")
                .increment(aborted);
            tracing::info!(aborted, "abandoned uploads removed");
        }
        let objects = store.list_with_times().await.map_err(Error::Unavailable)?;
        // Objects past the TTL by more than one sweep interval mean deletion is failing: alert.
        let late = ttl + millis(self.rules().sweep_interval);
        // What would pass the TTL before the next sweep goes now, so that no object reaches
        // TTL + one sweep interval. (A job whose document this takes early has at most that
        // margin left of its hour, and ends as `document-missing`.) The margin is at most a
        // twelfth of the TTL (5 min of an hour), whatever the interval.
        let interval = millis(self.rules().sweep_interval).min(ttl / 12);
        let due = ttl - interval;
        let past = objects
            .iter()
            .filter(|(_, modified)| now - modified > late)
            .count();
        metrics::gauge!("medrelay_objects_past_ttl").set(past as f64);
        let mut oldest_ms = 0i64;
        let mut oldest_seen_ms = 0i64;
        let mut deleted = 0u64;
        for (path, modified) in objects {
            let age = now - modified;
            oldest_seen_ms = oldest_seen_ms.max(age);
            if age >= due {
                // One object that cannot be deleted must not shield the others: it is counted,
                // logged, and tried again next round.
                match store.delete(&path).await {
                    Ok(()) => {
                        store.prune_empty(&path);
                        deleted += 1;
                    }
                    Err(e) => {
                        crate::store::sweep_failed("deleting an expired object", &format!("{e:#}"))
                    }
                }
            } else {
                oldest_ms = oldest_ms.max(age);
            }
        }
        // The oldest temporary byte this round saw, deleted or not: past TTL + one sweep
        // interval means deletion is failing.
        metrics::gauge!("medrelay_oldest_temporary_object_seconds")
            .set(oldest_seen_ms as f64 / 1000.0);
        if deleted > 0 {
            metrics::counter!("medrelay_deletions_total", "reason" => "object-expired")
                .increment(deleted);
            tracing::info!(deleted, "expired objects deleted");
        }
        metrics::gauge!("medrelay_oldest_object_age_seconds").set(oldest_ms as f64 / 1000.0);
        Ok(())
    }
}
