//! Job changes reach event streams in this process through [`Lifecycle::publish`]; on
//! PostgreSQL a trigger `NOTIFY`s every change by any instance, and [`relay_notifications`]
//! forwards those here. A job running here that another instance ended is stopped at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Lifecycle;
use crate::ids::JobId;
use crate::model::JobStatus;

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
                        Ok(id) => {
                            lifecycle.publish(&id);
                            lifecycle.stop_if_ended_elsewhere(id);
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
