//! Job changes reach event streams in this process through [`Lifecycle::publish`]. On
//! PostgreSQL they reach the other instances by `NOTIFY`: a trigger announces every change but
//! two; the claims and successes of this instance, the queue's hot path, are announced by
//! [`Lifecycle::announce`], gathered while the previous announcement is on its way and sent
//! several to a `NOTIFY` by [`announce_changes`] (each notifying commit waits for every other
//! one: issue #14). [`relay_notifications`] forwards what the others announce here. A job
//! running here that another instance ended is stopped at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Lifecycle;
use crate::ids::JobId;
use crate::model::JobStatus;

/// At most one announcement per this long: under load the ids of many claims and successes
/// share one `NOTIFY` (a transaction of its own), while a lone change is announced at once.
pub const ANNOUNCE_GAP: Duration = Duration::from_millis(10);

/// Announcements waiting beyond this many (the database unreachable for long) are dropped:
/// event streams re-read their job every few seconds anyway.
const MAX_PENDING: usize = 10_000;

/// The ids this instance has yet to announce to the others.
#[derive(Default)]
pub(super) struct Announcements {
    pending: Mutex<Vec<JobId>>,
    wake: Notify,
    /// Set while [`announce_changes`] runs: without it (SQLite, a command-line tool) nothing
    /// is gathered.
    active: AtomicBool,
}

impl Lifecycle {
    /// Tells event streams here, and on PostgreSQL every other instance, that a job changed in
    /// a way the database's trigger does not announce (a claim, a success).
    pub fn announce(&self, id: &JobId) {
        self.publish(id);
        let announcements = &self.inner.announcements;
        if !announcements.active.load(Ordering::Acquire) {
            return;
        }
        {
            let mut pending = announcements.pending.lock();
            if pending.len() >= MAX_PENDING {
                metrics::counter!("medrelay_announcements_dropped_total").increment(1);
                return;
            }
            pending.push(id.clone());
        }
        announcements.wake.notify_one();
    }
}

/// Sends this instance's announcements until `shutdown`, then once more for what is left. A
/// failed `NOTIFY` is retried with the ids gathered since.
pub async fn announce_changes(
    lifecycle: Lifecycle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let announcements = &lifecycle.inner.announcements;
    announcements.active.store(true, Ordering::Release);
    let mut wait = Duration::from_millis(100);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = announcements.wake.notified() => false,
        };
        let batch = std::mem::take(&mut *announcements.pending.lock());
        if !batch.is_empty() {
            let sent = tokio::time::Instant::now();
            if let Err(e) = lifecycle.db().announce(&batch).await {
                tracing::warn!(error = %e, "announcing job changes failed; retrying");
                {
                    let mut pending = announcements.pending.lock();
                    let mut again = batch;
                    again.append(&mut pending);
                    again.truncate(MAX_PENDING);
                    *pending = again;
                }
                if stopping {
                    return Ok(());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(5));
                announcements.wake.notify_one();
                continue;
            }
            wait = Duration::from_millis(100);
            if !stopping {
                // What arrives meanwhile waits for the gap and goes in the next batch.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep_until(sent + ANNOUNCE_GAP) => {}
                }
            }
        }
        if stopping {
            return Ok(());
        }
    }
}

/// Forwards the database's job notifications to this process's event streams until
/// `shutdown`, reconnecting when the connection breaks. Returns at once on SQLite.
pub async fn relay_notifications(
    lifecycle: Lifecycle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let listening = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            l = lifecycle.db().listen() => l,
        };
        match listening {
            Ok(None) => return Ok(()),
            Ok(Some(mut notifications)) => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    got = notifications.recv() => match got {
                        Ok(ids) => {
                            for id in ids {
                                lifecycle.publish(&id);
                                lifecycle.stop_if_ended_elsewhere(id);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "job notifications interrupted; reconnecting");
                            break;
                        }
                    },
                }
            },
            Err(e) => tracing::warn!(error = %e, "listening for job notifications failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl Lifecycle {
    /// A job running here that another instance deleted, expired or purged is stopped at
    /// once, not at its next heartbeat: its document must not reach a provider after the
    /// delete.
    fn stop_if_ended_elsewhere(&self, id: JobId) {
        if !self.running().contains(&id) {
            return;
        }
        let lifecycle = self.clone();
        tokio::spawn(async move {
            if let Ok(Some(row)) = lifecycle.db().get_job_by_id(&id).await
                && (row.deleted_at.is_some() || row.status != JobStatus::Processing)
            {
                lifecycle.running().cancel(&id);
            }
        });
    }
}
