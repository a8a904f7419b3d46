//! The one API error type: a stable kebab-case `code`, an HTTP status, a patient-readable
//! message and whether retrying helps, rendered as RFC 9457 `application/problem+json`.
//!
//! The internal cause of a 5xx is logged here with context and never reaches the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

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
    #[error("heic not supported")]
    HeicUnsupported,
    #[error("upload timed out")]
    UploadTimeout,
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::JobNotFound | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::JobExpired => StatusCode::GONE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::EmptyDocument | ApiError::MissingFile | ApiError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType | ApiError::HeicUnsupported => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::UploadTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::JobNotFound => "job-not-found",
            ApiError::JobExpired => "job-expired",
            ApiError::RouteNotFound => "not-found",
            ApiError::MethodNotAllowed => "method-not-allowed",
            ApiError::EmptyDocument => "empty-document",
            ApiError::MissingFile => "missing-file",
            ApiError::BadRequest(_) => "bad-request",
            ApiError::TooLarge { .. } => "document-too-large",
            ApiError::UnsupportedMediaType | ApiError::HeicUnsupported => "unsupported-media-type",
            ApiError::UploadTimeout => "upload-timeout",
            ApiError::Unavailable(_) => "service-unavailable",
            ApiError::Internal(_) => "internal-error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "Not signed in",
            ApiError::JobNotFound => "Job not found",
            ApiError::JobExpired => "Job expired",
            ApiError::RouteNotFound => "Not found",
            ApiError::MethodNotAllowed => "Method not allowed",
            ApiError::EmptyDocument => "Empty document",
            ApiError::MissingFile => "No file",
            ApiError::BadRequest(_) => "Bad request",
            ApiError::TooLarge { .. } => "Document too large",
            ApiError::UnsupportedMediaType | ApiError::HeicUnsupported => "Unsupported file type",
            ApiError::UploadTimeout => "Upload too slow",
            ApiError::Unavailable(_) => "Service unavailable",
            ApiError::Internal(_) => "Something went wrong",
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Unauthorized => {
                "Your session has ended or is not valid. Please sign in again.".into()
            }
            ApiError::JobNotFound => {
                "We could not find this document. It may have been deleted or never uploaded."
                    .into()
            }
            ApiError::JobExpired => {
                "This document and its results were deleted, as we keep them for one hour at most. Please upload it again if you still need it."
                    .into()
            }
            ApiError::RouteNotFound => "This address does not exist.".into(),
            ApiError::MethodNotAllowed => "This action is not possible here.".into(),
            ApiError::EmptyDocument => {
                "The file is empty. Please choose the document again and retry.".into()
            }
            ApiError::MissingFile => {
                "No file was attached. Please choose a document and retry.".into()
            }
            ApiError::BadRequest(what) => format!("The request could not be read: {what}."),
            ApiError::TooLarge { limit } => format!(
                "This file is larger than {} MB. Please choose a smaller file or scan fewer pages.",
                limit / (1024 * 1024)
            ),
            ApiError::UnsupportedMediaType => {
                "This file type is not supported. Please send a PDF or a photo (JPEG, PNG or WebP)."
                    .into()
            }
            ApiError::HeicUnsupported => {
                "HEIC photos are not supported yet. Please send the photo as JPEG: on iPhone, choose Settings > Camera > Formats > Most Compatible, or share the photo as JPEG."
                    .into()
            }
            ApiError::UploadTimeout => {
                "The upload was too slow and was stopped. Please check your connection and try again."
                    .into()
            }
            ApiError::Unavailable(_) => {
                "The service is busy or briefly unavailable. Please try again in a moment.".into()
            }
            ApiError::Internal(_) => {
                "Something went wrong on our side. Please try again in a moment.".into()
            }
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable(_) | ApiError::Internal(_) | ApiError::UploadTimeout
        )
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: self.title().into(),
            status: self.status().as_u16(),
            detail: self.detail(),
            code: self.code().into(),
            retryable: self.retryable(),
        }
    }
}

/// Seconds after which a client should try again after a 503.
const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 5;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = %format!("{cause:#}"), code = self.code(), "request failed")
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %format!("{cause:#}"), code = self.code(), "request refused")
            }
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        if matches!(self, ApiError::Unavailable(_)) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
            );
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
