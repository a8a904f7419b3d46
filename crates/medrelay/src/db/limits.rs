//! Fair use in SQL: the slots of uploads in flight and open event streams, the provider calls
//! of the spend guard, and the counts the per-user limits read. Rows hold the user's opaque
//! prefix and times only.
//!
//! Every check-and-take runs in one transaction that first writes the user's `user_limits`
//! row: PostgreSQL locks that row until the commit, so instances sharing the database take a
//! user's slots one at a time; SQLite's first write takes its single write lock. What the
//! transaction reads after that write is therefore what it decides on.

use super::{Db, Result};
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

const CALLS: &str = "SELECT count(*) FROM provider_calls WHERE user_prefix = $1 AND called_at > $2";

impl Db {
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
        let sql = "DELETE FROM user_slots WHERE id = $1";
        on_pool!(self, |p| sqlx::query(sql)
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
