//! Fair use in SQL: the slots of uploads in flight and open event streams, the provider calls
//! of the spend guard, and the counts the per-user limits read. Rows hold the user's opaque
//! prefix and times only.
//!
//! Every check-and-take runs in one transaction that first writes the user's `user_limits`
//! row: PostgreSQL locks that row until the commit, so instances sharing the database take a
//! user's slots one at a time; SQLite's first write takes its single write lock. What the
//! transaction reads after that write is therefore what it decides on.

use super::{Db, Inserted, JobRow, NewJob, Result};
use crate::ids::UserPrefix;

/// What a slot is held for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    Upload,
    Stream,
}

impl SlotKind {
    fn as_str(self) -> &'static str {
        match self {
            SlotKind::Upload => "upload",
            SlotKind::Stream => "stream",
        }
    }
}

/// What one user holds and did, as the limits read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live slots of the kind asked for.
    pub slots: i64,
    /// Jobs queued, processing or waiting for a retry.
    pub active_jobs: i64,
    /// Jobs created (accepted uploads) since the start of the window.
    pub recent_uploads: i64,
    /// When the oldest of those was created (unix ms).
    pub oldest_recent_upload: Option<i64>,
}

const LOCK_USER: &str = "INSERT INTO user_limits (user_prefix) VALUES ($1) \
     ON CONFLICT (user_prefix) DO UPDATE SET user_prefix = excluded.user_prefix";

const USAGE: &str = "SELECT \
     (SELECT count(*) FROM user_slots WHERE user_prefix = $1 AND kind = $2 AND expires_at > $3), \
     (SELECT count(*) FROM jobs WHERE user_prefix = $1 AND deleted_at IS NULL \
        AND status IN ('queued', 'processing', 'retry_scheduled')), \
     (SELECT count(*) FROM jobs WHERE user_prefix = $1 AND created_at > $4), \
     (SELECT min(created_at) FROM jobs WHERE user_prefix = $1 AND created_at > $4)";

const TAKE_SLOT: &str =
    "INSERT INTO user_slots (id, user_prefix, kind, expires_at) VALUES ($1, $2, $3, $4)";

const RELEASE_SLOT: &str = "DELETE FROM user_slots WHERE id = $1";

// The user's uploads in flight (the upload's own slot is deleted before this runs).
macro_rules! other_upload_slots {
    () => {
        "(SELECT count(*) FROM user_slots WHERE user_prefix = $3 AND kind = 'upload' \
         AND expires_at > $7)"
    };
}

/// The job's insert, if its user's active jobs (cap $13) and uploads since $14 (cap $15),
/// each plus the user's other uploads in flight, stay below their caps.
const INSERT_JOB_ADMITTED: &str = concat!(
    "INSERT INTO jobs (id, user_id, user_prefix, status, media_type, size_bytes, attempts, \
     max_attempts, run_at, idempotency_key, created_at, updated_at, expires_at, document_kek, \
     document_dek, push_token, push_kek, push_dek) \
     SELECT $1, $2, $3, 'queued', $4, $5, 0, $6, $7, $8, $12, $7, $9, $10, $11, $16, $17, $18 \
     WHERE (SELECT count(*) FROM jobs WHERE user_prefix = $3 AND deleted_at IS NULL \
        AND status IN ('queued', 'processing', 'retry_scheduled')) + ",
    other_upload_slots!(),
    " < $13 AND (SELECT count(*) FROM jobs WHERE user_prefix = $3 AND created_at > $14) + ",
    other_upload_slots!(),
    " < $15 RETURNING *"
);

/// [`INSERT_JOB_ADMITTED`] on PostgreSQL in one round trip: the function (migration
/// `20261201000002_one_call_insert.sql`) locks the user, releases the upload's own slot ($19)
/// and runs the same insert, whose counts then see every job committed before the lock. Over a
/// cap it raises [`OVER_A_CAP`] and undoes all three.
const INSERT_JOB_ONE_CALL: &str = "SELECT * FROM medrelay_insert_job($1, $2, $3, $4, $5, $6, \
     $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)";

/// The SQLSTATE of `medrelay_insert_job`'s refusal.
const OVER_A_CAP: &str = "MR001";

/// Caps a job's insert checks (see [`Db::insert_job_admitted`]).
#[derive(Clone, Copy, Debug)]
pub struct InsertCaps {
    /// Where the window of recent uploads starts (unix ms).
    pub since: i64,
    pub active_jobs: i64,
    pub uploads_per_window: i64,
}

impl InsertCaps {
    /// No limit.
    pub const NONE: InsertCaps = InsertCaps {
        since: 0,
        active_jobs: i64::MAX,
        uploads_per_window: i64::MAX,
    };
}

/// Binds a job and its caps to [`INSERT_JOB_ADMITTED`] (a macro: the same binds for both
/// engines' query types).
macro_rules! bind_insert {
    ($job:expr, $caps:expr) => {
        bind_insert!(INSERT_JOB_ADMITTED, $job, $caps)
    };
    ($sql:expr, $job:expr, $caps:expr) => {
        sqlx::query_as::<_, JobRow>($sql)
            .bind(&$job.id)
            .bind(&$job.user_id)
            .bind(&$job.user_prefix)
            .bind($job.media_type)
            .bind($job.size_bytes)
            .bind($job.max_attempts)
            .bind($job.now)
            .bind(&$job.idempotency_key)
            .bind($job.expires_at)
            .bind(&$job.document_key.kid)
            .bind(&$job.document_key.bytes)
            .bind($job.created_at)
            .bind($caps.active_jobs)
            .bind($caps.since)
            .bind($caps.uploads_per_window)
            .bind($job.push_token.as_ref().map(|p| &p.sealed))
            .bind($job.push_token.as_ref().map(|p| &p.key.kid))
            .bind($job.push_token.as_ref().map(|p| &p.key.bytes))
    };
}

/// The user's usage of upload slots, jobs and recent uploads, on `executor` (a macro: a pool
/// or a transaction of either engine).
macro_rules! usage_in {
    ($executor:expr, $prefix:expr, $now:expr, $since:expr) => {
        sqlx::query_as::<_, (i64, i64, i64, Option<i64>)>(USAGE)
            .bind($prefix)
            .bind(SlotKind::Upload.as_str())
            .bind($now)
            .bind($since)
            .fetch_one($executor)
            .await
            .map(
                |(slots, active_jobs, recent_uploads, oldest_recent_upload)| Usage {
                    slots,
                    active_jobs,
                    recent_uploads,
                    oldest_recent_upload,
                },
            )
    };
}

const CALLS: &str = "SELECT count(*) FROM provider_calls WHERE user_prefix = $1 AND called_at > $2";

impl Db {
    /// Reads the user's usage as it is now, without a lock and without a write (the early
    /// check of an upload; the job's insert checks again with the user locked).
    pub async fn usage(
        &self,
        prefix: &UserPrefix,
        kind: SlotKind,
        now: i64,
        since: i64,
    ) -> Result<Usage> {
        let (slots, active_jobs, recent_uploads, oldest_recent_upload) = on_pool!(self, |p| {
            sqlx::query_as::<_, (i64, i64, i64, Option<i64>)>(USAGE)
                .bind(prefix)
                .bind(kind.as_str())
                .bind(now)
                .bind(since)
                .fetch_one(p)
                .await
        })?;
        Ok(Usage {
            slots,
            active_jobs,
            recent_uploads,
            oldest_recent_upload,
        })
    }

    /// Reads the user's usage with the user locked; takes a slot of `kind` until `expires_at`
    /// when `decide` allows it. `since` starts the window of recent uploads. Returns what
    /// `decide` returned.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_slot<E>(
        &self,
        prefix: &UserPrefix,
        slot_id: &str,
        kind: SlotKind,
        now: i64,
        expires_at: i64,
        since: i64,
        decide: impl FnOnce(&Usage) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<(), E>> {
        on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            sqlx::query(LOCK_USER)
                .bind(prefix)
                .execute(&mut *tx)
                .await?;
            let (slots, active_jobs, recent_uploads, oldest_recent_upload): (
                i64,
                i64,
                i64,
                Option<i64>,
            ) = sqlx::query_as(USAGE)
                .bind(prefix)
                .bind(kind.as_str())
                .bind(now)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
            let usage = Usage {
                slots,
                active_jobs,
                recent_uploads,
                oldest_recent_upload,
            };
            let decided = decide(&usage);
            if decided.is_ok() {
                sqlx::query(TAKE_SLOT)
                    .bind(slot_id)
                    .bind(prefix)
                    .bind(kind.as_str())
                    .bind(expires_at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(decided)
        })
    }

    /// Commits a new queued job if the user's limits leave room: its active jobs and its
    /// uploads since `caps.since`, each plus the user's *other* uploads in flight (their
    /// slots, which are about to become jobs), below their caps. The check is part of the
    /// insert statement; on PostgreSQL the user's row in `user_limits` is locked first, in the
    /// same transaction (one call: [`INSERT_JOB_ONE_CALL`]), so instances decide one at a time
    /// per user; SQLite runs the statement under its single write lock. The upload's own slot (if it held one) is deleted in the
    /// same commit. Refused: `refused` is handed the user's usage as the insert saw it (read
    /// in its transaction, the upload's own slot no longer counted), and nothing is written. A concurrent
    /// twin with the same idempotency key yields `Existing` (and is not refused: it creates
    /// nothing).
    pub async fn insert_job_admitted<E>(
        &self,
        job: &NewJob,
        own_slot: Option<&str>,
        caps: InsertCaps,
        refused: impl FnOnce(&Usage) -> E,
    ) -> Result<std::result::Result<Inserted, E>> {
        let postgres = matches!(self, Db::Postgres(..));
        let inserted = async {
            // The common case in one round trip on a held connection: SQLite's insert of an
            // upload without a slot (the write lock held for it alone), PostgreSQL's one call
            // (see INSERT_JOB_ONE_CALL). A refusal, and an upload that holds a slot on
            // SQLite, take the transaction below, which reads the usage to report.
            let fast = if postgres {
                Some(on_held!(self, |c| bind_insert!(
                    INSERT_JOB_ONE_CALL,
                    job,
                    caps
                )
                .bind(own_slot)
                .fetch_optional(c)
                .await))
            } else if own_slot.is_none() {
                Some(on_held!(self, |c| bind_insert!(job, caps)
                    .fetch_optional(c)
                    .await))
            } else {
                None
            };
            match fast {
                Some(Ok(Some(row))) => return Ok(Ok(row)),
                Some(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some(OVER_A_CAP) => {}
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) | None => {}
            }
            on_pool!(self, |p| async {
                let mut tx = p.begin().await?;
                if postgres {
                    sqlx::query(LOCK_USER)
                        .bind(&job.user_prefix)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(slot) = own_slot {
                    sqlx::query(RELEASE_SLOT)
                        .bind(slot)
                        .execute(&mut *tx)
                        .await?;
                }
                let Some(row) = bind_insert!(job, caps).fetch_optional(&mut *tx).await? else {
                    let usage = usage_in!(&mut *tx, &job.user_prefix, job.now, caps.since)?;
                    return Ok(Err(usage));
                };
                tx.commit().await?;
                Ok::<_, sqlx::Error>(Ok(row))
            }
            .await)
        }
        .await;
        match inserted {
            Ok(Ok(row)) => Ok(Ok(Inserted::Created(Box::new(row)))),
            Ok(Err(usage)) => Ok(Err(refused(&usage))),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let Some(key) = job.idempotency_key.as_deref() else {
                    return Err(sqlx::Error::Database(e).into());
                };
                // The twin committed first; it is there to read (a vanished twin is a bug).
                let existing = self
                    .find_by_idempotency_key(&job.user_id, key)
                    .await?
                    .ok_or(super::DbError::NotFound)?;
                Ok(Ok(Inserted::Existing(Box::new(existing))))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps a slot (an open stream) alive until `expires_at`.
    pub async fn renew_slot(&self, slot_id: &str, expires_at: i64) -> Result<()> {
        let sql = "UPDATE user_slots SET expires_at = $1 WHERE id = $2";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(expires_at)
            .bind(slot_id)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn release_slot(&self, slot_id: &str) -> Result<()> {
        on_pool!(self, |p| sqlx::query(RELEASE_SLOT)
            .bind(slot_id)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Records `calls` provider calls of the user at `now` if the calls made since `since`
    /// leave room for all of them within `per_window`. `false`: refused, none recorded.
    pub async fn charge_provider_calls(
        &self,
        prefix: &UserPrefix,
        calls: u32,
        now: i64,
        since: i64,
        per_window: i64,
    ) -> Result<bool> {
        on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            sqlx::query(LOCK_USER)
                .bind(prefix)
                .execute(&mut *tx)
                .await?;
            let (made,): (i64,) = sqlx::query_as(CALLS)
                .bind(prefix)
                .bind(since)
                .fetch_one(&mut *tx)
                .await?;
            let allowed = made + i64::from(calls) <= per_window;
            if allowed {
                for _ in 0..calls {
                    sqlx::query(
                        "INSERT INTO provider_calls (user_prefix, called_at) VALUES ($1, $2)",
                    )
                    .bind(prefix)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(allowed)
        })
    }

    /// Drops lapsed slots, provider calls older than `calls_before`, and the lock rows of
    /// users with neither left. Returns the rows dropped.
    pub async fn drop_lapsed_limits(&self, now: i64, calls_before: i64) -> Result<u64> {
        let mut dropped = 0;
        on_pool!(self, |p| {
            dropped += sqlx::query("DELETE FROM user_slots WHERE expires_at <= $1")
                .bind(now)
                .execute(p)
                .await?
                .rows_affected();
            dropped += sqlx::query("DELETE FROM provider_calls WHERE called_at <= $1")
                .bind(calls_before)
                .execute(p)
                .await?
                .rows_affected();
            dropped += sqlx::query(
                "DELETE FROM user_limits WHERE NOT EXISTS \
                 (SELECT 1 FROM user_slots s WHERE s.user_prefix = user_limits.user_prefix) \
                 AND NOT EXISTS \
                 (SELECT 1 FROM provider_calls c WHERE c.user_prefix = user_limits.user_prefix)",
            )
            .execute(p)
            .await?
            .rows_affected();
        });
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::INSERT_JOB_ADMITTED;

    fn words(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// PostgreSQL's one-call insert runs the same statement as SQLite and the transaction of
    /// old: a cap changed in one place only would hold on one engine and not the other. The
    /// newest migration that defines the function is the one in force.
    #[test]
    fn the_one_call_insert_runs_the_same_statement() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        let function = files
            .iter()
            .rev()
            .map(|path| std::fs::read_to_string(path).unwrap())
            .find(|sql| sql.contains("FUNCTION medrelay_insert_job("))
            .expect("a migration defines medrelay_insert_job");
        let body = words(&function).replace("( SELECT", "(SELECT");
        assert!(
            body.contains(&words(INSERT_JOB_ADMITTED)),
            "medrelay_insert_job's insert differs from INSERT_JOB_ADMITTED:\n{}\n{}",
            words(INSERT_JOB_ADMITTED),
            body
        );
    }
}
