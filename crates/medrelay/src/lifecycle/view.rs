//! What the app may see of a job: the Job of api.md, found for its owner only (another
//! user's job is answered exactly as one that does not exist), with its result opened for
//! that owner. A result that fails its integrity check is an unmanaged failure: the database
//! queues a purge of the user.

use std::time::Duration;

use super::{Error, Lifecycle};
use crate::clock::{from_millis, now_millis};
use crate::db::JobRow;
use crate::ids::{JobId, UserId};
use crate::model::{DeletionReason, DocumentResult, Job, JobError, JobStatus};

/// The most jobs a list returns (jobs live an hour at most).
const LIST_LIMIT: i64 = 200;

/// What a user's lookup of a job found.
#[derive(Debug)]
pub enum Lookup {
    Live(Box<JobRow>),
    /// Past its lifetime (swept or not yet): its data is gone as far as the app is concerned.
    Expired,
    /// Never existed, another user's, or deleted.
    Missing,
}

impl Lifecycle {
    /// A job of this user.
    pub async fn lookup(&self, user: &UserId, id: &JobId) -> Result<Lookup, Error> {
        let row = self
            .db()
            .get_job_or_tombstone(user, &self.user_prefix(user), id)
            .await?;
        let Some(row) = row else {
            return Ok(Lookup::Missing);
        };
        Ok(match row.deleted_reason {
            None if row.expires_at <= now_millis() => Lookup::Expired,
            None => Lookup::Live(Box::new(row)),
            Some(DeletionReason::Expired) => Lookup::Expired,
            Some(_) => Lookup::Missing,
        })
    }

    /// The user's live jobs, newest first, as the app sees them.
    pub async fn list(&self, user: &UserId) -> Result<Vec<Job>, Error> {
        let rows = self.db().list_jobs(user, LIST_LIMIT).await?;
        rows.iter().map(|row| self.view(row)).collect()
    }

    /// The live job of this user with this idempotency key, as the app sees it.
    pub async fn find_by_idempotency_key(
        &self,
        user: &UserId,
        key: &str,
    ) -> Result<Option<Job>, Error> {
        match self.db().find_by_idempotency_key(user, key).await? {
            Some(row) => self.view(&row).map(Some),
            None => Ok(None),
        }
    }

    /// The Job of api.md, with its result opened (call only for the job's owner).
    pub fn view(&self, row: &JobRow) -> Result<Job, Error> {
        let mut job = wire_job(row);
        if job.status != JobStatus::Succeeded {
            return Ok(job);
        }
        let json = match self.open_result(row) {
            Ok(Some(json)) => json,
            Ok(None) => return Ok(job),
            Err(Ok(kid)) => {
                // A configuration problem, not tampering: this instance lacks a master key the
                // others have. The app is told to try again (503), nothing is purged.
                super::key_missing(&kid, "opening a result");
                return Err(Error::Unavailable(anyhow::anyhow!(
                    "the result's master key {kid:?} is not configured here"
                )));
            }
            Err(Err(integrity)) => {
                // An unmanaged failure: the database queues a purge of this user once the mark
                // commits, which is retried until it does (never lost to a hiccup).
                let lifecycle = self.clone();
                let id = row.id.clone();
                tokio::spawn(async move {
                    let mut wait = Duration::from_millis(200);
                    while let Err(e) = lifecycle.db().mark_unmanaged(&id).await {
                        tracing::error!(error = %e, "marking an unmanaged failure failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                    lifecycle.wake_maintenance();
                });
                return Err(Error::Internal(integrity.into()));
            }
        };
        // serde's message may quote a value of the result: log its position only.
        let result: DocumentResult = serde_json::from_slice(&json).map_err(|e| {
            Error::Internal(anyhow::anyhow!(
                "a stored result does not decode ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        job.result = Some(result);
        Ok(job)
    }
}

/// The Job of api.md without its result.
fn wire_job(row: &JobRow) -> Job {
    let error = row.error_code.as_ref().map(|code| JobError {
        code: code.clone(),
        message: row.error_message.clone().unwrap_or_default(),
        retryable: row.error_retryable.unwrap_or(false),
    });
    Job {
        id: row.id.clone(),
        status: row.status,
        media_type: row.media_type.clone(),
        size_bytes: row.size_bytes,
        attempts: row.attempts,
        max_attempts: row.max_attempts,
        next_attempt_at: row.next_attempt_at.map(from_millis),
        created_at: from_millis(row.created_at),
        updated_at: from_millis(row.updated_at),
        expires_at: from_millis(row.expires_at),
        result: None,
        error,
    }
}
