//! The lifecycle of a job, and every rule about patient data in one place: each state change
//! together with its side effects.
//!
//! - [`accept`]: a document is sealed as it streams into the store, and the job is committed
//!   only after its object (no 202 without both, no object without a row);
//! - [`upload`]: resumable (tus) uploads: sealed parts, the offset in the database, the job
//!   committed by the request that brings the last byte;
//! - [`attempt`]: claim, heartbeat, open the document, finish (succeed, retry, fail),
//!   hand back; the rescue of attempts that lost their lease;
//! - [`end`]: the one sequence that ends a job or all jobs of a user (delete by the user,
//!   expiry, purge after an unmanaged failure): destroy the keys in one commit, stop the
//!   running attempt, delete the objects, publish the change, count it;
//! - [`expiry`]: the one-hour limit on jobs and objects;
//! - [`view`]: what the app may see of a job (another user's job does not exist), with its
//!   result opened for its owner only;
//! - [`vault`]: sealing and opening documents, results and push tokens;
//! - [`device`]: the push to the device of an upload when its job ends, sent at most once;
//! - [`events`]: job changes to event streams, across instances on PostgreSQL;
//! - [`running`]: the attempts running in this process, so an end can stop them.
//!
//! `http`, `worker`, `sweeper` and `purge` are thin callers of this module; none of them
//! deletes an object or destroys a key itself. This module never logs document bytes,
//! results or user ids.

mod accept;
mod attempt;
mod device;
mod end;
mod events;
mod expiry;
mod running;
mod upload;
mod vault;
mod view;

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use tokio::sync::{Notify, broadcast};

pub use accept::Incoming;
pub use attempt::{Claimed, retry_delay};
pub use end::DeleteOutcome;
pub use events::{ANNOUNCE_GAP, announce_changes, relay_notifications};
pub use running::RunningJobs;
pub use upload::{Appending, Checksum, MAX_PARTS, PART_MAX, UploadError, UploadState};
pub use view::Lookup;

use crate::config::Settings;
use crate::crypto::Keyring;
use crate::db::{Db, DbError};
use crate::ids::{JobId, UserId, UserPrefix};
use crate::push::Fcm;
use crate::store::Store;

/// How long a PHI-free tombstone (ids, times, reason) is kept, so that a late poll learns
/// that its job expired instead of getting a bare 404.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The settings the lifecycle enforces.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The hard lifetime of every temporary byte.
    pub temp_ttl: Duration,
    /// The configured retry delays; attempts = 1 + their number.
    pub retry_delays: Vec<Duration>,
    /// How long a claim holds without a heartbeat.
    pub lease: Duration,
    /// How often the sweeper runs (objects past the TTL by more than this are an alarm).
    pub sweep_interval: Duration,
    /// Whether HEIC photos are accepted (else refused with advice to send JPEG).
    pub heic: bool,
}

impl Rules {
    pub fn from_settings(settings: &Settings) -> Rules {
        Rules {
            temp_ttl: settings.temp_ttl,
            retry_delays: settings.retry_delays.0.clone(),
            lease: settings.lease,
            sweep_interval: settings.sweep_interval,
            heic: settings.heic,
        }
    }

    pub fn max_attempts(&self) -> i64 {
        1 + self.retry_delays.len() as i64
    }
}

/// A lifecycle failure, sorted by what the caller can tell the app.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database or the store cannot serve now: retrying may help.
    #[error("unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// A bug or a broken invariant.
    #[error("internal: {0:#}")]
    Internal(anyhow::Error),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            Error::Unavailable(e.into())
        } else {
            Error::Internal(e.into())
        }
    }
}

/// The lifecycle: owns the database, the store, the keys and the running attempts of this
/// process. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    store: Store,
    keyring: Keyring,
    prefix_key: hmac::Key,
    rules: Rules,
    /// Ids of jobs that changed, for event streams.
    events: broadcast::Sender<JobId>,
    /// Changes this instance announces to the others (PostgreSQL).
    announcements: events::Announcements,
    /// Wakes the worker: a job was queued, or a worker slot came free.
    wake: Notify,
    /// Wakes the worker's periodic work before its timer: a purge is due.
    maintain: Notify,
    running: RunningJobs,
    /// FCM, where push notifications are configured.
    push: Option<Arc<Fcm>>,
}

impl Lifecycle {
    pub fn new(
        db: Db,
        store: Store,
        keyring: Keyring,
        rules: Rules,
        push: Option<Fcm>,
    ) -> anyhow::Result<Self> {
        let prefix_key = crate::keys::derive_prefix_key(keyring.prefix_source())?;
        let (events, _) = broadcast::channel(1024);
        Ok(Lifecycle {
            inner: Arc::new(Inner {
                db,
                store,
                keyring,
                prefix_key,
                rules,
                events,
                announcements: events::Announcements::default(),
                wake: Notify::new(),
                maintain: Notify::new(),
                running: RunningJobs::default(),
                push: push.map(Arc::new),
            }),
        })
    }

    /// The database (reads for operations and tests; writes go through this module).
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The object store (readiness and tests; deletes go through this module).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    /// The attempts running in this process.
    pub fn running(&self) -> &RunningJobs {
        &self.inner.running
    }

    /// The opaque prefix of a user's objects, tombstones and purges.
    pub fn user_prefix(&self, user: &UserId) -> UserPrefix {
        crate::keys::user_prefix(&self.inner.prefix_key, user)
    }

    /// Tells event streams in this process that a job changed.
    pub fn publish(&self, id: &JobId) {
        // No subscriber is fine: nobody is watching.
        let _ = self.inner.events.send(id.clone());
    }

    /// The ids of jobs that change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobId> {
        self.inner.events.subscribe()
    }

    /// Wakes the worker of this process (a job was queued, a purge is due).
    pub fn wake_worker(&self) {
        self.inner.wake.notify_one();
    }

    /// Resolves when [`Lifecycle::wake_worker`] is called.
    pub async fn worker_woken(&self) {
        self.inner.wake.notified().await
    }

    /// Asks for the worker's periodic work (purges, lease rescue) now: a purge is due.
    pub fn wake_maintenance(&self) {
        self.inner.maintain.notify_one();
    }

    /// Resolves when [`Lifecycle::wake_maintenance`] is called.
    pub async fn maintenance_woken(&self) {
        self.inner.maintain.notified().await
    }
}

/// Says, at `error` and in a metric, which master key id an instance lacks.
fn key_missing(kid: &str, what: &str) {
    metrics::counter!("medrelay_master_key_missing_total", "kid" => kid.to_owned()).increment(1);
    tracing::error!(
        kid,
        "{what}: its master key is not configured on this instance; configure the same \
         MEDRELAY_MASTER_KEY on every instance"
    );
}

/// Logs a failed side effect that a later sweep repairs.
fn log_repairable(what: &str, e: &anyhow::Error) {
    tracing::warn!(error = %format!("{e:#}"), "{what} failed; the sweeper will retry");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_may_start_the_first_try_and_one_attempt_per_retry_delay() {
        let rules = Rules::from_settings(&Settings::defaults());
        assert_eq!(rules.retry_delays.len(), 3);
        assert_eq!(rules.max_attempts(), 4);
    }
}
