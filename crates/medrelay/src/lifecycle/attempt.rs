//! Attempts: claiming due jobs under a lease, keeping the lease, opening the document, and
//! recording the outcome with a compare-and-set on the lease token, so a worker that lost its
//! lease changes nothing. Transient failures are retried at most `retry_delays` times on a
//! persisted, jittered schedule that honours the provider's `Retry-After`.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::end::{End, Failure};
use super::{Error, Lifecycle};
use crate::clock::{millis, now_millis};
use crate::db::JobRow;
use crate::error::Code;
use crate::ids::{JobId, LeaseToken};
use crate::model::{DocumentResult, JobError};
use crate::processor::ProcessError;

/// A job this process claimed, with the token of its lease.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub(super) row: JobRow,
    lease: LeaseToken,
}

impl Claimed {
    pub fn id(&self) -> &JobId {
        &self.row.id
    }

    /// Attempts started, this one included.
    pub fn attempts(&self) -> i64 {
        self.row.attempts
    }

    /// The opaque prefix of the job's user (whose limits it counts against).
    pub fn user_prefix(&self) -> &crate::ids::UserPrefix {
        &self.row.user_prefix
    }
}

impl Lifecycle {
    /// Claims up to `limit` due jobs (queued, due for retry, or whose lease ran out).
    pub async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, Error> {
        let lease = LeaseToken::new();
        let rows = self
            .db()
            .claim(&lease, self.rules().lease, limit as i64)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Claimed {
                row,
                lease: lease.clone(),
            })
            .collect())
    }

    /// Registers a claimed job as running here (so an end can stop it) and announces it (the
    /// database's trigger leaves claims to the instance that made them).
    pub fn begin(&self, job: &Claimed, cancel: CancellationToken) {
        self.running()
            .insert(&job.row.id, &job.row.user_prefix, cancel);
        self.announce(&job.row.id);
    }

    /// The attempt stopped running here (finished, cancelled or handed back).
    pub fn stopped(&self, job: &Claimed) {
        self.running().remove(&job.row.id);
    }

    /// Extends the lease. `false` when it was lost (the job moved on without us).
    pub async fn heartbeat(&self, job: &Claimed) -> Result<bool, Error> {
        Ok(self
            .db()
            .heartbeat(&job.row.id, &job.lease, self.rules().lease)
            .await?)
    }

    /// Hands a job this process will not finish (shutdown) back to the queue. The attempt is
    /// not counted: a deploy must not exhaust a job's retries.
    pub async fn hand_back(&self, job: &Claimed) {
        if let Err(e) = self.db().release(&job.row.id, &job.lease, 0).await {
            tracing::warn!(error = %e, "releasing a lease failed");
        }
    }

    /// Records the outcome of an attempt. Every terminal outcome deletes the document.
    pub async fn finish(
        &self,
        job: &Claimed,
        outcome: Result<DocumentResult, ProcessError>,
    ) -> Result<(), Error> {
        let (row, lease) = (&job.row, &job.lease);
        let outcome = outcome.and_then(|result| {
            self.seal_result(row, &result)
                .map_err(ProcessError::Unmanaged)
        });
        let ended = match outcome {
            Ok(sealed) => {
                let won = self
                    .db()
                    .complete(&row.id, lease, &sealed.sealed, &sealed.key)
                    .await?;
                if won {
                    tracing::info!("job succeeded");
                }
                won.then_some(End::Succeeded)
            }
            Err(ProcessError::Retry {
                reason,
                retry_after,
            }) => {
                tracing::warn!(%reason, "attempt failed transiently");
                if row.attempts < row.max_attempts {
                    let delay = retry_delay(&self.rules().retry_delays, row.attempts, retry_after);
                    let run_at = now_millis() + millis(delay);
                    if self.db().schedule_retry(&row.id, lease, run_at).await? {
                        metrics::counter!("medrelay_jobs_retried_total").increment(1);
                        self.publish(&row.id);
                    }
                    return Ok(());
                }
                self.fail(job, Failure::RetriesExhausted).await?
            }
            Err(ProcessError::Abort(refusal)) => {
                self.fail(job, Failure::Refused(refusal.job_error()))
                    .await?
            }
            Err(ProcessError::KeyMissing { kid }) => {
                // Not the document's fault, not tampering: handed back, the attempt not
                // counted, and tried again after the first retry delay (another instance may
                // have the key, or this one after its configuration is fixed). The TTL ends it
                // if the key never appears.
                super::key_missing(&kid, "opening a document");
                let delay = self
                    .rules()
                    .retry_delays
                    .first()
                    .copied()
                    .unwrap_or(Duration::from_secs(15))
                    .max(KEY_MISSING_MIN_WAIT);
                if self
                    .db()
                    .release(&row.id, lease, now_millis() + millis(delay))
                    .await?
                {
                    self.publish(&row.id);
                }
                return Ok(());
            }
            Err(ProcessError::Unmanaged(cause)) => {
                tracing::error!(error = %format!("{cause:#}"), "unmanaged failure: purging the user");
                self.fail(job, Failure::Unmanaged).await?
            }
        };
        if let Some(end) = ended {
            self.push_end(row, &end);
            self.forget_job_quietly(&row.user_prefix, &row.id, end)
                .await;
        }
        Ok(())
    }

    async fn fail(&self, job: &Claimed, failure: Failure) -> Result<Option<End>, Error> {
        let error = failure.job_error();
        let unmanaged = matches!(failure, Failure::Unmanaged);
        let won = self
            .db()
            .fail(&job.row.id, &job.lease, &error, unmanaged)
            .await?;
        if !won {
            return Ok(None);
        }
        tracing::info!(code = %error.code, "job failed");
        if unmanaged {
            // The trigger queued the purge; carry it out now rather than on the next poll.
            self.wake_maintenance();
        }
        Ok(Some(End::Failed(failure)))
    }

    /// Ends jobs whose attempts keep dying: a second lost lease (a poison pill, ended as an
    /// unmanaged failure, which purges the user) or a lost lease on the last allowed attempt.
    /// Their documents are deleted.
    pub async fn end_exhausted(&self) -> Result<(), Error> {
        let poisoned = self
            .db()
            .fail_poisoned(&Failure::Poisoned.job_error())
            .await?;
        for row in &poisoned {
            tracing::error!(
                job_id = %row.id,
                user_prefix = %row.user_prefix,
                "a job lost its lease twice: not handed to a third worker; purging its user"
            );
            let end = End::Failed(Failure::Poisoned);
            self.push_end(row, &end);
            self.forget_job_quietly(&row.user_prefix, &row.id, end)
                .await;
        }
        if !poisoned.is_empty() {
            // The trigger queued the purges: carry them out now.
            self.wake_maintenance();
        }
        let rows = self.db().fail_exhausted(&retries_exhausted()).await?;
        for row in rows {
            tracing::warn!(job_id = %row.id, "last attempt lost its lease: job failed");
            let end = End::Failed(Failure::LeaseLost);
            self.push_end(&row, &end);
            self.forget_job_quietly(&row.user_prefix, &row.id, end)
                .await;
        }
        Ok(())
    }

    /// Queues again the jobs whose lease ran out with attempts left (their worker died or
    /// hung), and wakes the worker for them.
    pub async fn rescue_lost_leases(&self) -> Result<(), Error> {
        let rescued = self.db().rescue_lost_leases().await?;
        if rescued > 0 {
            tracing::warn!(jobs = rescued, "leases ran out: jobs queued again");
            self.wake_worker();
        }
        Ok(())
    }
}

/// A job handed back for a missing master key waits at least this long (no hot loop of reads
/// and error lines when the retry delays are configured tiny).
const KEY_MISSING_MIN_WAIT: Duration = Duration::from_secs(1);

/// The error of a job whose every retry failed transiently.
pub(super) fn retries_exhausted() -> JobError {
    Code::ProcessingUnavailable.job_error()
}

/// The delay before retry number `attempts` (1-based): the configured delay plus up to 20%
/// jitter, and never less than the provider's `Retry-After` (capped at five minutes).
pub fn retry_delay(delays: &[Duration], attempts: i64, retry_after: Option<Duration>) -> Duration {
    let index = (attempts.max(1) as usize - 1).min(delays.len().saturating_sub(1));
    let base = delays
        .get(index)
        .copied()
        .unwrap_or(Duration::from_secs(15));
    let jitter = base.mul_f64(rand::rng().random_range(0.0..=0.2));
    let floor = retry_after
        .unwrap_or_default()
        .min(Duration::from_secs(300));
    (base + jitter).max(floor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_with_jitter_and_honour_retry_after() {
        let delays = [
            Duration::from_secs(15),
            Duration::from_secs(60),
            Duration::from_secs(240),
        ];
        for _ in 0..100 {
            let d1 = retry_delay(&delays, 1, None);
            assert!(
                d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(18),
                "{d1:?}"
            );
            let d3 = retry_delay(&delays, 3, None);
            assert!(
                d3 >= Duration::from_secs(240) && d3 <= Duration::from_secs(288),
                "{d3:?}"
            );
        }
        let floored = retry_delay(&delays, 1, Some(Duration::from_secs(100)));
        assert!(floored >= Duration::from_secs(100));
        let capped = retry_delay(&delays, 1, Some(Duration::from_secs(3600)));
        assert!(capped <= Duration::from_secs(300));
    }
}
