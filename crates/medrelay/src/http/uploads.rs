//! `/v1/uploads`: resumable uploads, tus 1.0.0 (core, creation, creation-with-upload,
//! expiration, termination, checksum). The protocol's headers and answers live here; what an
//! upload is, how its bytes are sealed and when it becomes its job is `lifecycle`'s.
//!
//! The upload's id is its job's. `Upload-Metadata` is accepted and ignored: it is neither
//! stored, nor echoed, nor logged (clients put file names there).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;

use super::documents::{IDLE_TIMEOUT, Pace, SharedBody, has_body, push_token};
use super::schema::{FileBytes, TusVersion};
use crate::auth::User;
use crate::clock::now_millis;
use crate::error::{ApiError, Problem};
use crate::ids::JobId;
use crate::lifecycle::{Appending, Checksum, UploadError, UploadState};
use crate::state::AppState;

/// The protocol version this server speaks.
const TUS_VERSION: &str = "1.0.0";
/// The extensions it supports.
const TUS_EXTENSIONS: &str = "creation,creation-with-upload,expiration,termination,checksum";
/// The content type of every request body that carries upload bytes.
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
const MEDRELAY_JOB: HeaderName = HeaderName::from_static("medrelay-job");

/// Discovery: the version, extensions, largest upload and checksum algorithms. No token
/// needed (it tells nothing about anyone).
#[utoipa::path(
    options,
    path = "/v1/uploads",
    tag = "uploads",
    responses(
        (status = 204, description = "What this server supports",
            headers(
                ("Tus-Version" = String, description = "`1.0.0`"),
                ("Tus-Extension" = String, description = "`creation,creation-with-upload,expiration,termination,checksum`"),
                ("Tus-Max-Size" = u64, description = "`MEDRELAY_MAX_UPLOAD_BYTES`"),
                ("Tus-Checksum-Algorithm" = String, description = "`sha1,sha256`"),
            )),
    ),
)]
pub async fn discover(State(state): State<AppState>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    headers.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    headers.insert(
        "tus-max-size",
        HeaderValue::from(state.settings.max_upload_bytes),
    );
    headers.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static(Checksum::ALGORITHMS),
    );
    response
}

/// Creates an upload (tus `creation`), optionally with its first bytes
/// (`creation-with-upload`).
#[utoipa::path(
    post,
    path = "/v1/uploads",
    tag = "uploads",
    security(("bearer" = [])),
    params(
        ("Tus-Resumable" = inline(TusVersion), Header, description = "The tus version, `1.0.0`"),
        ("Upload-Length" = u64, Header, minimum = 1, maximum = 33554432, description = "The whole document's size in bytes, at most `Tus-Max-Size` (`MEDRELAY_MAX_UPLOAD_BYTES`, by default 33554432); required (`Upload-Defer-Length` is not supported)"),
        ("Upload-Metadata" = Option<String>, Header, description = "Accepted and ignored: never stored, echoed or logged"),
        ("Push-Token" = Option<String>, Header, pattern = "^[A-Za-z0-9_:.-]{1,4096}$",
            description = "An FCM registration token: when the job ends, this device gets one data-only push (`job_id`, `status`). Kept sealed with the upload and then its job only"),
    ),
    request_body(
        description = "Optional: the first bytes (`Content-Type: application/offset+octet-stream`)",
        content((FileBytes = "application/offset+octet-stream")),
    ),
    responses(
        (status = 201, description = "Created; its id is the id of the job it becomes",
            headers(
                ("Location" = String, description = "/v1/uploads/{id}"),
                ("Upload-Expires" = String, description = "When the upload and every byte of it are deleted unless complete (RFC 9110 date)"),
                ("Upload-Offset" = u64, description = "Bytes received, when the request carried some"),
                ("Medrelay-Job" = String, description = "/v1/jobs/{id}, when the request carried every byte"),
            )),
        (status = 400, description = "No or a malformed `Upload-Length`, a deferred length, or an empty document", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Tus-Resumable` is not `1.0.0`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`Upload-Length` over `Tus-Max-Size`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The first bytes are not a PDF, JPEG, PNG, WebP or HEIC (the upload is terminated), or a body that is not `application/offset+octet-stream`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "A fair-use limit; unfinished uploads count as active jobs", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn create_upload(
    State(state): State<AppState>,
    user: User,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    tus_resumable(&headers)?;
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::BadRequest(
            "a deferred length is not supported: send Upload-Length",
        ));
    }
    let length = headers
        .get(UPLOAD_LENGTH)
        .ok_or(ApiError::BadRequest("Upload-Length is required"))
        .and_then(|v| number(v, "Upload-Length must be a number of bytes"))?;
    if length > state.settings.max_upload_bytes {
        return Err(ApiError::TooLarge {
            limit: state.settings.max_upload_bytes,
        });
    }
    if length == 0 {
        return Err(ApiError::EmptyDocument);
    }
    let with_data = has_body(&headers, request.body());
    let checksum = if with_data {
        offset_octet_stream(&headers)?;
        checksum(&headers)?
    } else {
        None
    };
    let push = push_token(&headers)?;
    let prefix = state.lifecycle.user_prefix(&user.id);
    state.limits.admit_resumable_upload(&prefix).await?;
    let row = state
        .lifecycle
        .create_upload(&user.id, length, push)
        .await?;
    let location = format!("/v1/uploads/{}", row.id);
    let expires = row.expires_at;
    let mut response = if with_data {
        let received = async {
            let appending = state
                .lifecycle
                .append_to_upload(&user.id, &row.id, 0, checksum)
                .await
                .map_err(api_error)?;
            receive(&state, appending, request.into_body()).await
        }
        .await;
        match received {
            Ok(mut answer) => {
                *answer.status_mut() = StatusCode::CREATED;
                answer
            }
            // A refused type terminated the upload.
            Err(
                e @ (ApiError::UnsupportedMediaType
                | ApiError::HeicUnsupported
                | ApiError::AvifUnsupported),
            ) => {
                return Err(e);
            }
            // The upload exists but its first bytes were not kept: the client resumes at 0.
            Err(e) => {
                tracing::info!(
                    code = e.code().as_str(),
                    "the first bytes of an upload were not kept"
                );
                let mut answer = StatusCode::CREATED.into_response();
                answer
                    .headers_mut()
                    .insert(UPLOAD_OFFSET, HeaderValue::from(0));
                answer
            }
        }
    } else {
        StatusCode::CREATED.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, value(&location));
    headers.insert(UPLOAD_EXPIRES, http_date(expires));
    Ok(response)
}

/// Where an upload stands: its offset (tus core).
#[utoipa::path(
    head,
    path = "/v1/uploads/{id}",
    tag = "uploads",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The upload's id (its job's)"),
        ("Tus-Resumable" = inline(TusVersion), Header, description = "The tus version, `1.0.0`"),
    ),
    responses(
        (status = 200, description = "The offset; `Cache-Control: no-store`",
            headers(
                ("Upload-Offset" = u64, description = "Bytes received and kept"),
                ("Upload-Length" = u64, description = "The whole document's size"),
                ("Upload-Expires" = String, description = "While unfinished: when it is deleted"),
                ("Medrelay-Job" = String, description = "/v1/jobs/{id}, once complete"),
            )),
        (status = 401, description = "Missing or invalid token; no body, as for every HEAD"),
        (status = 404, description = "No such upload of this user (terminated, refused, expired and swept, or another user's)"),
        (status = 410, description = "Expired, not yet swept"),
        (status = 412, description = "`Tus-Resumable` is not `1.0.0`"),
        (status = 503, description = "Storage or database unavailable"),
    ),
)]
pub async fn upload_offset(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    tus_resumable(&headers)?;
    let id = JobId::from_raw(id);
    let state_now = state
        .lifecycle
        .upload_state(&user.id, &id)
        .await
        .map_err(api_error)?;
    let mut response = StatusCode::OK.into_response();
    let out = response.headers_mut();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match state_now {
        UploadState::Open(row) => {
            out.insert(UPLOAD_OFFSET, HeaderValue::from(row.upload_offset));
            out.insert(UPLOAD_LENGTH, HeaderValue::from(row.length));
            out.insert(UPLOAD_EXPIRES, http_date(row.expires_at));
        }
        UploadState::Completed { job, length } => {
            out.insert(UPLOAD_OFFSET, HeaderValue::from(length));
            out.insert(UPLOAD_LENGTH, HeaderValue::from(length));
            out.insert(MEDRELAY_JOB, value(&format!("/v1/jobs/{job}")));
        }
    }
    Ok(response)
}

/// Appends bytes at the upload's offset (tus core; `checksum`). The request that brings the
/// last byte turns the upload into its job.
#[utoipa::path(
    patch,
    path = "/v1/uploads/{id}",
    tag = "uploads",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The upload's id (its job's)"),
        ("Tus-Resumable" = inline(TusVersion), Header, description = "The tus version, `1.0.0`"),
        ("Upload-Offset" = u64, Header, description = "Must equal the upload's offset"),
        ("Upload-Checksum" = Option<String>, Header, pattern = "^(sha1|sha256) ([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$", description = "`sha1|sha256 <base64 digest>` of this request's body"),
    ),
    request_body(content((FileBytes = "application/offset+octet-stream"))),
    responses(
        (status = 204, description = "Kept",
            headers(
                ("Upload-Offset" = u64, description = "The new offset"),
                ("Upload-Expires" = String, description = "When an unfinished upload is deleted"),
                ("Medrelay-Job" = String, description = "/v1/jobs/{id}: this request completed the upload and its job is queued"),
            )),
        (status = 400, description = "A missing or malformed header, an unsupported checksum algorithm, or chunks too small (more than 4096 parts)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such upload of this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`Upload-Offset` is not the upload's offset; nothing was kept", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "Expired", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "`Tus-Resumable` is not `1.0.0`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Past `Upload-Length`; nothing was kept", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not `application/offset+octet-stream`, or the first bytes are not a PDF, JPEG, PNG, WebP or HEIC (the upload is terminated)", body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "Another request is completing the upload; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 429, description = "A fair-use limit (checked again when the last byte makes the job); nothing of the request was kept", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 460, description = "The body does not match `Upload-Checksum`; nothing was kept", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn append(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers().clone();
    tus_resumable(&headers)?;
    offset_octet_stream(&headers)?;
    let offset = headers
        .get(UPLOAD_OFFSET)
        .ok_or(ApiError::BadRequest("Upload-Offset is required"))
        .and_then(|v| number(v, "Upload-Offset must be a number of bytes"))?;
    let checksum = checksum(&headers)?;
    let id = JobId::from_raw(id);
    let appending = match state
        .lifecycle
        .append_to_upload(&user.id, &id, offset as i64, checksum)
        .await
    {
        Ok(appending) => appending,
        // A client that lost the answer to its last request finds its job.
        Err(UploadError::Completed { job, length })
            if offset as i64 == length && !has_body(&headers, request.body()) =>
        {
            let mut response = StatusCode::NO_CONTENT.into_response();
            response
                .headers_mut()
                .insert(UPLOAD_OFFSET, HeaderValue::from(length));
            response
                .headers_mut()
                .insert(MEDRELAY_JOB, value(&format!("/v1/jobs/{job}")));
            return Ok(response);
        }
        Err(e) => return Err(api_error(e)),
    };
    receive(&state, appending, request.into_body()).await
}

/// Terminates an upload (tus `termination`): its bytes are deleted now.
#[utoipa::path(
    delete,
    path = "/v1/uploads/{id}",
    tag = "uploads",
    security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The upload's id"),
        ("Tus-Resumable" = inline(TusVersion), Header, description = "The tus version, `1.0.0`"),
    ),
    responses(
        (status = 204, description = "Terminated: every byte of it is gone"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such unfinished upload of this user (a completed one is its job: `DELETE /v1/jobs/{id}`)", body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "A request is turning the upload into its job; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
        (status = 412, description = "`Tus-Resumable` is not `1.0.0`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage or database unavailable; carries Retry-After", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds until trying again is useful"))),
    ),
)]
pub async fn terminate(
    State(state): State<AppState>,
    user: User,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    tus_resumable(&headers)?;
    state
        .lifecycle
        .terminate_upload(&user.id, &JobId::from_raw(id))
        .await
        .map_err(api_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams a request's body into the upload, then commits it: as more bytes of the upload, or,
/// when they are the last, as its job.
async fn receive(
    state: &AppState,
    mut appending: Appending,
    body: Body,
) -> Result<Response, ApiError> {
    // Each request is an upload in flight: this instance's cap, and the user's limits.
    let prefix = appending.upload().user_prefix.clone();
    let admission = match state.limits.admit_upload(&prefix).await {
        Ok(admission) => admission,
        Err(e) => {
            appending.abandon().await;
            return Err(e.into());
        }
    };
    // The pace of `POST /v1/documents`: at least the minimum rate, within the upload deadline
    // (and never past the upload's own expiry). A request cut off keeps what it brought.
    let left = (appending.upload().expires_at - now_millis()).max(0) as u64;
    let deadline = state
        .settings
        .upload_deadline_within_ttl()
        .min(Duration::from_millis(left));
    let mut body = SharedBody::new(
        body.into_data_stream(),
        Pace::new(deadline, state.settings.upload_min_rate),
    );
    let mut interrupted = false;
    loop {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break,
            // Cut off or silent: what arrived is kept (tus asks servers to keep what they can).
            Ok(Some(Err(_))) | Err(_) => {
                interrupted = true;
                break;
            }
        };
        if let Err(e) = appending.push(&chunk).await {
            appending.give_up(&e).await;
            return Err(api_error(e));
        }
    }
    if body.too_slow() {
        metrics::counter!("medrelay_uploads_cut_off_total").increment(1);
    }
    // What was received is committed in a task of its own: a client that disconnects (or an
    // HTTP/2 reset that drops this handler) cannot stop a commit half-way.
    let finishing = tokio::spawn(finish(appending, interrupted, admission));
    match finishing.await {
        Ok(answer) => answer,
        Err(e) => Err(ApiError::internal(anyhow::anyhow!(
            "committing an upload's bytes failed: {e}"
        ))),
    }
}

/// Commits a request's bytes: as more bytes of the upload, or, when they are the last, as its
/// job. Answers 204 with the offset (and `Medrelay-Job` once complete).
async fn finish(
    appending: Appending,
    interrupted: bool,
    admission: crate::limits::Admission,
) -> Result<Response, ApiError> {
    let expires = appending.upload().expires_at;
    let completes = appending.completes();
    let answer = if completes {
        let (own_slot, caps, refused) = admission.at_insert();
        match appending
            .become_job(interrupted, own_slot.as_deref(), caps, refused)
            .await
        {
            Ok(Ok(job)) => Ok(completed(&job.id.to_string(), job.size_bytes)),
            Ok(Err(refused)) => Err(crate::limits::Error::Refused(refused).into()),
            // Another request completed it first with the same bytes: the same answer.
            Err(UploadError::Completed { job, length }) => Ok(completed(job.as_str(), length)),
            Err(e) => Err(api_error(e)),
        }
    } else {
        match appending.commit(interrupted).await {
            Ok(offset) => {
                let mut response = StatusCode::NO_CONTENT.into_response();
                let headers = response.headers_mut();
                headers.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
                headers.insert(UPLOAD_EXPIRES, http_date(expires));
                Ok(response)
            }
            Err(e) => Err(api_error(e)),
        }
    };
    admission.release().await;
    answer
}

/// 204 for the request that completed an upload (or finds it completed).
fn completed(job: &str, length: i64) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(length));
    headers.insert(MEDRELAY_JOB, value(&format!("/v1/jobs/{job}")));
    response
}

/// An upload error as the app reads it.
fn api_error(e: UploadError) -> ApiError {
    match e {
        UploadError::NotFound => ApiError::UploadNotFound,
        // Complete already: the client asks the offset (HEAD shows the job) and is done.
        UploadError::Completed { length, .. } => ApiError::UploadOffsetMismatch { current: length },
        UploadError::Expired => ApiError::UploadExpired,
        UploadError::OffsetMismatch { current } => ApiError::UploadOffsetMismatch { current },
        UploadError::Busy => ApiError::UploadBusy,
        UploadError::BeyondLength => ApiError::UploadLengthExceeded,
        UploadError::Refused(refused) => super::documents::refusal(refused),
        UploadError::ChecksumMismatch => ApiError::ChecksumMismatch,
        UploadError::Interrupted => ApiError::BadRequest("the request was interrupted"),
        UploadError::TooManyParts => {
            ApiError::BadRequest("the upload was sent in too many small pieces: send larger chunks")
        }
        UploadError::Lifecycle(e) => e.into(),
    }
}

/// Every request but `OPTIONS` must speak tus 1.0.0.
fn tus_resumable(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(TUS_RESUMABLE) {
        Some(v) if v.as_bytes().trim_ascii() == TUS_VERSION.as_bytes() => Ok(()),
        _ => Err(ApiError::TusVersionUnsupported),
    }
}

fn offset_octet_stream(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(OFFSET_OCTET_STREAM) {
        Ok(())
    } else {
        Err(ApiError::UploadContentType)
    }
}

fn number(value: &HeaderValue, what: &'static str) -> Result<u64, ApiError> {
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .ok_or(ApiError::BadRequest(what))
}

/// `Upload-Checksum: <algorithm> <base64 digest>`.
fn checksum(headers: &HeaderMap) -> Result<Option<Checksum>, ApiError> {
    let Some(value) = headers.get("upload-checksum") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("Upload-Checksum must be printable text"))?;
    let (algorithm, digest) = text.trim().split_once(' ').ok_or(ApiError::BadRequest(
        "Upload-Checksum must be `algorithm digest`",
    ))?;
    // Padded base64; bits past the last byte are not held against the client.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let digest = lenient
        .decode(digest.trim())
        .map_err(|_| ApiError::BadRequest("the Upload-Checksum digest must be base64"))?;
    Checksum::new(algorithm, digest)
        .map(Some)
        .ok_or(ApiError::BadRequest(
            "the Upload-Checksum algorithm must be sha1 or sha256",
        ))
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("ids are header-safe")
}

/// An RFC 9110 date from unix milliseconds.
fn http_date(millis: i64) -> HeaderValue {
    let at = UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    value(&httpdate::fmt_http_date(at.max(SystemTime::UNIX_EPOCH)))
}
