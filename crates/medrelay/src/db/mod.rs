//! Job state in SQL: SQLite by default, PostgreSQL when several instances share the load.
//!
//! SQL and nothing else: this module owns the `jobs`, `uploads` and `purges` tables and every statement
//! on them, and never deletes an object, sees a document byte or decides a rule. The rules
//! (what ends a job, what a tombstone keeps) live in `lifecycle`, which calls these
//! statements. Both backends run the same SQL text (sqlx maps `$1` placeholders on SQLite
//! too) except where a dialect differs (the claims).
//!
//! - `mod.rs`: connection, backend choice, error sorting;
//! - `limits`: fair use (slots of uploads and streams, provider calls, per-user counts);
//! - `uploads`: resumable (tus) uploads before they become jobs;
//! - `queue`: the queue's transitions; `reads`: the API's reads; `purges`: tombstones,
//!   shredding and the purge queue; `notify`: PostgreSQL's job notifications.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Runs the same statement on whichever pool backs the database.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            Db::Sqlite($pool, ..) => $body,
            Db::Postgres($pool, ..) => $body,
        }
    };
}

/// Runs one statement on a held connection of whichever engine backs the database
/// ([`held`]): `$conn` is the `&mut` connection to run it on. Not for transactions.
macro_rules! on_held {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            Db::Sqlite(p, held) => {
                let mut lent = held.get(p).await?;
                let $conn = lent.conn();
                let outcome = $body;
                lent.done(&outcome);
                outcome
            }
            Db::Postgres(p, held) => {
                let mut lent = held.get(p).await?;
                let $conn = lent.conn();
                let outcome = $body;
                lent.done(&outcome);
                outcome
            }
        }
    };
}

mod held;
mod limits;
mod notify;
mod purges;
mod queue;
mod reads;
mod rows;
mod uploads;

pub use held::Held;
pub use limits::{InsertCaps, SlotKind, Usage};
pub use notify::JobNotifications;
pub use purges::PURGE_LEASE_MS;
pub use rows::{Inserted, JobRow, NewJob, PurgeRow, Sealed};
pub use uploads::{Append, NewUpload, UploadRow};

/// The job database. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool, Held<sqlx::Sqlite>),
    Postgres(PgPool, Held<sqlx::Postgres>),
}

/// Of SQLite's 8 pooled connections, held for the hottest statements ([`held`]).
const HELD_SQLITE: usize = 4;
/// Of PostgreSQL's 16.
const HELD_POSTGRES: usize = 8;

/// A database error, sorted by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A row that had to be there is not.
    #[error("a row is missing")]
    NotFound,
    /// A constraint refused the write (a duplicate, a broken reference).
    #[error("a constraint refused the write: {0}")]
    Conflict(#[source] sqlx::Error),
    /// The database cannot serve now (down, busy, out of connections): retrying may help.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A bug: a malformed query, a type that does not decode. Retrying will not help.
    #[error("a database statement failed: {0}")]
    Internal(#[source] sqlx::Error),
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

impl DbError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Unavailable(_))
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::RowNotFound => DbError::NotFound,
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                DbError::Unavailable(e)
            }
            E::Database(db) if db.is_unique_violation() || db.is_foreign_key_violation() => {
                DbError::Conflict(e)
            }
            E::Database(db) if transient(db.as_ref()) => DbError::Unavailable(e),
            _ => DbError::Internal(e),
        }
    }
}

/// Whether a database's own error means "try again later" rather than a bug.
fn transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    let code = error.code().unwrap_or_default();
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        code.parse().is_ok_and(sqlite_transient)
    } else {
        postgres_transient(&code)
    }
}

/// SQLite's (extended) result code: BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL.
fn sqlite_transient(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6 | 7 | 10 | 13 | 14 | 15)
}

/// PostgreSQL's SQLSTATE: connection exceptions, insufficient resources, operator
/// intervention (shutdown, statement timeout), system errors, serialization failures and
/// deadlocks, lock timeouts.
fn postgres_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code.starts_with("58")
        || matches!(code, "40001" | "40P01" | "55P03")
}

/// A connection idle for this long is pinged before it is used again.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// sqlx pings every connection when it leaves the pool (`test_before_acquire`) and again when it
/// comes back: two extra round trips for every statement, to SQLite's connection thread or to
/// PostgreSQL, which made up a third of a poll (issue #14). The ping on the way back stays (it
/// catches a connection broken while in use); the one on the way out runs only for a connection
/// that sat idle long enough to have been cut (a database restart, a terminated backend).
fn ping_only_if_idle<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
) -> sqlx::pool::PoolOptions<DB> {
    options
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_IF_IDLE_FOR {
                    return Ok(true);
                }
                // A failed ping closes the connection; the pool then takes or opens another.
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

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
                .foreign_keys(true)
                // Deleted and overwritten content (cleared keys, results) is zeroed in the
                // page, not left in free space.
                .pragma("secure_delete", "ON")
                // 16 MiB of page cache per connection (SQLite's default is 2 MiB): an hour of
                // jobs at full load outgrows 2 MiB, and throughput then falls as they pile up
                // (issue #14; docs/benchmarks.md). The pages hold ciphertext and ids only.
                .pragma("cache_size", "-16384");
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).with_context(|| {
                    format!("creating the database folder {}", parent.display())
                })?;
            }
            let pool = ping_only_if_idle(SqlitePoolOptions::new().max_connections(8))
                .connect_with(options)
                .await
                .context("opening the SQLite database")?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&pool)
                .await
                .context("migrating the SQLite database")?;
            Db::Sqlite(pool, Held::new(HELD_SQLITE))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options =
                PgConnectOptions::from_str(url).context("invalid PostgreSQL database URL")?;
            let pool = ping_only_if_idle(PgPoolOptions::new().max_connections(16))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .context("connecting to PostgreSQL")?;
            sqlx::migrate!("./migrations/postgres")
                .run(&pool)
                .await
                .context("migrating the PostgreSQL database")?;
            Db::Postgres(pool, Held::new(HELD_POSTGRES))
        } else {
            anyhow::bail!("MEDRELAY_DATABASE_URL must start with sqlite: or postgres:");
        };
        Ok(db)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(..) => "sqlite",
            Db::Postgres(..) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// On PostgreSQL, aligns this process's clock with the database's (see `clock`); SQLite
    /// serves one instance, whose own clock is the reference. Returns the correction (ms).
    pub async fn align_clock(&self) -> Result<i64> {
        let Db::Postgres(p, ..) = self else {
            return Ok(0);
        };
        // Only the query is timed, not the wait for a connection.
        let mut conn = p.acquire().await?;
        let before = crate::clock::own_millis();
        let (reference,): (i64,) =
            sqlx::query_as("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                .fetch_one(&mut *conn)
                .await?;
        let after = crate::clock::own_millis();
        Ok(crate::clock::align_to(reference, before, after))
    }

    /// On SQLite, copies the WAL into the database and empties it, so that the old page
    /// images it holds (keys and results before they were cleared) are gone; PostgreSQL's WAL
    /// is the operator's to manage (docs/operations.md).
    pub async fn forget_history(&self) -> Result<()> {
        if let Db::Sqlite(p, ..) = self {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(p)
                .await?;
        }
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            // Closed first (no slot takes a connection from a closed pool), then the held
            // connections go back, which the close waits for.
            Db::Sqlite(p, held) => {
                let closing = p.close();
                held.release_all().await;
                closing.await
            }
            Db::Postgres(p, held) => {
                let closing = p.close();
                held.release_all().await;
                closing.await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_are_sorted_by_what_retrying_can_do() {
        assert!(matches!(
            DbError::from(sqlx::Error::PoolTimedOut),
            DbError::Unavailable(_)
        ));
        assert!(matches!(
            DbError::from(sqlx::Error::RowNotFound),
            DbError::NotFound
        ));
        assert!(matches!(
            DbError::from(sqlx::Error::ColumnNotFound("x".into())),
            DbError::Internal(_)
        ));
        // SQLite: BUSY, LOCKED and an I/O error's extended code are transient; a syntax error
        // (SQLITE_ERROR) is a bug.
        for code in [5, 6, 517, 266, 13] {
            assert!(sqlite_transient(code), "{code}");
        }
        for code in [1, 11, 20, 21] {
            assert!(!sqlite_transient(code), "{code}");
        }
        // PostgreSQL: connection failures, shutdown, deadlocks are transient; a syntax error
        // or an undefined table is a bug.
        for code in ["08006", "57P01", "53300", "40001", "40P01"] {
            assert!(postgres_transient(code), "{code}");
        }
        for code in ["42601", "42P01", "22P02"] {
            assert!(!postgres_transient(code), "{code}");
        }
    }

    #[tokio::test]
    async fn a_malformed_query_is_internal_and_a_closed_pool_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        let Db::Sqlite(pool, ..) = &db else {
            unreachable!()
        };
        let malformed = sqlx::query("SELEKT 1").execute(pool).await.unwrap_err();
        assert!(matches!(DbError::from(malformed), DbError::Internal(_)));
        let missing = sqlx::query("SELECT * FROM no_such_table")
            .execute(pool)
            .await
            .unwrap_err();
        assert!(matches!(DbError::from(missing), DbError::Internal(_)));
        db.close().await;
        assert!(db.ping().await.unwrap_err().is_unavailable());
    }
}
