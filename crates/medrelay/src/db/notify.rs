//! PostgreSQL's job notifications on the channel `medrelay_jobs`: a trigger `NOTIFY`s a job's
//! id on every change but two, by any instance; the claims and successes an instance makes it
//! announces itself, several ids to a `NOTIFY` ([`Db::announce`]). SQLite serves one instance
//! and has none.

use sqlx::postgres::PgListener;

use super::{Db, Result};
use crate::ids::JobId;

/// The channel the trigger notifies (migration `job_notify`).
const CHANNEL: &str = "medrelay_jobs";

/// Ids per announcement: a payload stays far below PostgreSQL's 8000 bytes.
const IDS_PER_NOTIFY: usize = 100;

/// A live subscription to job changes.
pub struct JobNotifications(PgListener);

impl Db {
    /// Whether other instances' changes can be heard (PostgreSQL).
    pub fn has_notifications(&self) -> bool {
        matches!(self, Db::Postgres(..))
    }

    /// Subscribes to the changes of every job, by any instance; `None` on SQLite.
    pub async fn listen(&self) -> Result<Option<JobNotifications>> {
        let Db::Postgres(pool, ..) = self else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(JobNotifications(listener)))
    }

    /// Tells every instance that these jobs changed: one `NOTIFY` per hundred ids, in one
    /// statement (the ids are opaque; no state, no user, no content). Nothing on SQLite.
    pub async fn announce(&self, ids: &[JobId]) -> Result<()> {
        let Db::Postgres(pool, ..) = self else {
            return Ok(());
        };
        let payloads: Vec<String> = ids
            .chunks(IDS_PER_NOTIFY)
            .map(|chunk| {
                let ids: Vec<&str> = chunk.iter().map(JobId::as_str).collect();
                ids.join(",")
            })
            .collect();
        sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
            .bind(CHANNEL)
            .bind(&payloads)
            .execute(pool)
            .await?;
        Ok(())
    }
}

impl JobNotifications {
    /// The next changed jobs (one, from the trigger, or an instance's batch). An error means
    /// the connection broke: subscribe again.
    pub async fn recv(&mut self) -> Result<Vec<JobId>> {
        let note = self.0.recv().await?;
        Ok(note
            .payload()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(JobId::from_raw)
            .collect())
    }
}
