//! The API's reads: one job, a user's jobs, an idempotency key, counts for `/metrics`, the
//! purge audit log. Nothing here writes.

use super::{Db, JobRow, PurgeRow, Result};
use crate::clock::now_millis;
use crate::ids::{JobId, UserId, UserPrefix};
use crate::model::JobStatus;

/// The caller's live jobs, newest first: read through `jobs_idempotency`, which leads with the
/// user id (migration `20261201000003`), then sorted (the caps bound how many there are).
const LIST_JOBS: &str = "SELECT * FROM jobs WHERE user_id = $1 AND deleted_at IS NULL \
                         AND expires_at > $3 ORDER BY created_at DESC, id DESC LIMIT $2";

impl Db {
    /// The live job with this idempotency key of this user, if any.
    pub async fn find_by_idempotency_key(
        &self,
        user_id: &UserId,
        key: &str,
    ) -> Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE user_id = $1 AND idempotency_key = $2 \
                   AND deleted_at IS NULL";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(user_id)
            .bind(key)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// A job of this user, live or tombstoned. Tombstones keep the opaque user prefix instead
    /// of the user id, so they are found by that. Another user's job is `None`, as if absent.
    pub async fn get_job_or_tombstone(
        &self,
        user_id: &UserId,
        user_prefix: &UserPrefix,
        id: &JobId,
    ) -> Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE id = $1 \
                   AND (user_id = $2 OR (deleted_at IS NOT NULL AND user_id = $3))";
        let row = on_held!(self, |c| sqlx::query_as::<_, JobRow>(sql)
            .bind(id)
            .bind(user_id)
            .bind(user_prefix)
            .fetch_optional(c)
            .await)?;
        Ok(row)
    }

    /// Any job by id, whoever owns it (workers, the sweeper, tests).
    pub async fn get_job_by_id(&self, id: &JobId) -> Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE id = $1";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// The caller's live jobs, newest first.
    pub async fn list_jobs(&self, user_id: &UserId, limit: i64) -> Result<Vec<JobRow>> {
        let rows = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(LIST_JOBS)
            .bind(user_id)
            .bind(limit)
            .bind(now_millis())
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// The database's plan for [`Db::list_jobs`], one line per plan row (for the test that
    /// keeps it on an index).
    pub async fn explain_list_jobs(&self) -> Result<Vec<String>> {
        let read = LIST_JOBS
            .replace("$1", "'plan'")
            .replace("$2", "100")
            .replace("$3", "0");
        self.explain(&read, "").await
    }

    /// The plan of `read` (parameters already spelled out), one line per plan row:
    /// `EXPLAIN QUERY PLAN` on SQLite, `EXPLAIN` of `read` + `postgres_tail` on PostgreSQL.
    pub(super) async fn explain(&self, read: &str, postgres_tail: &str) -> Result<Vec<String>> {
        let lines = match self {
            Db::Sqlite(p, ..) => {
                let sql = format!("EXPLAIN QUERY PLAN {read}");
                sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(sql))
                    .fetch_all(p)
                    .await?
                    .into_iter()
                    .map(|(_, _, _, detail)| detail)
                    .collect()
            }
            Db::Postgres(p, ..) => {
                let sql = format!("EXPLAIN {read}{postgres_tail}");
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(lines)
    }

    /// Live jobs by status, for `/metrics`.
    pub async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        let sql = "SELECT status, COUNT(*) FROM jobs WHERE deleted_at IS NULL GROUP BY status";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, (JobStatus, i64)>(sql)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// The purge audit log, newest first.
    pub async fn purges(&self) -> Result<Vec<PurgeRow>> {
        let sql = "SELECT * FROM purges ORDER BY id DESC";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, PurgeRow>(sql)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }
}
