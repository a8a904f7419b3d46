//! Connections held out of the pool for the hottest single statements: a poll's read, the
//! claim, the completion (issue #14).
//!
//! sqlx hands a connection back to its pool from a task of its own, and pings it first (a
//! round trip to SQLite's connection thread or to PostgreSQL) to catch one broken while in use
//! (`PoolConnection`'s drop, `Floating::return_to_pool`; no setting turns it off). For a
//! statement of a few dozen microseconds that doubles the hops. A held connection stays with
//! its slot between statements, so a statement on it costs one hop and no task.
//!
//! What the pool's checks catch is still caught:
//!
//! - a statement cut short (its future dropped: a client went away) leaves its connection in
//!   an unknown state: the guard then gives the connection back to the pool, whose release
//!   ping checks it as before;
//! - an error that is not the database's answer (I/O, protocol, a crashed worker) closes the
//!   connection;
//! - a connection idle for [`PING_IF_IDLE_FOR`] (a database restart may have cut it) is pinged
//!   before use, as the pool does.
//!
//! The held connections come from the pool and count against its size. [`Held::release_all`]
//! hands them back, which the pool's `close` waits for.

use std::sync::Arc;
use std::time::Instant;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, Database, Pool};
use tokio::sync::{Mutex, MutexGuard};

use super::PING_IF_IDLE_FOR;

/// How long the ping of a held connection that sat idle may take (the pool bounds its own
/// check by its acquire timeout); a silently dropped connection fails it.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A few slots, each holding at most one of the pool's connections.
pub struct Held<DB: Database> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Database> {
    slots: Box<[Mutex<Slot<DB>>]>,
}

pub(crate) struct Slot<DB: Database> {
    conn: Option<PoolConnection<DB>>,
    used: Instant,
}

impl<DB: Database> Clone for Held<DB> {
    fn clone(&self) -> Self {
        Held {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Database> std::fmt::Debug for Held<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("slots", &self.inner.slots.len())
            .finish()
    }
}

impl<DB: Database> Held<DB> {
    /// `slots` connections at most, taken from the pool when first needed.
    pub(crate) fn new(slots: usize) -> Held<DB> {
        let slots = (0..slots)
            .map(|_| {
                Mutex::new(Slot {
                    conn: None,
                    used: Instant::now(),
                })
            })
            .collect();
        Held {
            inner: Arc::new(Inner { slots }),
        }
    }

    /// A free held connection, or, when every slot is busy, one from the pool. The first free
    /// slot: a quiet instance keeps one connection open, not one per slot.
    pub(crate) async fn get<'h>(&'h self, pool: &Pool<DB>) -> Result<Lent<'h, DB>, sqlx::Error> {
        // A closing pool: nothing is held any more (the pool answers that it is closed).
        let slots = if pool.is_closed() {
            &[][..]
        } else {
            &self.inner.slots[..]
        };
        for slot in slots {
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            let idle = slot.used.elapsed() >= PING_IF_IDLE_FOR;
            if idle
                && let Some(conn) = slot.conn.as_mut()
                && !matches!(
                    tokio::time::timeout(PING_TIMEOUT, conn.ping()).await,
                    Ok(Ok(()))
                )
                && let Some(mut conn) = slot.conn.take()
            {
                // Broken while idle: closed, not handed back to the pool.
                conn.close_on_drop();
            }
            if slot.conn.is_none() {
                slot.conn = Some(pool.acquire().await?);
                slot.used = Instant::now();
            }
            return Ok(Lent::Held { slot, done: false });
        }
        Ok(Lent::Pooled(pool.acquire().await?))
    }

    /// Hands every held connection back to the pool (before the pool closes: its `close` waits
    /// for them). A slot in use gives its connection back when that statement ends.
    pub(crate) async fn release_all(&self) {
        for slot in self.inner.slots.iter() {
            slot.lock().await.conn.take();
        }
    }
}

/// A connection lent for one statement. Call [`Lent::done`] with the statement's outcome;
/// dropped without it (the statement was cut short), a held connection goes back to the pool,
/// which checks it.
pub(crate) enum Lent<'h, DB: Database> {
    Held {
        slot: MutexGuard<'h, Slot<DB>>,
        done: bool,
    },
    Pooled(PoolConnection<DB>),
}

impl<DB: Database> Lent<'_, DB> {
    /// The connection to run the statement on.
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        match self {
            Lent::Held { slot, .. } => slot.conn.as_mut().expect("a lent slot holds a connection"),
            Lent::Pooled(conn) => conn,
        }
    }

    /// The statement ended with `outcome`: the connection stays held unless the error says
    /// the connection itself may be at fault.
    pub(crate) fn done<T>(mut self, outcome: &Result<T, sqlx::Error>) {
        if let Lent::Held { slot, done } = &mut self {
            *done = true;
            slot.used = Instant::now();
            if let Err(e) = outcome
                && !is_an_answer(e)
                && let Some(mut conn) = slot.conn.take()
            {
                conn.close_on_drop();
            }
        }
    }
}

impl<DB: Database> Drop for Lent<'_, DB> {
    fn drop(&mut self) {
        if let Lent::Held { slot, done: false } = self {
            slot.conn.take();
        }
    }
}

/// The database answered (a constraint, a missing row, a value that does not decode): the
/// connection is fine. Not an answer: PostgreSQL's connection exceptions (class 08) and its
/// shutdowns (57P01–57P03, sent as the backend goes away, as in a failover).
fn is_an_answer(error: &sqlx::Error) -> bool {
    if let sqlx::Error::Database(e) = error {
        let code = e.code();
        let code = code.as_deref().unwrap_or_default();
        return !(code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03"));
    }
    matches!(
        error,
        sqlx::Error::RowNotFound
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. }
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::Sqlite;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

    use super::*;

    async fn pool(dir: &tempfile::TempDir) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("held.db"))
            .create_if_missing(true);
        SqlitePoolOptions::new()
            .max_connections(3)
            .connect_with(options)
            .await
            .unwrap()
    }

    /// Marks the lent connection (a TEMP table lives and dies with its connection).
    async fn mark(lent: &mut Lent<'_, Sqlite>) -> Result<(), sqlx::Error> {
        sqlx::query("CREATE TEMP TABLE IF NOT EXISTS mark (x)")
            .execute(lent.conn())
            .await
            .map(drop)
    }

    async fn marked(lent: &mut Lent<'_, Sqlite>) -> bool {
        sqlx::query("SELECT 1 FROM temp.mark")
            .execute(lent.conn())
            .await
            .is_ok()
    }

    fn is_held(lent: &Lent<'_, Sqlite>) -> bool {
        matches!(lent, Lent::Held { .. })
    }

    #[tokio::test]
    async fn a_held_connection_serves_statement_after_statement() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let held = Held::<Sqlite>::new(1);
        let mut lent = held.get(&pool).await.unwrap();
        let outcome = mark(&mut lent).await;
        lent.done(&outcome);
        // The same connection again, and a database's answer (an error) keeps it.
        let mut lent = held.get(&pool).await.unwrap();
        assert!(is_held(&lent) && marked(&mut lent).await);
        let answer = sqlx::query("SELECT * FROM no_such_table")
            .execute(lent.conn())
            .await
            .map(drop);
        assert!(matches!(answer, Err(sqlx::Error::Database(_))));
        lent.done(&answer);
        let mut lent = held.get(&pool).await.unwrap();
        assert!(marked(&mut lent).await);
        // While the one slot is lent, the next statement gets a pooled connection.
        let mut other = held.get(&pool).await.unwrap();
        assert!(!is_held(&other) && !marked(&mut other).await);
        drop(other);
        lent.done(&Ok(()));
    }

    #[tokio::test]
    async fn a_statement_cut_short_or_failing_gives_its_connection_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let held = Held::<Sqlite>::new(1);
        let holds = |held: &Held<Sqlite>| held.inner.slots[0].try_lock().unwrap().conn.is_some();
        // Dropped without `done`: as when a client goes away mid-statement.
        let mut lent = held.get(&pool).await.unwrap();
        mark(&mut lent).await.unwrap();
        drop(lent);
        assert!(!holds(&held), "a cut statement's connection was kept");
        let lent = held.get(&pool).await.unwrap();
        lent.done(&Ok(()));
        assert!(holds(&held), "a connection that answered was not kept");
        // An error that is not the database's answer.
        let lent = held.get(&pool).await.unwrap();
        lent.done::<()>(&Err(sqlx::Error::WorkerCrashed));
        assert!(!holds(&held), "a failed connection was kept");
    }

    /// Statements one after another keep one connection open, however many slots there are.
    #[tokio::test]
    async fn a_quiet_database_keeps_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let held = Held::<Sqlite>::new(3);
        for _ in 0..10 {
            let mut lent = held.get(&pool).await.unwrap();
            let outcome = sqlx::query("SELECT 1").execute(lent.conn()).await.map(drop);
            lent.done(&outcome);
        }
        assert_eq!(pool.size(), 1);
    }

    #[tokio::test]
    async fn the_pool_closes_once_the_held_connections_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let held = Held::<Sqlite>::new(2);
        let lent = held.get(&pool).await.unwrap();
        lent.done(&Ok(()));
        held.release_all().await;
        tokio::time::timeout(Duration::from_secs(10), pool.close())
            .await
            .expect("the pool closed");
    }
}
