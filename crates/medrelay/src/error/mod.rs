//! The one API error type: each variant maps to a [`Code`] of the registry ([`codes`]),
//! which holds its HTTP status, `retryable` and patient-readable words; rendered as RFC 9457
//! `application/problem+json`.
//!
//! The internal cause of a 5xx is logged here with context and never reaches the client.

pub mod codes;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

pub use codes::Code;

/// An RFC 9457 problem document, as every error response carries it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// A message a patient can read; says whether retrying can help.
    pub detail: String,
    /// Stable kebab-case code for the app to branch on.
    pub code: String,
    /// Whether the same action may succeed later.
    pub retryable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("job not found")]
    JobNotFound,
    #[error("job expired")]
    JobExpired,
    #[error("route not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("empty document")]
    EmptyDocument,
    #[error("missing file part")]
    MissingFile,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("document too large")]
    TooLarge { limit: u64 },
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("heic switched off")]
    HeicUnsupported,
    #[error("avif not supported")]
    AvifUnsupported,
    #[error("upload timed out")]
    UploadTimeout,
    /// A fair-use limit: what the patient reads, and seconds until trying again is useful.
    #[error("too many requests")]
    TooManyRequests {
        detail: &'static str,
        retry_after_secs: u64,
    },
    #[error("no such upload")]
    UploadNotFound,
    #[error("upload expired")]
    UploadExpired,
    /// Carries the upload's offset.
    #[error("upload offset mismatch")]
    UploadOffsetMismatch { current: i64 },
    #[error("upload busy")]
    UploadBusy,
    #[error("upload length exceeded")]
    UploadLengthExceeded,
    #[error("wrong upload content type")]
    UploadContentType,
    #[error("checksum mismatch")]
    ChecksumMismatch,
    #[error("tus version unsupported")]
    TusVersionUnsupported,
    #[error("service unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }

    pub fn unavailable(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Unavailable(e.into())
    }

    /// The registry's code of this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Unauthorized => Code::Unauthorized,
            ApiError::JobNotFound => Code::JobNotFound,
            ApiError::JobExpired => Code::JobExpired,
            ApiError::RouteNotFound => Code::NotFound,
            ApiError::MethodNotAllowed => Code::MethodNotAllowed,
            ApiError::EmptyDocument => Code::EmptyDocument,
            ApiError::MissingFile => Code::MissingFile,
            ApiError::BadRequest(_) => Code::BadRequest,
            ApiError::TooLarge { .. } => Code::DocumentTooLarge,
            ApiError::UnsupportedMediaType
            | ApiError::HeicUnsupported
            | ApiError::AvifUnsupported => Code::UnsupportedMediaType,
            ApiError::UploadTimeout => Code::UploadTimeout,
            ApiError::TooManyRequests { .. } => Code::TooManyRequests,
            ApiError::UploadNotFound => Code::UploadNotFound,
            ApiError::UploadExpired => Code::UploadExpired,
            ApiError::UploadOffsetMismatch { .. } => Code::UploadOffsetMismatch,
            ApiError::UploadBusy => Code::UploadBusy,
            ApiError::UploadLengthExceeded => Code::UploadLengthExceeded,
            ApiError::UploadContentType => Code::UploadContentType,
            ApiError::ChecksumMismatch => Code::ChecksumMismatch,
            ApiError::TusVersionUnsupported => Code::TusVersionUnsupported,
            ApiError::Unavailable(_) => Code::ServiceUnavailable,
            ApiError::Internal(_) => Code::InternalError,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code().http().status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn detail(&self) -> String {
        let template = self.code().http().detail;
        match self {
            ApiError::HeicUnsupported => codes::HEIC_DETAIL.into(),
            ApiError::AvifUnsupported => codes::AVIF_DETAIL.into(),
            ApiError::TooManyRequests { detail, .. } => (*detail).into(),
            ApiError::BadRequest(what) => template.replace("{what}", what),
            ApiError::TooLarge { limit } => {
                template.replace("{limit_mb}", &(limit / (1024 * 1024)).to_string())
            }
            _ => template.into(),
        }
    }

    pub fn problem(&self) -> Problem {
        let code = self.code();
        Problem {
            kind: "about:blank".into(),
            title: code.http().title.into(),
            status: code.http().status,
            detail: self.detail(),
            code: code.as_str().into(),
            retryable: code.retryable(),
        }
    }
}

/// Seconds after which a client should try again after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), code = self.code().as_str(), "request failed")
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %format!("{cause:#}"), code = self.code().as_str(), "request refused")
            }
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        let retry_after = match &self {
            ApiError::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS.into()),
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        match &self {
            ApiError::TusVersionUnsupported => {
                response
                    .headers_mut()
                    .insert("tus-version", HeaderValue::from_static("1.0.0"));
            }
            ApiError::UploadBusy => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        if matches!(self, ApiError::UploadTimeout) {
            // The client is too slow to be worth reading on: the connection is closed.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

pub fn problem_response(problem: &Problem) -> Response {
    let body = serde_json::to_vec(problem).expect("a problem always serializes");
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body,
    )
        .into_response()
}
