//! The device of an upload learns that its job ended: a data-only push (job id and status,
//! nothing else) to the FCM token the upload carried. The token is sealed with the job from
//! its upload on (only where push is configured) and erased with the job's other keys by every
//! delete, expiry and purge, so a job deleted or purged before its end sends nothing.
//!
//! At most once per job, across instances and crashes: after the commit that ended the job,
//! the instance that ended it takes the token out of the row (one conditional `UPDATE`) and
//! only a successful take sends. A crash between the two loses the push; the app's poll on
//! resume is the fallback. An unmanaged failure sends nothing: everything of its user is
//! purged at once, and a push would announce a job the app can no longer read. Every end
//! clears the token, pushed or not (also on an instance without FCM credentials).

use super::Lifecycle;
use super::end::{End, Failure};
use crate::db::JobRow;
use crate::model::JobStatus;
use crate::push::PushToken;

impl Lifecycle {
    /// Whether an upload's push token is kept here (push notifications are configured).
    pub fn pushes(&self) -> bool {
        self.inner.push.is_some()
    }

    /// After the commit that ended `row` as `end`: the token leaves the row, and where the end
    /// is one the device hears of, its push goes, in the background (a push never delays or
    /// fails a job). An instance without FCM credentials clears the token all the same.
    pub(super) fn push_end(&self, row: &JobRow, end: &End) {
        let Some(sealed) = row.push_token() else {
            return;
        };
        let status = match end {
            End::Succeeded => Some(JobStatus::Succeeded),
            End::Failed(Failure::Refused(_) | Failure::RetriesExhausted | Failure::LeaseLost) => {
                Some(JobStatus::Failed)
            }
            End::Failed(Failure::Unmanaged | Failure::Poisoned) | End::Deleted(_) => None,
        };
        let fcm = self.inner.push.clone();
        let lifecycle = self.clone();
        let row = row.clone();
        tokio::spawn(async move {
            match lifecycle.db().take_push_token(&row.id).await {
                Ok(true) => {}
                // Deleted meanwhile (which cleared it), or taken by another instance.
                Ok(false) => {
                    metrics::counter!("medrelay_push_total", "outcome" => "taken_elsewhere")
                        .increment(1);
                    return;
                }
                Err(e) => {
                    // Left in the row, it goes with the job; nothing is sent twice.
                    tracing::warn!(job_id = %row.id, error = %e, "taking a push token failed");
                    metrics::counter!("medrelay_push_total", "outcome" => "not_taken").increment(1);
                    return;
                }
            }
            let (Some(fcm), Some(status)) = (fcm, status) else {
                // Cleared, not sent: push is off here, or the end is not one to announce.
                return;
            };
            let opened = lifecycle.open_push_token(&row, &sealed);
            let token = match opened.as_ref().map(|plain| PushToken::parse(plain)) {
                Ok(Ok(token)) => token,
                Ok(Err(_)) | Err(Ok(_)) => {
                    // Not tampering: a master key this instance lacks (its own metric and
                    // error line), or a token this version would not accept.
                    if let Err(Ok(kid)) = &opened {
                        super::key_missing(kid, "opening a push token");
                    }
                    metrics::counter!("medrelay_push_total", "outcome" => "unreadable")
                        .increment(1);
                    return;
                }
                Err(Err(_)) => {
                    // Tampering is an unmanaged failure: the database queues a purge of the
                    // user once the mark commits.
                    tracing::error!(job_id = %row.id, "a push token failed its integrity check: purging the user");
                    metrics::counter!("medrelay_push_total", "outcome" => "unreadable")
                        .increment(1);
                    if let Err(e) = lifecycle.db().mark_unmanaged(&row.id).await {
                        tracing::error!(error = %e, "marking an unmanaged failure failed");
                    }
                    lifecycle.wake_maintenance();
                    return;
                }
            };
            drop(opened);
            fcm.send(&token, &row.id, status, row.expires_at).await;
        });
    }
}
