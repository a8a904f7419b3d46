//! Processors turn one document into a [`DocumentResult`]: `local` (offline, pure Rust) by
//! default, Claude (`anthropic`) in production.
//!
//! Owns the media-type decision (from the bytes, never from the declared type) and the
//! classification of every failure as Retry, Abort or Unmanaged. A processor never stores or
//! logs document bytes; it gets them in memory and returns a result.

pub mod anthropic;
pub mod local;
pub mod sniff;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::model::{DocumentResult, JobError};
pub use sniff::{MediaType, Sniffed, sniff};

/// A document in memory. Its `Debug` prints the type and size only.
#[derive(Clone)]
pub struct Document {
    pub media_type: MediaType,
    pub bytes: Bytes,
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("media_type", &self.media_type)
            .field("size", &self.bytes.len())
            .finish()
    }
}

/// Why a document could not be processed, as the app will be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The PDF is password-protected.
    Encrypted,
    /// The file is damaged or not what it claims to be.
    Unreadable,
    /// The file type is not supported by this processor.
    Unsupported,
    /// Processing took longer than allowed, or the document is too large for one answer.
    TooComplex,
    /// The provider rejected the document as invalid input.
    Rejected,
    /// The provider declined to process the document.
    Refused,
    /// The document is gone from the store (deleted by the user, or the upload raced a delete
    /// of all the user's data).
    Missing,
    /// The provider cannot serve us now (credentials, permissions, spend limit): not the
    /// document's fault, and not worth retrying at once.
    ServiceUnavailable,
}

impl Refusal {
    pub fn job_error(self) -> JobError {
        let (code, message) = match self {
            Refusal::Encrypted => (
                "document-encrypted",
                "This PDF is protected by a password, so we cannot read it. Please remove the password (for example, print it to a new PDF) and upload it again.",
            ),
            Refusal::Unreadable => (
                "document-unreadable",
                "We could not read this file. It may be damaged. Please export or scan the document again and upload the new file.",
            ),
            Refusal::Unsupported => (
                "unsupported-media-type",
                "This file type is not supported. Please send a PDF or a photo (JPEG, PNG or WebP).",
            ),
            Refusal::TooComplex => (
                "document-too-complex",
                "This document is too complex for us to read. Please upload fewer pages at a time or a simpler scan.",
            ),
            Refusal::Rejected => (
                "document-rejected",
                "We could not process this document. Please try a clearer scan or photo, or export the document again.",
            ),
            Refusal::Refused => (
                "document-refused",
                "We could not process this document. Please make sure it is a medical document and try again.",
            ),
            Refusal::Missing => (
                "document-missing",
                "We no longer have this document. Please upload it again.",
            ),
            Refusal::ServiceUnavailable => (
                "service-unavailable",
                "Reading documents is temporarily unavailable. Please try again later.",
            ),
        };
        JobError {
            code: code.into(),
            message: message.into(),
            retryable: matches!(self, Refusal::ServiceUnavailable | Refusal::Missing),
        }
    }
}

/// How a processing attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Transient: overload, rate limit, timeout. Worth another attempt.
    #[error("transient failure: {reason}")]
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Permanent: the input is refused or unreadable. No retry.
    #[error("document refused: {0:?}")]
    Abort(Refusal),
    /// Anything unexpected: a broken invariant, a failed integrity check.
    #[error("unmanaged failure: {0:#}")]
    Unmanaged(anyhow::Error),
}

/// Turns one document into a result.
pub trait Processor: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn process(&self, document: Document) -> BoxFuture<'_, Result<DocumentResult, ProcessError>>;
}
