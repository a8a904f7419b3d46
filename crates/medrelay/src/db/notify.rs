//! PostgreSQL's job notifications: a trigger `NOTIFY`s the channel `medrelay_jobs` with the
//! job id on every change, by any instance. SQLite serves one instance and has none.

use sqlx::postgres::PgListener;

use super::{Db, Result};
use crate::ids::JobId;

/// The channel the trigger notifies (migration `job_notify`).
const CHANNEL: &str = "medrelay_jobs";

/// A live subscription to job changes.
pub struct JobNotifications(PgListener);

impl Db {
    /// Whether other instances' changes can be heard (PostgreSQL).
    pub fn has_notifications(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// Subscribes to the changes of every job, by any instance; `None` on SQLite.
    pub async fn listen(&self) -> Result<Option<JobNotifications>> {
        let Db::Postgres(pool) = self else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(JobNotifications(listener)))
    }
}

impl JobNotifications {
    /// The next changed job. An error means the connection broke: subscribe again.
    pub async fn recv(&mut self) -> Result<JobId> {
        let note = self.0.recv().await?;
        Ok(JobId::from_raw(note.payload()))
    }
}
