//! The queue's transitions: enqueue, claim, heartbeat, complete, fail, retry, release, and the
//! rescue of jobs whose last attempt lost its lease.
//!
//! Every transition of a claimed job is a compare-and-set on its status and lease token, so a
//! late writer changes nothing. The attempt is counted at the claim, so a crash counts too.

use std::sync::LazyLock;
use std::time::Duration;

use super::{Db, Inserted, JobRow, NewJob, Result};
use crate::clock::{millis, now_millis};
use crate::crypto::WrappedKey;
use crate::ids::{JobId, LeaseToken};
use crate::model::JobError;

// The claim reads the `jobs_waiting` partial index in run_at order and stops at its LIMIT:
// its WHERE repeats the index's predicate term for term (SQLite uses a partial index only
// then), and has no `OR`, so its cost does not grow with the jobs that are not waiting
// (`tests/it/queue.rs` checks both plans). Jobs whose lease ran out are not claimed here:
// `rescue_lost_leases` queues them again, on the worker's timer.
//
// The locked rows are picked once, in a MATERIALIZED CTE: with `WHERE id IN (SELECT … LIMIT n
// FOR UPDATE SKIP LOCKED)` the planner may run the subquery more than once (as the inner side
// of a join) and claim more than `n` rows, which then wait for a worker slot without a
// heartbeat while their leases lapse.
const CLAIM_PICK: &str = "SELECT id FROM jobs \
        WHERE deleted_at IS NULL AND status IN ('queued', 'retry_scheduled') \
        AND run_at <= $3 AND expires_at > $3 AND attempts < max_attempts \
        ORDER BY run_at LIMIT $4";

const CLAIM_SET: &str = "SET status = 'processing', attempts = attempts + 1, \
     lease_token = $1, lease_until = $2, updated_at = $3, next_attempt_at = NULL";

static CLAIM_POSTGRES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH picked AS MATERIALIZED ({CLAIM_PICK} FOR UPDATE SKIP LOCKED) \
         UPDATE jobs {CLAIM_SET} FROM picked WHERE jobs.id = picked.id RETURNING jobs.*"
    )
});

// SQLite has one writer at a time and runs this statement atomically; no row locks needed.
static CLAIM_SQLITE: LazyLock<String> =
    LazyLock::new(|| format!("UPDATE jobs {CLAIM_SET} WHERE id IN ({CLAIM_PICK}) RETURNING *"));

impl Db {
    /// Commits a new queued job without a limit (tests, tools). A concurrent twin with the
    /// same idempotency key yields `Existing` instead of a second job.
    pub async fn insert_job(&self, job: &NewJob) -> Result<Inserted> {
        let admitted = self
            .insert_job_admitted(job, None, super::InsertCaps::NONE, |_| ())
            .await?;
        admitted.map_err(|()| super::DbError::NotFound)
    }

    /// Claims up to `limit` due jobs (queued, due for retry, or with an expired lease) under a
    /// fresh lease. The attempt is counted here, so a crash during processing counts too.
    pub async fn claim(
        &self,
        lease_token: &LeaseToken,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let now = now_millis();
        let lease_until = now + millis(lease);
        let sql = match self {
            Db::Sqlite(..) => CLAIM_SQLITE.as_str(),
            Db::Postgres(..) => CLAIM_POSTGRES.as_str(),
        };
        let rows = on_held!(self, |c| sqlx::query_as::<_, JobRow>(sql)
            .bind(lease_token)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .fetch_all(c)
            .await)?;
        Ok(rows)
    }

    /// The database's plan for the claim's read of waiting jobs (`EXPLAIN` on PostgreSQL,
    /// `EXPLAIN QUERY PLAN` on SQLite), one line per plan row: for operators, and for the
    /// test that keeps the claim on its index.
    pub async fn explain_claim(&self) -> Result<Vec<String>> {
        // The read alone, its two parameters (now and the limit) renumbered.
        let pick = CLAIM_PICK
            .replace("$3", &now_millis().to_string())
            .replace("$4", "1");
        self.explain(&pick, " FOR UPDATE SKIP LOCKED").await
    }

    /// Extends a lease. `false` when the lease was lost (the job moved on without us).
    pub async fn heartbeat(
        &self,
        id: &JobId,
        lease_token: &LeaseToken,
        lease: Duration,
    ) -> Result<bool> {
        let now = now_millis();
        let sql = "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_token = $3 \
                   AND status = 'processing' AND deleted_at IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(now + millis(lease))
            .bind(id)
            .bind(lease_token)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Marks a claimed job succeeded with its encrypted result, and destroys the document's
    /// data key in the same commit. `false` if the lease was lost.
    pub async fn complete(
        &self,
        id: &JobId,
        lease_token: &LeaseToken,
        result: &[u8],
        result_key: &WrappedKey,
    ) -> Result<bool> {
        let sql = "UPDATE jobs SET status = 'succeeded', result = $1, result_kek = $5, \
                   result_dek = $6, document_kek = NULL, document_dek = NULL, lease_token = NULL, \
                   lease_until = NULL, next_attempt_at = NULL, updated_at = $2 \
                   WHERE id = $3 AND lease_token = $4 AND status = 'processing' \
                   AND deleted_at IS NULL AND expires_at > $2";
        let done = on_held!(self, |c| sqlx::query(sql)
            .bind(result)
            .bind(now_millis())
            .bind(id)
            .bind(lease_token)
            .bind(&result_key.kid)
            .bind(&result_key.bytes)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Takes the push token of a job that ended: `true` for the one caller that cleared it,
    /// which alone sends the job's push (once, across instances; a crash after this loses the
    /// push, never doubles it). `false` when it was taken already or the job was deleted.
    pub async fn take_push_token(&self, id: &JobId) -> Result<bool> {
        let sql = "UPDATE jobs SET push_token = NULL, push_kek = NULL, push_dek = NULL \
                   WHERE id = $1 AND push_token IS NOT NULL AND deleted_at IS NULL";
        let taken = on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(taken == 1)
    }

    /// Marks a claimed job failed and destroys its document's key. An `unmanaged` failure also
    /// sets `unmanaged_at`, on which the database's trigger queues a purge of the user. `false`
    /// if the lease was lost.
    pub async fn fail(
        &self,
        id: &JobId,
        lease_token: &LeaseToken,
        error: &JobError,
        unmanaged: bool,
    ) -> Result<bool> {
        let sql = "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
                   error_retryable = $3, lease_token = NULL, lease_until = NULL, \
                   document_kek = NULL, document_dek = NULL, \
                   next_attempt_at = NULL, updated_at = $4, \
                   unmanaged_at = CASE WHEN $7 THEN $4 ELSE unmanaged_at END \
                   WHERE id = $5 AND lease_token = $6 AND status = 'processing' \
                   AND deleted_at IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(&error.code)
            .bind(&error.message)
            .bind(error.retryable)
            .bind(now_millis())
            .bind(id)
            .bind(lease_token)
            .bind(unmanaged)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Schedules a retry of a claimed job at `run_at`. `false` if the lease was lost.
    pub async fn schedule_retry(
        &self,
        id: &JobId,
        lease_token: &LeaseToken,
        run_at: i64,
    ) -> Result<bool> {
        let sql = "UPDATE jobs SET status = 'retry_scheduled', run_at = $1, next_attempt_at = $1, \
                   lease_token = NULL, lease_until = NULL, updated_at = $2 \
                   WHERE id = $3 AND lease_token = $4 AND status = 'processing' \
                   AND deleted_at IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(run_at)
            .bind(now_millis())
            .bind(id)
            .bind(lease_token)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Hands a job this instance will not finish back to the queue, due at `run_at` (0: at
    /// once, as on shutdown). A hand-back does not use up an attempt: a deploy or a missing
    /// master key must not exhaust a job's retries (a crash, which cannot hand back, counts).
    pub async fn release(&self, id: &JobId, lease_token: &LeaseToken, run_at: i64) -> Result<bool> {
        let sql = "UPDATE jobs SET status = 'queued', attempts = attempts - 1, run_at = $3, \
                   lease_token = NULL, lease_until = NULL \
                   WHERE id = $1 AND lease_token = $2 AND status = 'processing'";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .bind(lease_token)
            .bind(run_at)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Queues again the jobs whose lease ran out (their worker died or hung) and that may be
    /// tried again: attempts left and no lease lost before. The lost lease is counted; the
    /// attempt was counted at the claim. Returns how many.
    pub async fn rescue_lost_leases(&self) -> Result<u64> {
        let sql = "UPDATE jobs SET status = 'queued', run_at = $1, lease_token = NULL, \
                   lease_until = NULL, lost_leases = lost_leases + 1, updated_at = $1 \
                   WHERE deleted_at IS NULL AND status = 'processing' AND lease_until < $1 \
                   AND lost_leases < 1 AND attempts < max_attempts";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(now_millis())
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done)
    }

    /// Fails, as unmanaged, jobs whose lease ran out a second time: their worker died twice
    /// without a word (a poison pill that kills whoever parses it). The mark makes the
    /// database's trigger queue a purge of the user. Returns them, so their documents can go.
    pub async fn fail_poisoned(&self, error: &JobError) -> Result<Vec<JobRow>> {
        let sql = "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
                   error_retryable = $3, lease_token = NULL, lease_until = NULL, \
                   document_kek = NULL, document_dek = NULL, next_attempt_at = NULL, \
                   updated_at = $4, lost_leases = lost_leases + 1, \
                   unmanaged_at = COALESCE(unmanaged_at, $4) \
                   WHERE deleted_at IS NULL AND status = 'processing' AND lease_until < $4 \
                   AND lost_leases >= 1 \
                   RETURNING *";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(&error.code)
            .bind(&error.message)
            .bind(error.retryable)
            .bind(now_millis())
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// Fails jobs whose lease ran out on their last allowed attempt (a crash or a hang on the
    /// final try): they will not be claimed again. Returns them, so their documents can go.
    pub async fn fail_exhausted(&self, error: &JobError) -> Result<Vec<JobRow>> {
        let sql = "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
                   error_retryable = $3, lease_token = NULL, lease_until = NULL, \
                   document_kek = NULL, document_dek = NULL, next_attempt_at = NULL, \
                   updated_at = $4 \
                   WHERE deleted_at IS NULL AND status = 'processing' AND lease_until < $4 \
                   AND attempts >= max_attempts \
                   RETURNING *";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(&error.code)
            .bind(&error.message)
            .bind(error.retryable)
            .bind(now_millis())
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }
}
