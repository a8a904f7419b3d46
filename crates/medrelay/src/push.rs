//! Push notifications without patient data (issue #15): one Firebase Cloud Messaging HTTP v1
//! data-only message per finished job, to the token its upload carried, saying which job ended
//! and whether it succeeded, nothing else. The app then fetches the job over HTTPS.
//!
//! Owns the FCM request, the service account's OAuth2 access token (the JWT grant, by
//! `gcp_auth`, cached until shortly before it expires), the retries and the outcome metric.
//! Best effort: a push never blocks or fails a job. Sealing the token and sending at most once
//! per job belong to `lifecycle`.

use std::fmt;
use std::time::{Duration, Instant};

use gcp_auth::{CustomServiceAccount, TokenProvider};
use rand::Rng;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::Settings;
use crate::ids::JobId;
use crate::model::JobStatus;

/// The OAuth2 scope of FCM's send API.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Retries of one push end this long after its first try.
const BUDGET: Duration = Duration::from_secs(60);
/// The wait before the first retry; doubled for each next one, plus up to 20 % jitter.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// One request to FCM, from connect to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest token the `Push-Token` header may carry (FCM's are about 160 characters).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Pushes in flight at once per instance; the others wait (a slow FCM must not gather
/// unbounded tasks).
const MAX_IN_FLIGHT: usize = 64;

/// An FCM registration token. It identifies a device, so it is sealed with its job, deleted
/// with it, and never printed.
pub struct PushToken(Zeroizing<String>);

impl PushToken {
    /// A token as an upload's `Push-Token` header carries it; `Err` says what is wrong.
    pub fn parse(value: &[u8]) -> Result<PushToken, &'static str> {
        if value.is_empty() || value.len() > MAX_TOKEN_LEN {
            return Err("the Push-Token header must have 1 to 4096 characters");
        }
        if !value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(b))
        {
            return Err("the Push-Token header must be an FCM registration token \
                 (letters, digits, '-', '_', ':' and '.')");
        }
        let text = String::from_utf8(value.to_vec()).map_err(|_| "not ASCII")?;
        Ok(PushToken(Zeroizing::new(text)))
    }

    /// The token itself, for sealing and for the FCM request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PushToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PushToken([redacted])")
    }
}

/// How one push ended, as counted in `medrelay_push_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// FCM accepted the message.
    Sent,
    /// FCM says the token is no longer valid (`UNREGISTERED`) or malformed
    /// (`INVALID_ARGUMENT`): it is dropped, not retried.
    TokenDropped,
    /// FCM refused the request itself (credentials, sender mismatch): a configuration problem
    /// for the operator, not retried.
    Rejected,
    /// FCM stayed unavailable (429, 5xx, no connection) for the whole retry budget.
    GaveUp,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::TokenDropped => "token_dropped",
            Outcome::Rejected => "rejected",
            Outcome::GaveUp => "gave_up",
        }
    }
}

/// What one try said.
enum Try {
    Done(Outcome),
    /// Worth another try (FCM certainly did not take the message), after FCM's `Retry-After`
    /// if it gave one.
    Again(Option<Duration>),
}

/// The FCM HTTP v1 client of one Firebase project.
pub struct Fcm {
    http: reqwest::Client,
    account: CustomServiceAccount,
    send_url: String,
    in_flight: tokio::sync::Semaphore,
}

impl Fcm {
    /// The client the settings describe; `None` when no credentials are configured (push is
    /// off). A credentials file that cannot be read or lacks a project id is an error.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Fcm>> {
        let Some(file) = &settings.fcm_credentials_file else {
            return Ok(None);
        };
        let account = CustomServiceAccount::from_file(file).map_err(|e| {
            anyhow::anyhow!(
                "MEDRELAY_FCM_CREDENTIALS_FILE {}: not a usable Google service-account key: {e}",
                file.display()
            )
        })?;
        let project = account.project_id().ok_or_else(|| {
            anyhow::anyhow!(
                "MEDRELAY_FCM_CREDENTIALS_FILE {}: the key has no project_id",
                file.display()
            )
        })?;
        let base = settings.fcm_base_url.trim_end_matches('/');
        let send_url = format!("{base}/v1/projects/{project}/messages:send");
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Some(Fcm {
            http,
            account,
            send_url,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }))
    }

    /// Sends the push of a job that ended as `status` (`succeeded` or `failed`), retrying 429
    /// and 5xx answers with backoff for up to a minute, all of it (the access token included)
    /// bounded by that minute. Counts the outcome and returns it.
    pub async fn send(
        &self,
        token: &PushToken,
        job: &JobId,
        status: JobStatus,
        expires_at_ms: i64,
    ) -> Outcome {
        let message = Zeroizing::new(message(token, job, status, expires_at_ms).to_string());
        let outcome =
            match tokio::time::timeout(BUDGET + REQUEST_TIMEOUT, self.send_within_budget(&message))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Outcome::GaveUp,
            };
        metrics::counter!("medrelay_push_total", "outcome" => outcome.label()).increment(1);
        match outcome {
            Outcome::Sent => tracing::info!(job_id = %job, "push sent"),
            Outcome::TokenDropped => {
                tracing::warn!(job_id = %job, "FCM refused the push token: dropped")
            }
            Outcome::Rejected => tracing::error!(
                job_id = %job,
                "FCM refused the push request: check MEDRELAY_FCM_CREDENTIALS_FILE, \
                 MEDRELAY_FCM_BASE_URL and the Firebase project"
            ),
            Outcome::GaveUp => tracing::warn!(job_id = %job, "FCM unavailable: push given up"),
        }
        outcome
    }

    /// Tries `message` (the request's JSON) until it is taken, refused, or the minute is up.
    async fn send_within_budget(&self, message: &str) -> Outcome {
        let Ok(_permit) = self.in_flight.acquire().await else {
            return Outcome::GaveUp;
        };
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        loop {
            let left = BUDGET.saturating_sub(started.elapsed());
            let tried = tokio::time::timeout(left, self.try_once(message)).await;
            let wait = match tried {
                Ok(Try::Done(outcome)) => return outcome,
                // A slow token endpoint or FCM: the minute is up.
                Err(_) => return Outcome::GaveUp,
                Ok(Try::Again(retry_after)) => {
                    // Never sooner than our own backoff, whatever Retry-After says.
                    let jitter = delay.mul_f64(rand::rng().random_range(0.0..0.2));
                    retry_after.map_or(delay, |r| r.max(delay)) + jitter
                }
            };
            if started.elapsed() + wait > BUDGET {
                return Outcome::GaveUp;
            }
            metrics::counter!("medrelay_push_retries_total").increment(1);
            tokio::time::sleep(wait).await;
            delay *= 2;
        }
    }

    async fn try_once(&self, message: &str) -> Try {
        let access = match self.account.token(&[SCOPE]).await {
            Ok(access) => access,
            Err(e) => {
                tracing::warn!(error = %e, "getting an FCM access token failed");
                return Try::Again(None);
            }
        };
        let answer = self
            .http
            .post(&self.send_url)
            .bearer_auth(access.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(message.to_owned())
            .send()
            .await;
        let response = match answer {
            Ok(response) => response,
            // Not connected: FCM has not seen the message, another try cannot double it.
            Err(e) if e.is_connect() => {
                tracing::warn!(error = %e, "connecting to FCM failed");
                return Try::Again(None);
            }
            Err(e) => {
                // Sent, maybe taken, no answer (a timeout, a reset): another try could deliver
                // the push twice, and a job pushes at most once. reqwest's error names the
                // URL, which holds no token.
                tracing::warn!(error = %e, "FCM did not answer: push given up");
                return Try::Done(Outcome::GaveUp);
            }
        };
        let status = response.status();
        if status.is_success() {
            return Try::Done(Outcome::Sent);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = fcm_error_code(&body);
        tracing::debug!(status = status.as_u16(), code, "FCM answered an error");
        Try::Done(match (code, status.as_u16()) {
            // The token is gone, malformed or of another sender: it was the client's to give.
            (Some("UNREGISTERED" | "INVALID_ARGUMENT" | "SENDER_ID_MISMATCH"), _) => {
                Outcome::TokenDropped
            }
            (Some("QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL"), _)
            | (_, 429 | 500 | 502 | 503 | 504) => return Try::Again(retry_after),
            // Credentials, the APNs key, a wrong project or URL: the operator's to fix.
            _ => Outcome::Rejected,
        })
    }
}

/// The `errorCode` of FCM's error details (the top-level `status` is only a canonical code).
fn fcm_error_code(body: &Value) -> Option<&str> {
    body["error"]["details"].as_array()?.iter().find(|d| {
        d["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
    })?["errorCode"]
        .as_str()
}

/// The data-only message: the job's id and how it ended, high priority on Android, a
/// background push on Apple's devices, valid until the job expires (the app cannot fetch
/// anything after that).
fn message(token: &PushToken, job: &JobId, status: JobStatus, expires_at_ms: i64) -> Value {
    let now_ms = crate::clock::now_millis();
    let ttl_secs = ((expires_at_ms - now_ms) / 1000).max(0);
    json!({
        "message": {
            "token": token.expose(),
            "data": {"job_id": job.as_str(), "status": status.as_str()},
            "android": {"priority": "high", "ttl": format!("{ttl_secs}s")},
            "apns": {
                "headers": {
                    "apns-push-type": "background",
                    "apns-priority": "5",
                    "apns-expiration": (expires_at_ms / 1000).to_string(),
                },
                "payload": {"aps": {"content-available": 1}},
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_checked_and_never_printed() {
        let token = PushToken::parse(b"fGx1:APA91bH-abc_def.x").unwrap();
        assert_eq!(token.expose(), "fGx1:APA91bH-abc_def.x");
        assert_eq!(format!("{token:?}"), "PushToken([redacted])");
        for bad in [
            &b""[..],
            b"has space",
            b"new\nline",
            b"quote\"",
            &[b'a'; 4097][..],
        ] {
            assert!(PushToken::parse(bad).is_err(), "{bad:?}");
        }
        assert!(PushToken::parse(&[b'a'; 4096]).is_ok());
    }

    #[test]
    fn the_message_carries_the_job_and_its_end_only() {
        let token = PushToken::parse(b"device-token").unwrap();
        let job = JobId::from_raw("0194-job");
        let expires = crate::clock::now_millis() + 600_000;
        let m = message(&token, &job, JobStatus::Failed, expires);
        let message = m["message"].as_object().unwrap();
        let mut keys: Vec<_> = message.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["android", "apns", "data", "token"]);
        assert_eq!(
            m["message"]["data"],
            json!({"job_id": "0194-job", "status": "failed"})
        );
        assert_eq!(m["message"]["android"]["priority"], "high");
        let ttl = m["message"]["android"]["ttl"].as_str().unwrap();
        let secs: i64 = ttl.trim_end_matches('s').parse().unwrap();
        assert!((598..=600).contains(&secs), "{ttl}");
        assert_eq!(m["message"]["apns"]["headers"]["apns-priority"], "5");
        assert_eq!(
            m["message"]["apns"]["payload"],
            json!({"aps": {"content-available": 1}})
        );
    }

    #[test]
    fn fcm_error_codes_come_from_the_details() {
        let body = json!({"error": {"code": 404, "status": "NOT_FOUND", "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest"},
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}
        ]}});
        assert_eq!(fcm_error_code(&body), Some("UNREGISTERED"));
        assert_eq!(fcm_error_code(&json!({"error": {"code": 503}})), None);
        assert_eq!(fcm_error_code(&Value::Null), None);
    }
}
