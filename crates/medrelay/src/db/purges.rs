//! Ending jobs for good: tombstones (a deleted or expired job keeps ids, times and a reason,
//! never content, keys or the user id), the shredding of every key of a user, the queue of
//! purges that the database's trigger fills, and the jobs whose lifetime is over.

use super::{Db, JobRow, PurgeRow, Result};
use crate::clock::now_millis;
use crate::ids::{JobId, UserId, UserPrefix};
use crate::model::{DeletionReason, JobError};

/// A claimed purge is taken over by another instance when it has not finished in this time.
pub const PURGE_LEASE_MS: i64 = 60_000;

const CLAIM_PURGE_POSTGRES: &str = "UPDATE purges SET started_at = $1 WHERE id = (SELECT id FROM purges \
     WHERE completed_at IS NULL AND (started_at IS NULL OR started_at < $2) \
     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *";
const CLAIM_PURGE_SQLITE: &str = "UPDATE purges SET started_at = $1 WHERE id = (SELECT id FROM purges \
     WHERE completed_at IS NULL AND (started_at IS NULL OR started_at < $2) \
     ORDER BY id LIMIT 1) RETURNING *";

/// What a tombstone keeps: everything else is dropped, and the user id becomes the prefix.
macro_rules! tombstone {
    ($where:literal) => {
        concat!(
            "UPDATE jobs SET deleted_at = $1, deleted_reason = $2, result = NULL, \
             error_message = NULL, idempotency_key = NULL, lease_token = NULL, \
             lease_until = NULL, updated_at = $1, document_kek = NULL, document_dek = NULL, \
             result_kek = NULL, result_dek = NULL, push_token = NULL, push_kek = NULL, \
             push_dek = NULL, user_id = user_prefix ",
            $where
        )
    };
}

impl Db {
    /// Turns a live job of this user into a PHI-free tombstone. Returns the tombstone, or
    /// `None` if this user has no such live job.
    pub async fn tombstone_job_of(
        &self,
        user_id: &UserId,
        id: &JobId,
        reason: DeletionReason,
    ) -> Result<Option<JobRow>> {
        let sql = tombstone!("WHERE id = $3 AND user_id = $4 AND deleted_at IS NULL RETURNING *");
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(now_millis())
            .bind(reason)
            .bind(id)
            .bind(user_id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Turns a live job into a PHI-free tombstone, whoever owns it (expiry). Returns the
    /// tombstone, or `None` if the job was no longer live.
    pub async fn tombstone_job(
        &self,
        id: &JobId,
        reason: DeletionReason,
    ) -> Result<Option<JobRow>> {
        let sql = tombstone!("WHERE id = $3 AND deleted_at IS NULL RETURNING *");
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(now_millis())
            .bind(reason)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Tombstones every live job of a user, destroying every data key in one commit. Returns
    /// the jobs it ended.
    pub async fn tombstone_user(
        &self,
        user_id: &UserId,
        reason: DeletionReason,
    ) -> Result<Vec<JobId>> {
        let sql = tombstone!("WHERE user_id = $3 AND deleted_at IS NULL RETURNING id");
        let ids = on_pool!(self, |p| sqlx::query_scalar::<_, JobId>(sql)
            .bind(now_millis())
            .bind(reason)
            .bind(user_id)
            .fetch_all(p)
            .await)?;
        Ok(ids)
    }

    /// Destroys every data key, result and document reference of one user in one commit and
    /// ends each live job as failed with `error`. Returns the ids of the jobs it touched.
    pub async fn shred_user(
        &self,
        user_prefix: &UserPrefix,
        error: &JobError,
    ) -> Result<Vec<JobId>> {
        let sql = "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
                   error_retryable = $3, result = NULL, document_kek = NULL, document_dek = NULL, \
                   result_kek = NULL, result_dek = NULL, lease_token = NULL, lease_until = NULL, \
                   next_attempt_at = NULL, idempotency_key = NULL, updated_at = $4, \
                   push_token = NULL, push_kek = NULL, push_dek = NULL \
                   WHERE user_prefix = $5 AND deleted_at IS NULL \
                   RETURNING id";
        let ids = on_pool!(self, |p| sqlx::query_scalar::<_, JobId>(sql)
            .bind(&error.code)
            .bind(&error.message)
            .bind(error.retryable)
            .bind(now_millis())
            .bind(user_prefix)
            .fetch_all(p)
            .await)?;
        Ok(ids)
    }

    /// Marks any job's unmanaged failure found outside a claim (a result that fails its
    /// integrity check when read). The trigger enqueues the purge.
    pub async fn mark_unmanaged(&self, id: &JobId) -> Result<()> {
        let sql = "UPDATE jobs SET unmanaged_at = $1 WHERE id = $2 AND unmanaged_at IS NULL";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(now_millis())
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Takes the oldest pending purge (or one whose purger vanished).
    pub async fn claim_purge(&self) -> Result<Option<PurgeRow>> {
        let now = now_millis();
        let row = match self {
            Db::Sqlite(p, ..) => {
                sqlx::query_as::<_, PurgeRow>(CLAIM_PURGE_SQLITE)
                    .bind(now)
                    .bind(now - PURGE_LEASE_MS)
                    .fetch_optional(p)
                    .await
            }
            Db::Postgres(p, ..) => {
                sqlx::query_as::<_, PurgeRow>(CLAIM_PURGE_POSTGRES)
                    .bind(now)
                    .bind(now - PURGE_LEASE_MS)
                    .fetch_optional(p)
                    .await
            }
        }?;
        Ok(row)
    }

    /// Records a finished purge for the audit log.
    pub async fn complete_purge(&self, id: i64, jobs: i64, objects: i64) -> Result<()> {
        let sql = "UPDATE purges SET completed_at = $1, jobs_purged = $2, objects_deleted = $3 \
                   WHERE id = $4";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(now_millis())
            .bind(jobs)
            .bind(objects)
            .bind(id)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Live jobs whose lifetime has ended, oldest first.
    pub async fn expired_jobs(&self, now: i64, limit: i64) -> Result<Vec<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE deleted_at IS NULL AND expires_at <= $1 \
                   ORDER BY expires_at LIMIT $2";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(now)
            .bind(limit)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// Removes tombstones older than `before`.
    pub async fn drop_tombstones(&self, before: i64) -> Result<u64> {
        let sql = "DELETE FROM jobs WHERE deleted_at IS NOT NULL AND deleted_at < $1";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(before)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done)
    }
}
