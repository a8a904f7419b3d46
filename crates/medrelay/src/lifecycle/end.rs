//! The one sequence that ends a job: its keys are destroyed in the commit that ends it (by
//! the database statement), then [`Lifecycle::forget_job`] stops its attempt if it runs here,
//! deletes its objects, publishes the change and counts it. The same for all jobs of a user
//! ([`Lifecycle::forget_user`]): every data key in one commit first, so everything is
//! unreadable at once; only then the objects.
//!
//! The ends: success, failure (refused, retries exhausted, lease lost on the last attempt,
//! unmanaged), deletion by the user, expiry, an operator's purge, and the purge that follows
//! an unmanaged failure, which the database itself queues (a trigger on `unmanaged_at`).

use super::attempt::retries_exhausted;
use super::{Error, Lifecycle, log_repairable};
use crate::error::Code;
use crate::ids::{JobId, UserId, UserPrefix};
use crate::model::{DeletionReason, JobError};
use crate::store::Store;

/// Why a job ended, as counted.
#[derive(Debug)]
pub(super) enum End {
    Succeeded,
    Failed(Failure),
    Deleted(DeletionReason),
}

/// Why a job failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The processor refused the document (its error says why).
    Refused(JobError),
    /// Every retry failed transiently.
    RetriesExhausted,
    /// The last allowed attempt lost its lease (a crash or a hang).
    LeaseLost,
    /// Anything unexpected: the user is purged.
    Unmanaged,
    /// Two attempts died without a word (lost leases): unmanaged, the user is purged.
    Poisoned,
}

impl Failure {
    pub(super) fn job_error(&self) -> JobError {
        match self {
            Failure::Refused(error) => error.clone(),
            Failure::RetriesExhausted | Failure::LeaseLost => retries_exhausted(),
            Failure::Unmanaged | Failure::Poisoned => unmanaged_failure(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Failure::Refused(_) => "refused",
            Failure::RetriesExhausted => "retries-exhausted",
            Failure::LeaseLost => "lease-lost",
            Failure::Unmanaged => "unmanaged",
            Failure::Poisoned => "poison-pill",
        }
    }
}

/// The error every job of a purged user ends with.
fn unmanaged_failure() -> JobError {
    Code::ProcessingFailed.job_error()
}

/// What a user's delete of one job did.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The job and its data are gone now.
    Deleted,
    /// It was already deleted or expired: gone either way.
    AlreadyGone,
    /// No such job of this user.
    NotFound,
}

impl Lifecycle {
    /// After the commit that ended a job: stop its attempt, delete its objects, publish the
    /// change, count it. The keys are already gone, so a failed delete leaves only unreadable
    /// bytes, which the sweeper removes by their age; it is returned for the caller to report.
    pub(super) async fn forget_job(
        &self,
        prefix: &UserPrefix,
        id: &JobId,
        end: End,
    ) -> Result<(), Error> {
        self.running().cancel(id);
        let deleted = self.store().delete_job_objects(prefix, id).await;
        // The database's trigger announces every other end; a success is left to the
        // instance that made it.
        if matches!(end, End::Succeeded) {
            self.announce(id);
        } else {
            self.publish(id);
        }
        match &end {
            End::Succeeded => {
                metrics::counter!("medrelay_jobs_finished_total", "outcome" => "succeeded")
                    .increment(1)
            }
            End::Failed(failure) => metrics::counter!(
                "medrelay_jobs_finished_total",
                "outcome" => "failed",
                "reason" => failure.label()
            )
            .increment(1),
            End::Deleted(reason) => {
                metrics::counter!("medrelay_deletions_total", "reason" => reason.metric_label())
                    .increment(1)
            }
        }
        deleted.map_err(Error::Unavailable)
    }

    /// [`Lifecycle::forget_job`] where nobody waits for the answer: a failed delete is logged.
    pub(super) async fn forget_job_quietly(&self, prefix: &UserPrefix, id: &JobId, end: End) {
        if let Err(e) = self.forget_job(prefix, id, end).await {
            log_repairable("deleting a job's objects", &e.into());
        }
    }

    /// After the commit that ended every job of a user: stop their attempts, delete every
    /// object under the user's prefix, publish the changes. Returns the objects deleted.
    async fn forget_user(&self, prefix: &UserPrefix, jobs: &[JobId]) -> Result<u64, Error> {
        // Jobs of this user running here stop; elsewhere their next heartbeat or write fails.
        self.running().cancel_owner(prefix);
        let deleted = self.store().delete_prefix(&Store::user_root(prefix)).await;
        for id in jobs {
            self.publish(id);
        }
        deleted.map_err(Error::Unavailable)
    }

    /// `DELETE /v1/jobs/{id}`: cancels the job if it runs and deletes its document, result and
    /// keys now.
    pub async fn delete_job(&self, user: &UserId, id: &JobId) -> Result<DeleteOutcome, Error> {
        let reason = DeletionReason::DeletedByUser;
        match self.db().tombstone_job_of(user, id, reason).await? {
            Some(row) => {
                // The keys are destroyed; a store failure is still reported (503), as the app
                // asked for the bytes to be gone now.
                self.forget_job(&row.user_prefix, &row.id, End::Deleted(reason))
                    .await?;
                Ok(DeleteOutcome::Deleted)
            }
            None => {
                // Deleting what this user already deleted (or what expired) is success.
                let row = self
                    .db()
                    .get_job_or_tombstone(user, &self.user_prefix(user), id)
                    .await?;
                Ok(match row {
                    Some(row) if row.deleted_at.is_some() => DeleteOutcome::AlreadyGone,
                    _ => DeleteOutcome::NotFound,
                })
            }
        }
    }

    /// Deletes every job and object of one user now (`DELETE /v1/me/data`, `medrelay
    /// purge-user`). Returns the jobs and objects deleted.
    pub async fn delete_user_data(
        &self,
        user: &UserId,
        reason: DeletionReason,
    ) -> Result<(u64, u64), Error> {
        let jobs = self.db().tombstone_user(user, reason).await?;
        self.forget_uploads_of(&self.user_prefix(user)).await?;
        let objects = self.forget_user(&self.user_prefix(user), &jobs).await?;
        let count = jobs.len() as u64;
        metrics::counter!("medrelay_deletions_total", "reason" => reason.metric_label())
            .increment(count);
        tracing::info!(
            jobs = count,
            objects,
            reason = reason.as_str(),
            "user data deleted"
        );
        Ok((count, objects))
    }

    /// Carries out every purge the database queued after an unmanaged failure. Returns how
    /// many it completed.
    pub async fn run_pending_purges(&self) -> Result<usize, Error> {
        let mut done = 0;
        while let Some(purge) = self.db().claim_purge().await? {
            let prefix = &purge.user_prefix;
            let jobs = self.db().shred_user(prefix, &unmanaged_failure()).await?;
            self.forget_uploads_of(prefix).await?;
            let objects = self.forget_user(prefix, &jobs).await?;
            self.db()
                .complete_purge(purge.id, jobs.len() as i64, objects as i64)
                .await?;
            metrics::counter!("medrelay_purges_total", "reason" => purge.reason.as_str())
                .increment(1);
            metrics::counter!("medrelay_deletions_total", "reason" => "purge")
                .increment(jobs.len() as u64);
            tracing::warn!(
                purge_id = purge.id,
                user_prefix = %prefix,
                reason = purge.reason.as_str(),
                jobs = jobs.len(),
                objects,
                "purged every temporary byte of a user"
            );
            done += 1;
        }
        if done > 0 {
            // Forgotten means forgotten in SQLite's WAL too.
            self.db().forget_history().await?;
        }
        Ok(done)
    }
}
