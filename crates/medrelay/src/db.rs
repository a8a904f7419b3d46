//! Job state in SQL: SQLite by default, PostgreSQL when several instances share the load.
//!
//! Owns the `jobs` table and every statement on it. Both backends run the same SQL text
//! (sqlx maps `$1` placeholders on SQLite too) except where a dialect differs (the claim).
//! Every transition of a claimed job is a compare-and-set on its status and lease token, so a
//! late writer changes nothing. This module never sees document bytes.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;

use crate::crypto::WrappedKey;
use crate::model::{Job, JobError, JobStatus};

/// Runs the same statement on whichever pool backs the database.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// The job database. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A `jobs` row.
#[derive(Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub user_id: String,
    pub user_prefix: String,
    pub status: String,
    pub media_type: String,
    pub size_bytes: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub next_attempt_at: Option<i64>,
    pub lease_token: Option<String>,
    pub lease_until: Option<i64>,
    pub result: Option<Vec<u8>>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub error_retryable: Option<bool>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
    pub deleted_at: Option<i64>,
    pub deleted_reason: Option<String>,
    pub document_kek: Option<String>,
    pub document_dek: Option<Vec<u8>>,
    pub result_kek: Option<String>,
    pub result_dek: Option<Vec<u8>>,
    pub unmanaged_at: Option<i64>,
}

/// A purge of one user's data, as queued by the database and recorded for audit.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PurgeRow {
    pub id: i64,
    pub user_prefix: String,
    pub reason: String,
    pub job_id: Option<String>,
    pub requested_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub jobs_purged: Option<i64>,
    pub objects_deleted: Option<i64>,
}

/// A claimed purge is taken over by another instance when it has not finished in this time.
pub const PURGE_LEASE_MS: i64 = 60_000;

const CLAIM_PURGE_POSTGRES: &str = "UPDATE purges SET started_at = $1 WHERE id = (SELECT id FROM purges \
     WHERE completed_at IS NULL AND (started_at IS NULL OR started_at < $2) \
     ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING *";
const CLAIM_PURGE_SQLITE: &str = "UPDATE purges SET started_at = $1 WHERE id = (SELECT id FROM purges \
     WHERE completed_at IS NULL AND (started_at IS NULL OR started_at < $2) \
     ORDER BY id LIMIT 1) RETURNING *";

impl std::fmt::Debug for JobRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRow")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl JobRow {
    /// The wrapped data key of the document, while the document exists.
    pub fn document_key(&self) -> Option<WrappedKey> {
        Some(WrappedKey {
            kid: self.document_kek.clone()?,
            bytes: self.document_dek.clone()?,
        })
    }

    /// The wrapped data key of the result, while the result exists.
    pub fn result_key(&self) -> Option<WrappedKey> {
        Some(WrappedKey {
            kid: self.result_kek.clone()?,
            bytes: self.result_dek.clone()?,
        })
    }

    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    /// The Job of api.md, without its result (the caller decodes that).
    pub fn to_job(&self) -> Job {
        let error = self.error_code.as_ref().map(|code| JobError {
            code: code.clone(),
            message: self.error_message.clone().unwrap_or_default(),
            retryable: self.error_retryable.unwrap_or(false),
        });
        Job {
            id: self.id.clone(),
            status: self.status(),
            media_type: self.media_type.clone(),
            size_bytes: self.size_bytes,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            next_attempt_at: self.next_attempt_at.map(from_millis),
            created_at: from_millis(self.created_at),
            updated_at: from_millis(self.updated_at),
            expires_at: from_millis(self.expires_at),
            result: None,
            error,
        }
    }
}

/// A new job, about to be committed after its document was stored.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub user_id: String,
    pub user_prefix: String,
    pub media_type: String,
    pub size_bytes: i64,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
    pub document_key: WrappedKey,
    pub now: i64,
    pub expires_at: i64,
}

/// What inserting a job did.
#[derive(Debug)]
pub enum Inserted {
    Created(Box<JobRow>),
    /// Another request with the same idempotency key won the race.
    Existing(Box<JobRow>),
}

pub fn now_millis() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

const CLAIM_POSTGRES: &str = "UPDATE jobs SET status = 'processing', attempts = attempts + 1, \
     lease_token = $1, lease_until = $2, updated_at = $3, next_attempt_at = NULL \
     WHERE id IN (SELECT id FROM jobs WHERE deleted_at IS NULL AND expires_at > $3 \
        AND attempts < max_attempts \
        AND ((status IN ('queued', 'retry_scheduled') AND run_at <= $3) \
             OR (status = 'processing' AND lease_until < $3)) \
        ORDER BY run_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
     RETURNING *";

// SQLite has one writer at a time and runs this statement atomically; no row locks needed.
const CLAIM_SQLITE: &str = "UPDATE jobs SET status = 'processing', attempts = attempts + 1, \
     lease_token = $1, lease_until = $2, updated_at = $3, next_attempt_at = NULL \
     WHERE id IN (SELECT id FROM jobs WHERE deleted_at IS NULL AND expires_at > $3 \
        AND attempts < max_attempts \
        AND ((status IN ('queued', 'retry_scheduled') AND run_at <= $3) \
             OR (status = 'processing' AND lease_until < $3)) \
        ORDER BY run_at LIMIT $4) \
     RETURNING *";

impl Db {
    /// Connects and runs the backend's migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Db> {
        let db = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .with_context(|| "invalid SQLite database URL")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // WAL + NORMAL is durable against process crashes, which is what a 202
                // promises; FULL would add an fsync per commit for power loss only.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(15))
                .foreign_keys(true);
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).with_context(|| {
                    format!("creating the database folder {}", parent.display())
                })?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(8)
                .connect_with(options)
                .await
                .context("opening the SQLite database")?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&pool)
                .await
                .context("migrating the SQLite database")?;
            Db::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options =
                PgConnectOptions::from_str(url).context("invalid PostgreSQL database URL")?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .context("connecting to PostgreSQL")?;
            sqlx::migrate!("./migrations/postgres")
                .run(&pool)
                .await
                .context("migrating the PostgreSQL database")?;
            Db::Postgres(pool)
        } else {
            anyhow::bail!("MEDRELAY_DATABASE_URL must start with sqlite: or postgres:");
        };
        Ok(db)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        on_pool!(self, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, |p| p.close().await)
    }

    /// The live job with this idempotency key of this user, if any.
    pub async fn find_by_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> anyhow::Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE user_id = $1 AND idempotency_key = $2 \
                   AND deleted_at IS NULL";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(user_id)
            .bind(key)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Commits a new queued job. A concurrent twin with the same idempotency key yields
    /// `Existing` instead of a second job.
    pub async fn insert_job(&self, job: &NewJob) -> anyhow::Result<Inserted> {
        let sql = "INSERT INTO jobs (id, user_id, user_prefix, status, media_type, size_bytes, \
                   attempts, max_attempts, run_at, idempotency_key, created_at, updated_at, \
                   expires_at, document_kek, document_dek) \
                   VALUES ($1, $2, $3, 'queued', $4, $5, 0, $6, $7, $8, $7, $7, $9, $10, $11) \
                   RETURNING *";
        let inserted = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(&job.id)
            .bind(&job.user_id)
            .bind(&job.user_prefix)
            .bind(&job.media_type)
            .bind(job.size_bytes)
            .bind(job.max_attempts)
            .bind(job.now)
            .bind(&job.idempotency_key)
            .bind(job.expires_at)
            .bind(&job.document_key.kid)
            .bind(&job.document_key.bytes)
            .fetch_one(p)
            .await);
        match inserted {
            Ok(row) => Ok(Inserted::Created(Box::new(row))),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let key = job
                    .idempotency_key
                    .as_deref()
                    .context("unique violation without an idempotency key")?;
                let existing = self
                    .find_by_idempotency_key(&job.user_id, key)
                    .await?
                    .context("idempotency twin vanished")?;
                Ok(Inserted::Existing(Box::new(existing)))
            }
            Err(e) => Err(e).context("inserting a job"),
        }
    }

    /// A live (not deleted) job of this user. Another user's job is `None`, as if absent.
    pub async fn get_job(&self, user_id: &str, id: &str) -> anyhow::Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE id = $1 AND user_id = $2";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(id)
            .bind(user_id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// A job of this user, live or tombstoned. Tombstones keep the opaque user prefix instead
    /// of the user id, so they are found by that.
    pub async fn get_job_or_tombstone(
        &self,
        user_id: &str,
        user_prefix: &str,
        id: &str,
    ) -> anyhow::Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE id = $1 \
                   AND (user_id = $2 OR (deleted_at IS NOT NULL AND user_id = $3))";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(id)
            .bind(user_id)
            .bind(user_prefix)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Any job by id (workers and the sweeper).
    pub async fn get_job_by_id(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE id = $1";
        let row = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// The caller's live jobs, newest first.
    pub async fn list_jobs(&self, user_id: &str, limit: i64) -> anyhow::Result<Vec<JobRow>> {
        let sql = "SELECT * FROM jobs WHERE user_id = $1 AND deleted_at IS NULL \
                   AND expires_at > $3 ORDER BY created_at DESC, id DESC LIMIT $2";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, JobRow>(sql)
            .bind(user_id)
            .bind(limit)
            .bind(now_millis())
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// Claims up to `limit` due jobs (queued, due for retry, or with an expired lease) under a
    /// fresh lease. The attempt is counted here, so a crash during processing counts too.
    pub async fn claim(
        &self,
        lease_token: &str,
        lease: Duration,
        limit: i64,
    ) -> anyhow::Result<Vec<JobRow>> {
        let now = now_millis();
        let lease_until = now + millis(lease);
        let rows = match self {
            Db::Sqlite(p) => {
                sqlx::query_as::<_, JobRow>(CLAIM_SQLITE)
                    .bind(lease_token)
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
            }
            Db::Postgres(p) => {
                sqlx::query_as::<_, JobRow>(CLAIM_POSTGRES)
                    .bind(lease_token)
                    .bind(lease_until)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(p)
                    .await
            }
        }
        .context("claiming jobs")?;
        Ok(rows)
    }

    /// Extends a lease. `false` when the lease was lost (the job moved on without us).
    pub async fn heartbeat(
        &self,
        id: &str,
        lease_token: &str,
        lease: Duration,
    ) -> anyhow::Result<bool> {
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
        id: &str,
        lease_token: &str,
        result: &[u8],
        result_key: &WrappedKey,
    ) -> anyhow::Result<bool> {
        let sql = "UPDATE jobs SET status = 'succeeded', result = $1, result_kek = $5, \
                   result_dek = $6, document_kek = NULL, document_dek = NULL, lease_token = NULL, \
                   lease_until = NULL, next_attempt_at = NULL, updated_at = $2 \
                   WHERE id = $3 AND lease_token = $4 AND status = 'processing' \
                   AND deleted_at IS NULL AND expires_at > $2";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(result)
            .bind(now_millis())
            .bind(id)
            .bind(lease_token)
            .bind(&result_key.kid)
            .bind(&result_key.bytes)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Marks a claimed job failed and destroys its document's key. An `unmanaged` failure also
    /// sets `unmanaged_at`, on which the database's trigger queues a purge of the user. `false`
    /// if the lease was lost.
    pub async fn fail(
        &self,
        id: &str,
        lease_token: &str,
        error: &JobError,
        unmanaged: bool,
    ) -> anyhow::Result<bool> {
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
        id: &str,
        lease_token: &str,
        run_at: i64,
    ) -> anyhow::Result<bool> {
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

    /// Hands a job this instance will not finish (shutdown) back to the queue, so that another
    /// instance takes it at once. A graceful hand-back does not use up an attempt: a deploy
    /// must not exhaust a job's retries (a crash, which cannot hand back, still counts).
    pub async fn release(&self, id: &str, lease_token: &str) -> anyhow::Result<bool> {
        let sql = "UPDATE jobs SET status = 'queued', attempts = attempts - 1, run_at = 0, \
                   lease_token = NULL, lease_until = NULL \
                   WHERE id = $1 AND lease_token = $2 AND status = 'processing'";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .bind(lease_token)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Turns a job of this user into a PHI-free tombstone: result, error text, keys and lease
    /// are dropped, and the user id is replaced by the opaque user prefix. Returns the row as it was, or `None` if there was no live job.
    pub async fn tombstone_job(
        &self,
        user_id: &str,
        id: &str,
        reason: &str,
    ) -> anyhow::Result<Option<JobRow>> {
        let before = match self.get_job(user_id, id).await? {
            Some(row) if row.deleted_at.is_none() => row,
            _ => return Ok(None),
        };
        let sql = "UPDATE jobs SET deleted_at = $1, deleted_reason = $2, result = NULL, \
                   error_message = NULL, idempotency_key = NULL, lease_token = NULL, \
                   lease_until = NULL, updated_at = $1, document_kek = NULL, document_dek = NULL, \
                   result_kek = NULL, result_dek = NULL, user_id = user_prefix \
                   WHERE id = $3 AND user_id = $4 AND deleted_at IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(now_millis())
            .bind(reason)
            .bind(id)
            .bind(user_id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok((done == 1).then_some(before))
    }

    /// Tombstones every live job of a user, destroying every data key in one commit.
    pub async fn tombstone_user(&self, user_id: &str, reason: &str) -> anyhow::Result<u64> {
        let sql = "UPDATE jobs SET deleted_at = $1, deleted_reason = $2, result = NULL, \
                   error_message = NULL, idempotency_key = NULL, lease_token = NULL, \
                   lease_until = NULL, updated_at = $1, document_kek = NULL, document_dek = NULL, \
                   result_kek = NULL, result_dek = NULL, user_id = user_prefix \
                   WHERE user_id = $3 AND deleted_at IS NULL";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(now_millis())
            .bind(reason)
            .bind(user_id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done)
    }

    /// Fails jobs whose lease ran out on their last allowed attempt (a crash or a hang on the
    /// final try): they will not be claimed again. Returns them, so their documents can go.
    pub async fn fail_exhausted(&self, error: &JobError) -> anyhow::Result<Vec<JobRow>> {
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

    /// Marks any job's unmanaged failure found outside a claim (a result that fails its
    /// integrity check when read). The trigger enqueues the purge.
    pub async fn mark_unmanaged(&self, id: &str) -> anyhow::Result<()> {
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
    pub async fn claim_purge(&self) -> anyhow::Result<Option<PurgeRow>> {
        let now = now_millis();
        let row = match self {
            Db::Sqlite(p) => {
                sqlx::query_as::<_, PurgeRow>(CLAIM_PURGE_SQLITE)
                    .bind(now)
                    .bind(now - PURGE_LEASE_MS)
                    .fetch_optional(p)
                    .await
            }
            Db::Postgres(p) => {
                sqlx::query_as::<_, PurgeRow>(CLAIM_PURGE_POSTGRES)
                    .bind(now)
                    .bind(now - PURGE_LEASE_MS)
                    .fetch_optional(p)
                    .await
            }
        }
        .context("claiming a purge")?;
        Ok(row)
    }

    /// Destroys every data key, result and document reference of one user in one commit and
    /// ends each live job as failed with `error`. Returns the ids of the jobs it touched.
    pub async fn shred_user(
        &self,
        user_prefix: &str,
        error: &JobError,
    ) -> anyhow::Result<Vec<String>> {
        let sql = "UPDATE jobs SET status = 'failed', error_code = $1, error_message = $2, \
                   error_retryable = $3, result = NULL, document_kek = NULL, document_dek = NULL, \
                   result_kek = NULL, result_dek = NULL, lease_token = NULL, lease_until = NULL, \
                   next_attempt_at = NULL, idempotency_key = NULL, updated_at = $4 \
                   WHERE user_prefix = $5 AND deleted_at IS NULL \
                   RETURNING id";
        let ids = on_pool!(self, |p| sqlx::query_scalar::<_, String>(sql)
            .bind(&error.code)
            .bind(&error.message)
            .bind(error.retryable)
            .bind(now_millis())
            .bind(user_prefix)
            .fetch_all(p)
            .await)?;
        Ok(ids)
    }

    /// Records a finished purge for the audit log.
    pub async fn complete_purge(&self, id: i64, jobs: i64, objects: i64) -> anyhow::Result<()> {
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

    /// The purge audit log, newest first.
    pub async fn purges(&self) -> anyhow::Result<Vec<PurgeRow>> {
        let sql = "SELECT * FROM purges ORDER BY id DESC";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, PurgeRow>(sql)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }

    /// Whether a job row (live or tombstoned) exists for this user prefix and job id.
    pub async fn job_exists(&self, user_prefix: &str, id: &str) -> anyhow::Result<bool> {
        let sql =
            "SELECT COUNT(*) FROM jobs WHERE id = $1 AND user_prefix = $2 AND deleted_at IS NULL";
        let n = on_pool!(self, |p| sqlx::query_scalar::<_, i64>(sql)
            .bind(id)
            .bind(user_prefix)
            .fetch_one(p)
            .await)?;
        Ok(n > 0)
    }

    /// Live jobs whose lifetime has ended, oldest first.
    pub async fn expired_jobs(&self, now: i64, limit: i64) -> anyhow::Result<Vec<JobRow>> {
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
    pub async fn drop_tombstones(&self, before: i64) -> anyhow::Result<u64> {
        let sql = "DELETE FROM jobs WHERE deleted_at IS NOT NULL AND deleted_at < $1";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(before)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done)
    }

    /// Live jobs by status, for `/metrics`.
    pub async fn count_by_status(&self) -> anyhow::Result<Vec<(String, i64)>> {
        let sql = "SELECT status, COUNT(*) FROM jobs WHERE deleted_at IS NULL GROUP BY status";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, (String, i64)>(sql)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }
}
