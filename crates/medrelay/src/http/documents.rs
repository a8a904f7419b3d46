//! `POST /v1/documents`: streams an upload into the object store and commits its job.
//!
//! The type is decided from the first bytes; the size limit holds with or without a
//! Content-Length; the body is never held whole in memory. A 202 is sent only after the
//! document is stored and the job row is committed. A refused upload leaves nothing behind.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::BodyDataStream;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::schema::DocumentForm;
use crate::auth::User;
use crate::clock::now_millis;
use crate::error::{ApiError, Problem};
use crate::lifecycle::Incoming;
use crate::limits::{Admission, UPLOAD_SLOT_AFTER};
use crate::model::Job;
use crate::processor::sniff::SNIFF_LEN;
use crate::processor::{Sniffed, admit};
use crate::push::PushToken;
use crate::state::AppState;

/// An upload that sends nothing for this long is cut off (slow-loris protection).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Multipart framing around the file part: boundaries and part headers.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;

/// Upload a document (PDF, JPEG, PNG, WebP or HEIC) as the raw body or as the `file` part of a
/// multipart form.
#[utoipa::path(
    post,
    path = "/v1/documents",
    tag = "documents",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = "^(\"[!#-~]{1,255}\"|[!#-~]{1,255})$",
            description = "The same key from the same user returns the same job and creates nothing new"),
        ("Push-Token" = Option<String>, Header, pattern = "^[A-Za-z0-9_:.-]{1,4096}$",
            description = "An FCM registration token: when the job ends, this device gets one data-only push (`job_id`, `status`), nothing else. Kept sealed with the job only, deleted with it; ignored where the server has no FCM credentials"),
    ),
    request_body(
        description = "A multipart form with one part named `file`. The file's bytes as the whole body are accepted too, under any content type (the type is decided from the bytes; `curl --data-binary`); this document describes the form, which every generated client builds correctly (dart-dio makes a broken call of a raw body listed beside a form)",
        content(
            (DocumentForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 202, description = "Stored and queued", body = Job,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 400, description = "Empty file or no `file` part", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The upload stalled, was too slow or ran past its deadline", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than MEDRELAY_MAX_UPLOAD_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a PDF, JPEG, PNG, WebP or HEIC (AVIF, and HEIC where switched off, with advice to send JPEG)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "A fair-use limit; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until a slot or a token frees up"))),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn create_document(
    State(state): State<AppState>,
    user: User,
    request: Request,
) -> Result<Response, ApiError> {
    let started = now_millis();
    let headers = request.headers().clone();
    // No document, no job: not even the replay of one (an idempotency key names an upload of
    // a document, not an empty request).
    if !has_body(&headers, request.body()) {
        return Err(ApiError::EmptyDocument);
    }

    let pace = Pace::new(
        state.settings.upload_deadline_within_ttl(),
        state.settings.upload_min_rate,
    );
    let body = SharedBody::new(request.into_body().into_data_stream(), pace);
    // A replay of an upload that became a job answers with that job whatever the limits say:
    // it creates nothing (a phone that lost the 202 of its last upload of the hour gets it).
    let replayed = async {
        let key = idempotency_key(&headers)?;
        let push = push_token(&headers)?;
        let job = match &key {
            Some(key) => {
                state
                    .lifecycle
                    .find_by_idempotency_key(&user.id, key)
                    .await?
            }
            None => None,
        };
        Ok::<_, ApiError>((
            Asked {
                idempotency_key: key,
                push,
            },
            job,
        ))
    }
    .await;
    let asked = match replayed {
        Ok((asked, None)) => asked,
        Ok((_, Some(job))) => {
            body.drain_in_background();
            return Ok(accepted(job));
        }
        Err(e) => {
            body.drain_in_background();
            return Err(e);
        }
    };
    // Fair use before a byte is read (a read, no write); an upload that lasts takes a slot of
    // its user's; the job's insert checks again. Held until the job is committed or refused.
    let prefix = state.lifecycle.user_prefix(&user.id);
    let admission = match state.limits.admit_upload(&prefix).await {
        Ok(admission) => admission,
        Err(e) => {
            body.drain_in_background();
            return Err(e.into());
        }
    };
    let answer = {
        let receiving = upload(
            &state,
            &user,
            &headers,
            body.clone(),
            started,
            asked,
            &admission,
        );
        tokio::pin!(receiving);
        tokio::select! {
            answer = &mut receiving => answer,
            () = tokio::time::sleep(UPLOAD_SLOT_AFTER) => match admission.hold_slot().await {
                Ok(()) => receiving.await,
                Err(refused) => {
                    // The body's next read fails, which aborts what was written; an upload that
                    // had all its bytes already was decided by its insert.
                    body.refuse();
                    receiving.await.or(Err(refused.into()))
                }
            },
        }
    };
    // Released before the answer: a client that sends its next upload at once finds the slot free.
    admission.release().await;
    answer
}

/// What an upload's headers ask for besides its document.
struct Asked {
    idempotency_key: Option<String>,
    /// The device to tell when the job ends (FCM).
    push: Option<PushToken>,
}

/// Receives, stores and commits one admitted upload (a twin that committed first with the same
/// idempotency key wins at the commit).
async fn upload(
    state: &AppState,
    user: &User,
    headers: &HeaderMap,
    body: SharedBody,
    started: i64,
    asked: Asked,
    admission: &Admission,
) -> Result<Response, ApiError> {
    let received = receive(state, user, headers, body.clone(), started).await;
    let mut incoming = match received {
        Ok(incoming) => incoming,
        Err(e) if body.too_slow() || matches!(e, ApiError::UploadTimeout) => {
            // Cut off: what it wrote is gone (the write was aborted), and the connection is
            // closed rather than read on.
            metrics::counter!("medrelay_uploads_cut_off_total").increment(1);
            return Err(ApiError::UploadTimeout);
        }
        Err(e) => {
            // The client may still be sending: let it finish, so that it reads our answer
            // instead of a broken pipe. Nothing of it is kept.
            body.drain_in_background();
            return Err(e);
        }
    };
    if let Some(token) = asked.push
        && let Err(e) = incoming.keep_push_token(token)
    {
        incoming.abort().await;
        return Err(e.into());
    }
    let (own_slot, caps, refused) = admission.at_insert();
    match incoming
        .commit(asked.idempotency_key, own_slot.as_deref(), caps, refused)
        .await?
    {
        Ok(job) => Ok(accepted(job)),
        Err(refused) => Err(crate::limits::Error::Refused(refused).into()),
    }
}

/// Checks the request and streams its document into the store: the whole document, sealed,
/// waiting for its job row.
async fn receive(
    state: &AppState,
    user: &User,
    headers: &HeaderMap,
    body: SharedBody,
    started: i64,
) -> Result<Incoming, ApiError> {
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let limit = state.settings.max_upload_bytes;
    // Refuse what is too large before reading a byte of it.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let allowance = if multipart {
        limit + MULTIPART_OVERHEAD
    } else {
        limit
    };
    if declared.is_some_and(|len| len > allowance) {
        return Err(ApiError::TooLarge { limit });
    }
    if declared == Some(0) {
        return Err(ApiError::EmptyDocument);
    }

    let incoming = if multipart {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let boundary = multer::parse_boundary(content_type)
            .map_err(|_| ApiError::BadRequest("the multipart form has no boundary"))?;
        let mut form = multer::Multipart::new(body, boundary);
        loop {
            let field = form
                .next_field()
                .await
                .map_err(|_| ApiError::BadRequest("the multipart form is malformed"))?;
            match field {
                Some(field) if field.name() == Some("file") => {
                    break ingest(state, user, field, limit, started).await?;
                }
                // Other parts (a caption, a client version) are not needed: skip them unread.
                Some(_) => continue,
                None => return Err(ApiError::MissingFile),
            }
        }
    } else {
        ingest(state, user, body, limit, started).await?
    };
    Ok(incoming)
}

/// The request body, shared so that what the handler did not read can be drained after the
/// answer is sent, and paced: an upload past its deadline or below the minimum rate ends in an
/// error (and [`SharedBody::too_slow`]).
#[derive(Clone)]
pub(super) struct SharedBody(Arc<Mutex<Paced>>);

struct Paced {
    stream: BodyDataStream,
    pace: Pace,
    /// A limit refused the upload while it was being received: the handler's next read fails.
    refused: bool,
}

/// What may be drained after an early answer; a client sending more is cut off.
const DRAIN_MAX_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(30);
/// Drains running at once in this instance.
const MAX_DRAINS: usize = 64;

impl SharedBody {
    pub(super) fn new(stream: BodyDataStream, pace: Pace) -> Self {
        Self(Arc::new(Mutex::new(Paced {
            stream,
            pace,
            refused: false,
        })))
    }

    /// Whether the upload was cut off by its deadline or the minimum rate.
    pub(super) fn too_slow(&self) -> bool {
        self.0.lock().pace.cut_off
    }

    /// Makes the handler's next read fail (a limit refused the upload mid-way).
    fn refuse(&self) {
        self.0.lock().refused = true;
    }

    /// Reads what the client still sends, so that it reads our early answer instead of a
    /// broken pipe. At most [`MAX_DRAINS`] at once per instance: past that the body is
    /// dropped unread and the connection closes (a flood of refused uploads costs no reading).
    fn drain_in_background(self) {
        // The drain reads what the handler no longer may.
        self.0.lock().refused = false;
        static DRAINS: Semaphore = Semaphore::const_new(MAX_DRAINS);
        let Ok(permit) = DRAINS.try_acquire() else {
            metrics::counter!("medrelay_upload_drains_skipped_total").increment(1);
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let mut body = self;
            let _ = tokio::time::timeout(DRAIN_MAX_TIME, async {
                let mut drained = 0usize;
                while let Some(Ok(chunk)) = body.next().await {
                    drained += chunk.len();
                    if drained > DRAIN_MAX_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

impl Stream for SharedBody {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut guard = self.0.lock();
        let Paced {
            stream,
            pace,
            refused,
        } = &mut *guard;
        if *refused {
            return Poll::Ready(Some(Err(axum::Error::new("refused by a limit"))));
        }
        if pace.cut_off || !pace.check(Instant::now()) {
            return Poll::Ready(Some(Err(pace.error())));
        }
        match Pin::new(stream).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                pace.received(chunk.len());
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                // Nothing arrived: wake up when the rules must be checked again. A timer that
                // fired is checked, then re-armed (for the next window) and polled once more
                // to register this task.
                for _ in 0..2 {
                    if pace.timer.as_mut().poll(cx).is_pending() {
                        break;
                    }
                    if !pace.check(Instant::now()) {
                        return Poll::Ready(Some(Err(pace.error())));
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// The rate is averaged over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(30);

/// The rules an upload's pace must keep: done within `deadline` of its start, and at least
/// `min_rate` bytes per second over each window of [`RATE_WINDOW`].
pub(super) struct Pace {
    deadline: Instant,
    min_rate: u64,
    window_start: Instant,
    window_bytes: u64,
    /// Fires at the end of the window or at the deadline, whichever is first.
    timer: Pin<Box<tokio::time::Sleep>>,
    cut_off: bool,
}

impl Pace {
    pub(super) fn new(deadline: Duration, min_rate: u64) -> Pace {
        let now = Instant::now();
        let deadline = now + deadline;
        Pace {
            deadline,
            min_rate,
            window_start: now,
            window_bytes: 0,
            timer: Box::pin(tokio::time::sleep_until((now + RATE_WINDOW).min(deadline))),
            cut_off: false,
        }
    }

    fn received(&mut self, bytes: usize) {
        self.window_bytes += bytes as u64;
    }

    /// Whether the upload keeps its pace at `now`; when a window is over, starts the next.
    fn check(&mut self, now: Instant) -> bool {
        if now >= self.deadline {
            self.cut_off = true;
            return false;
        }
        if now >= self.window_start + RATE_WINDOW {
            let needed = self.min_rate.saturating_mul(RATE_WINDOW.as_secs());
            if self.window_bytes < needed {
                self.cut_off = true;
                return false;
            }
            self.window_start = now;
            self.window_bytes = 0;
            self.timer
                .as_mut()
                .reset((now + RATE_WINDOW).min(self.deadline));
        }
        true
    }

    fn error(&self) -> axum::Error {
        axum::Error::new(anyhow::anyhow!(
            "the upload ran past its deadline or below the minimum rate"
        ))
    }
}

fn accepted(job: Job) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    let mut response = (StatusCode::ACCEPTED, axum::Json(job)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Whether a request carries a body (HTTP/1 with a length or chunked, HTTP/2 with data).
pub(super) fn has_body(headers: &HeaderMap, body: &axum::body::Body) -> bool {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) => n > 0,
        None => !axum::body::HttpBody::is_end_stream(body),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // A token or a quoted string (the IETF draft makes it a structured-field string): 1 to 255
    // visible characters, no quote or space inside.
    let text = value.as_bytes().trim_ascii();
    let key = text
        .strip_prefix(b"\"")
        .and_then(|t| t.strip_suffix(b"\""))
        .unwrap_or(text);
    if key.is_empty() || key.len() > 255 || !key.iter().all(|b| b.is_ascii_graphic() && *b != b'"')
    {
        return Err(ApiError::BadRequest(
            "the Idempotency-Key header must have 1 to 255 visible characters, without quotes or spaces inside",
        ));
    }
    let key = std::str::from_utf8(key).expect("ASCII");
    Ok(Some(key.to_owned()))
}

pub(super) fn push_token(headers: &HeaderMap) -> Result<Option<PushToken>, ApiError> {
    let Some(value) = headers.get("push-token") else {
        return Ok(None);
    };
    PushToken::parse(value.as_bytes().trim_ascii())
        .map(Some)
        .map_err(ApiError::BadRequest)
}

/// Streams `body` through the lifecycle into the store: sniffs the first bytes, enforces the
/// size limit, and aborts the write (leaving nothing) on any refusal.
async fn ingest<S, E>(
    state: &AppState,
    user: &User,
    body: S,
    limit: u64,
    started: i64,
) -> Result<Incoming, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut body = body;
    // Gather the first bytes to decide the type before anything is stored.
    let mut head = BytesMut::new();
    let mut ended = false;
    while head.len() < SNIFF_LEN {
        match next_chunk(&mut body).await? {
            Some(chunk) => {
                head.extend_from_slice(&chunk);
                if head.len() as u64 > limit {
                    return Err(ApiError::TooLarge { limit });
                }
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    if head.is_empty() {
        return Err(ApiError::EmptyDocument);
    }
    let media_type = match admit(&head, state.lifecycle.rules().heic) {
        Sniffed::Accepted(m) => m,
        refused => return Err(refusal(refused)),
    };

    let mut incoming = state.lifecycle.accept(&user.id, media_type, started)?;
    let outcome: Result<(), ApiError> = async {
        incoming.push(&head).await?;
        drop(head);
        if !ended {
            while let Some(chunk) = next_chunk(&mut body).await? {
                if incoming.size() + chunk.len() as u64 > limit {
                    return Err(ApiError::TooLarge { limit });
                }
                incoming.push(&chunk).await?;
            }
        }
        Ok(())
    }
    .await;
    match outcome {
        Ok(()) => Ok(incoming),
        Err(e) => {
            incoming.abort().await;
            Err(e)
        }
    }
}

async fn next_chunk<S, E>(body: &mut S) -> Result<Option<Bytes>, ApiError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
        Err(_) => Err(ApiError::UploadTimeout),
        Ok(None) => Ok(None),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
        Ok(Some(Err(e))) => {
            tracing::info!(error = %e, "the upload was interrupted");
            Err(ApiError::BadRequest("the upload was interrupted"))
        }
    }
}

/// A type refused by its first bytes, as the app reads it (an accepted one is never refused).
pub(super) fn refusal(refused: Sniffed) -> ApiError {
    match refused {
        Sniffed::Heic => ApiError::HeicUnsupported,
        Sniffed::Avif => ApiError::AvifUnsupported,
        Sniffed::Accepted(_) | Sniffed::Unsupported => ApiError::UnsupportedMediaType,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pace_cuts_off_below_the_rate_over_a_window_and_at_the_deadline() {
        let start = Instant::now();
        let mut pace = Pace::new(Duration::from_secs(600), 1024);
        // Within the first window nothing is judged.
        assert!(pace.check(start + Duration::from_secs(29)));
        pace.received(30 * 1024);
        // 30 KiB in the first 30 s: kept; the next window starts.
        assert!(pace.check(start + Duration::from_secs(31)));
        pace.received(30 * 1024 - 1);
        // One byte short over the second window: cut off, for good.
        assert!(!pace.check(start + Duration::from_secs(62)));
        assert!(pace.cut_off);

        let mut pace = Pace::new(Duration::from_secs(3), 0);
        pace.received(1 << 20);
        assert!(pace.check(start + Duration::from_secs(2)));
        assert!(!pace.check(start + Duration::from_secs(4)), "the deadline");
    }
}
