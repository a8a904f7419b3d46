//! Fair use: what one user and one instance may do at once, and the spend guard.
//!
//! - Per instance (semaphores of this process): uploads in flight, open event streams. Claude
//!   calls in flight are the anthropic processor's own semaphore (jobs wait for a slot).
//! - Per user (rows of the database, so on PostgreSQL they hold across every instance sharing
//!   it; on SQLite, per instance): uploads in flight, jobs active, uploads accepted per rolling
//!   hour, open event streams, provider calls per rolling day.
//!
//! A refusal is a [`Refused`]: which limit, and when trying again is useful. It becomes a 429
//! `too-many-requests` (or, for the spend guard, a job failed with `daily-limit-reached`), and
//! is counted in `medrelay_limit_refusals_total{limit}` (never a user id in a label).

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::{millis, now_millis};
use crate::config::Settings;
use crate::db::{Db, InsertCaps, SlotKind, Usage};
use crate::ids::UserPrefix;
use crate::processor::{CallBudget, ProcessError, Refusal};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A stream's slot lapses this long after its last renewal (a crashed instance leaks nothing).
const STREAM_SLOT_LEASE: Duration = Duration::from_secs(60);
/// How often an open stream renews its slot.
pub const STREAM_SLOT_RENEW: Duration = Duration::from_secs(20);
/// An upload's slot lapses this long after the upload's deadline, should its release be lost.
const UPLOAD_SLOT_GRACE: Duration = Duration::from_secs(30);

/// When a slot held by a running upload, stream or job is likely free again: nobody can know
/// when one ends, so these are estimates of a typical upload and a typical job. Limits over a
/// rolling window answer exactly (when the oldest entry leaves the window).
const UPLOAD_SLOT_RETRY: Duration = Duration::from_secs(5);
const ACTIVE_JOB_RETRY: Duration = Duration::from_secs(15);
const STREAM_SLOT_RETRY: Duration = Duration::from_secs(10);

/// One limit, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    UserConcurrentUploads,
    UserActiveJobs,
    UserUploadsPerHour,
    UserEventStreams,
    UserProviderCallsPerDay,
    InstanceUploads,
    InstanceEventStreams,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::UserConcurrentUploads => "user_concurrent_uploads",
            Limit::UserActiveJobs => "user_active_jobs",
            Limit::UserUploadsPerHour => "user_uploads_per_hour",
            Limit::UserEventStreams => "user_event_streams",
            Limit::UserProviderCallsPerDay => "user_provider_calls_per_day",
            Limit::InstanceUploads => "max_concurrent_uploads",
            Limit::InstanceEventStreams => "max_event_streams",
        }
    }

    /// What the patient reads.
    pub fn detail(self) -> &'static str {
        match self {
            Limit::UserConcurrentUploads | Limit::InstanceUploads => {
                "You are sending many documents at once. Please wait a minute and try again."
            }
            Limit::UserActiveJobs => {
                "Many of your documents are still being read. Please wait until some are done and try again."
            }
            Limit::UserUploadsPerHour => {
                "You have sent many documents in the last hour. Please try again later."
            }
            Limit::UserEventStreams | Limit::InstanceEventStreams => {
                "Too many screens are following documents at once. Please close some and try again."
            }
            Limit::UserProviderCallsPerDay => {
                "You have sent many documents today. Please try again tomorrow."
            }
        }
    }
}

/// A limit said no: which, and after how long trying again is useful.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl Limit {
    /// Counts one refusal by this limit.
    fn count_refusal(self) {
        metrics::counter!("medrelay_limit_refusals_total", "limit" => self.label()).increment(1);
    }
}

impl Refused {
    fn new(limit: Limit, retry_after: Duration) -> Refused {
        limit.count_refusal();
        Refused { limit, retry_after }
    }

    /// Whole seconds for `Retry-After`, at least one.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Why a limit could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("refused by {}", .0.limit.label())]
    Refused(Refused),
    #[error("the limits could not be checked: {0}")]
    Db(#[from] crate::db::DbError),
}

/// The configured limits.
#[derive(Clone, Copy, Debug)]
struct Rules {
    user_concurrent_uploads: i64,
    user_active_jobs: i64,
    user_uploads_per_hour: i64,
    user_event_streams: i64,
    user_provider_calls_per_day: i64,
    upload_deadline: Duration,
}

/// The limits of this instance and its users. Cheap to clone.
#[derive(Clone)]
pub struct Limits {
    db: Db,
    rules: Rules,
    uploads: Arc<Semaphore>,
    uploads_cap: usize,
    streams: Arc<Semaphore>,
    streams_cap: usize,
}

impl Limits {
    pub fn new(db: Db, settings: &Settings) -> Limits {
        Limits {
            db,
            rules: Rules {
                user_concurrent_uploads: settings.user_concurrent_uploads.into(),
                user_active_jobs: settings.user_active_jobs.into(),
                user_uploads_per_hour: settings.user_uploads_per_hour.into(),
                user_event_streams: settings.user_event_streams.into(),
                user_provider_calls_per_day: settings.user_provider_calls_per_day.into(),
                upload_deadline: settings.upload_deadline_within_ttl(),
            },
            uploads: Arc::new(Semaphore::new(settings.max_concurrent_uploads as usize)),
            uploads_cap: settings.max_concurrent_uploads as usize,
            streams: Arc::new(Semaphore::new(settings.max_event_streams as usize)),
            streams_cap: settings.max_event_streams as usize,
        }
    }

    /// Admits one upload of the user: a slot of this instance, if the user's uploads in
    /// flight, active jobs and uploads of the last hour (uploads in flight counted as the jobs
    /// they will become) leave room. This check reads and writes nothing; an upload that
    /// lasts takes a slot of the user's with [`Admission::hold_slot`], and the job's insert
    /// checks again with the user locked ([`Admission::at_insert`]).
    pub async fn admit_upload(&self, prefix: &UserPrefix) -> Result<Admission, Error> {
        self.admit_upload_with(prefix, 0).await
    }

    /// [`Limits::admit_upload`], with `jobs_to_be` more active jobs than the database counts.
    async fn admit_upload_with(
        &self,
        prefix: &UserPrefix,
        jobs_to_be: i64,
    ) -> Result<Admission, Error> {
        let instance = self
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused(Limit::InstanceUploads, UPLOAD_SLOT_RETRY))?;
        let now = now_millis();
        let mut usage = self
            .db
            .usage(prefix, SlotKind::Upload, now, now - HOUR_MS)
            .await?;
        usage.active_jobs += jobs_to_be;
        upload_decision(&self.rules, &usage, now, Uploading::Starts).map_err(Error::Refused)?;
        Ok(Admission {
            limits: self.clone(),
            prefix: prefix.clone(),
            slot: parking_lot::Mutex::new(None),
            _instance: instance,
        })
    }

    /// Admits the creation of a resumable upload: the checks of an upload's start, and the
    /// user's unfinished resumable uploads, each a job to be, count against their active jobs
    /// (so that a client cannot open uploads without bound). Holds nothing afterwards: each
    /// request of the upload is admitted as an upload of its own.
    pub async fn admit_resumable_upload(&self, prefix: &UserPrefix) -> Result<(), Error> {
        let open = self.db.count_open_uploads(prefix, now_millis()).await?;
        self.admit_upload_with(prefix, open).await?.release().await;
        Ok(())
    }

    /// Admits one event stream of the user. The caller renews it with [`Permit::renew`].
    pub async fn admit_stream(&self, prefix: &UserPrefix) -> Result<Permit, Error> {
        let instance = self
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused(Limit::InstanceEventStreams, STREAM_SLOT_RETRY))?;
        let cap = self.rules.user_event_streams;
        let now = now_millis();
        let slot = self
            .take(
                prefix,
                SlotKind::Stream,
                now,
                now + millis(STREAM_SLOT_LEASE),
                |usage| {
                    if usage.slots >= cap {
                        Err(Refused::new(Limit::UserEventStreams, STREAM_SLOT_RETRY))
                    } else {
                        Ok(())
                    }
                },
            )
            .await?;
        Ok(Permit {
            slot,
            _instance: instance,
        })
    }

    async fn take(
        &self,
        prefix: &UserPrefix,
        kind: SlotKind,
        now: i64,
        expires_at: i64,
        decide: impl FnOnce(&Usage) -> Result<(), Refused>,
    ) -> Result<Slot, Error> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.db
            .take_slot(prefix, &id, kind, now, expires_at, now - HOUR_MS, decide)
            .await?
            .map_err(Error::Refused)?;
        Ok(Slot {
            db: self.db.clone(),
            id,
        })
    }

    /// The spend guard of one user's job: every provider call is charged first.
    pub fn provider_budget(&self, prefix: &UserPrefix) -> ProviderBudget {
        ProviderBudget {
            db: self.db.clone(),
            prefix: prefix.clone(),
            per_day: self.rules.user_provider_calls_per_day,
        }
    }

    /// Uploads in flight and event streams open in this instance.
    pub fn in_flight(&self) -> (usize, usize) {
        let used = |s: &Semaphore, cap: usize| cap - s.available_permits();
        (
            used(&self.uploads, self.uploads_cap),
            used(&self.streams, self.streams_cap),
        )
    }

    /// Drops lapsed slots and provider calls older than a day (the sweeper calls this).
    pub async fn drop_lapsed(&self, now: i64) -> Result<u64, crate::db::DbError> {
        self.db.drop_lapsed_limits(now, now - DAY_MS).await
    }
}

fn refused(limit: Limit, retry_after: Duration) -> Error {
    Error::Refused(Refused::new(limit, retry_after))
}

/// Where an upload is when its user's limits are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Uploading {
    /// Before its first byte, or when it takes a slot because it lasts: the slots counted
    /// are the others'.
    Starts,
    /// At its job's insert: no slot is taken any more, and its own (if it held one) is not
    /// counted.
    Ends,
}

/// Whether one more upload fits the user's limits; the others' uploads in flight count as the
/// jobs they are about to become.
fn upload_decision(
    rules: &Rules,
    usage: &Usage,
    now: i64,
    uploading: Uploading,
) -> Result<(), Refused> {
    if uploading == Uploading::Starts && usage.slots >= rules.user_concurrent_uploads {
        return Err(Refused::new(
            Limit::UserConcurrentUploads,
            UPLOAD_SLOT_RETRY,
        ));
    }
    if usage.recent_uploads >= rules.user_uploads_per_hour {
        // Exact: when the oldest upload of the hour leaves the window.
        let oldest = usage.oldest_recent_upload.unwrap_or(now);
        let wait = (oldest + HOUR_MS - now).max(1000);
        return Err(Refused::new(
            Limit::UserUploadsPerHour,
            Duration::from_millis(wait as u64),
        ));
    }
    if usage.recent_uploads + usage.slots >= rules.user_uploads_per_hour {
        // The hour's last uploads are in flight: whether they end as jobs decides.
        return Err(Refused::new(Limit::UserUploadsPerHour, UPLOAD_SLOT_RETRY));
    }
    if usage.active_jobs + usage.slots >= rules.user_active_jobs {
        return Err(Refused::new(Limit::UserActiveJobs, ACTIVE_JOB_RETRY));
    }
    Ok(())
}

/// How long an upload runs before it takes a slot of its user's: most uploads end sooner
/// and cost no write for the slot (the job's insert is their one commit); one that lasts
/// counts against the user's uploads in flight from then on.
pub const UPLOAD_SLOT_AFTER: Duration = Duration::from_secs(1);

/// An admitted upload: this instance's slot, and the user's once the upload lasts. Released
/// when dropped.
pub struct Admission {
    limits: Limits,
    prefix: UserPrefix,
    slot: parking_lot::Mutex<Option<Slot>>,
    _instance: OwnedSemaphorePermit,
}

impl Admission {
    /// Takes a slot of the user's for the rest of this upload, if the user's limits (read
    /// with the user locked) leave room.
    pub async fn hold_slot(&self) -> Result<(), Error> {
        let rules = self.limits.rules;
        let now = now_millis();
        let expires_at = now + millis(rules.upload_deadline + UPLOAD_SLOT_GRACE);
        let slot = self
            .limits
            .take(&self.prefix, SlotKind::Upload, now, expires_at, |usage| {
                upload_decision(&rules, usage, now, Uploading::Starts)
            })
            .await?;
        *self.slot.lock() = Some(slot);
        Ok(())
    }

    /// What the job's insert needs to check this upload again, with the user locked: the
    /// slot it holds (deleted in the same commit, so that the user never counts both), the
    /// caps, and what a refusal says, from the usage the insert saw.
    pub fn at_insert(
        &self,
    ) -> (
        Option<String>,
        InsertCaps,
        impl FnOnce(&Usage) -> Refused + use<>,
    ) {
        let rules = self.limits.rules;
        let own = self.slot.lock().as_ref().map(|slot| slot.id.clone());
        let now = now_millis();
        let caps = InsertCaps {
            since: now - HOUR_MS,
            active_jobs: rules.user_active_jobs,
            uploads_per_window: rules.user_uploads_per_hour,
        };
        // The usage of a refused insert says which cap; should it show room again (a job
        // ended meanwhile), the active jobs were the reason.
        let refused = move |usage: &Usage| {
            upload_decision(&rules, usage, now, Uploading::Ends)
                .err()
                .unwrap_or_else(|| Refused::new(Limit::UserActiveJobs, ACTIVE_JOB_RETRY))
        };
        (own, caps, refused)
    }

    /// Releases the user's slot now, if one was taken and is still there (dropping the
    /// admission releases it too, a moment later).
    pub async fn release(self) {
        let slot = self.slot.lock().take();
        if let Some(mut slot) = slot
            && slot.db.release_slot(&slot.id).await.is_ok()
        {
            slot.id.clear();
        }
    }
}

/// An admitted stream: released when dropped.
pub struct Permit {
    slot: Slot,
    _instance: OwnedSemaphorePermit,
}

impl Permit {
    /// Releases the slot now (dropping the permit releases it too, a moment later).
    pub async fn release(mut self) {
        // The id stays until the row is gone: if this future is dropped mid-way (the client
        // left), or the delete fails, the drop releases it again.
        if self.slot.db.release_slot(&self.slot.id).await.is_ok() {
            self.slot.id.clear();
        }
    }

    /// Keeps a stream's slot alive for another lease.
    pub async fn renew(&self) {
        let until = now_millis() + millis(STREAM_SLOT_LEASE);
        if let Err(e) = self.slot.db.renew_slot(&self.slot.id, until).await {
            tracing::warn!(error = %e, "renewing a stream's slot failed");
        }
    }
}

/// A user's slot row, deleted when dropped (it lapses by itself should that fail).
struct Slot {
    db: Db,
    id: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let db = self.db.clone();
        let id = std::mem::take(&mut self.id);
        if id.is_empty() {
            // Released already.
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = db.release_slot(&id).await {
                    tracing::warn!(error = %e, "releasing a slot failed; it lapses by itself");
                }
            });
        }
    }
}

/// Charges the provider calls of one job's attempt to its user's rolling day, all at once
/// before the first: a document in three parts with two calls left makes none.
pub struct ProviderBudget {
    db: Db,
    prefix: UserPrefix,
    per_day: i64,
}

impl CallBudget for ProviderBudget {
    fn charge(&self, calls: u32) -> BoxFuture<'_, Result<(), ProcessError>> {
        async move {
            let now = now_millis();
            match self
                .db
                .charge_provider_calls(&self.prefix, calls, now, now - DAY_MS, self.per_day)
                .await
            {
                Ok(true) => Ok(()),
                Ok(false) => {
                    Limit::UserProviderCallsPerDay.count_refusal();
                    Err(ProcessError::Abort(Refusal::DailyLimit))
                }
                Err(e) => Err(ProcessError::Retry {
                    reason: format!("the spend guard could not be checked: {e}"),
                    retry_after: None,
                }),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            user_concurrent_uploads: 4,
            user_active_jobs: 20,
            user_uploads_per_hour: 120,
            user_event_streams: 8,
            user_provider_calls_per_day: 200,
            upload_deadline: Duration::from_secs(600),
        }
    }

    fn usage(slots: i64, active_jobs: i64, recent_uploads: i64) -> Usage {
        Usage {
            slots,
            active_jobs,
            recent_uploads,
            oldest_recent_upload: None,
        }
    }

    #[test]
    fn each_user_limit_refuses_at_its_cap_and_not_before() {
        let now = 10 * HOUR_MS;
        let rules = rules();
        assert!(upload_decision(&rules, &usage(3, 16, 116), now, Uploading::Starts).is_ok());
        let limit = |u: Usage| {
            upload_decision(&rules, &u, now, Uploading::Starts)
                .unwrap_err()
                .limit
        };
        assert_eq!(limit(usage(4, 0, 0)), Limit::UserConcurrentUploads);
        assert_eq!(limit(usage(0, 20, 20)), Limit::UserActiveJobs);
        // Uploads in flight count as the jobs they are about to become.
        assert_eq!(limit(usage(2, 18, 18)), Limit::UserActiveJobs);
        assert_eq!(limit(usage(1, 0, 119)), Limit::UserUploadsPerHour);
        // At the job's insert no slot is taken: only the jobs and the others' slots count.
        let at_insert = |u: Usage| upload_decision(&rules, &u, now, Uploading::Ends);
        assert!(at_insert(usage(4, 0, 0)).is_ok());
        assert!(at_insert(usage(3, 16, 116)).is_ok());
        assert_eq!(
            at_insert(usage(2, 18, 18)).unwrap_err().limit,
            Limit::UserActiveJobs
        );
    }

    #[test]
    fn the_hourly_limit_answers_when_its_oldest_upload_leaves_the_window() {
        let now = 10 * HOUR_MS;
        let mut full = usage(0, 0, 120);
        full.oldest_recent_upload = Some(now - HOUR_MS + 90_500);
        let refused = upload_decision(&rules(), &full, now, Uploading::Starts).unwrap_err();
        assert_eq!(refused.limit, Limit::UserUploadsPerHour);
        assert_eq!(refused.retry_after_secs(), 91);
    }
}
