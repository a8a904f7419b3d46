//! Processors turn one document into a [`DocumentResult`]: `local` (offline, pure Rust) by
//! default, Claude (`anthropic`) in production.
//!
//! Owns the media-type decision (from the bytes, never from the declared type) and the
//! classification of every failure as Retry, Abort or Unmanaged. Every parse or decode of a
//! document's bytes happens in a [`sandbox`] child, never in the server. A processor never
//! stores or logs document bytes; it gets them in memory and returns a result.

pub mod anthropic;
pub mod local;
pub mod pdf;
pub mod photo;
pub mod sandbox;
pub mod sniff;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;

use crate::config::{ProcessorKind, Settings};
use crate::error::Code;
use crate::model::{DocumentResult, JobError};

pub use sniff::{MediaType, Sniffed, admit, sniff};

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

/// What one document may hold; over any limit it is too complex. Enforced in the sandbox
/// child, which receives them from the server's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParseLimits {
    /// Bytes the PDF streams that reading needs may inflate to (images are never inflated).
    pub pdf_max_inflated_bytes: u64,
    pub pdf_max_pages: u32,
    pub pdf_max_objects: u64,
    /// How deep arrays and dictionaries may nest in one PDF object.
    pub pdf_max_depth: u32,
    /// Pixels of one photo (width × height).
    pub image_max_pixels: u64,
    /// Whether HEIC photos are decoded: off, a job admitted before the switch fails as an
    /// unsupported type instead.
    pub heic: bool,
}

impl ParseLimits {
    pub fn from_settings(settings: &Settings) -> ParseLimits {
        ParseLimits {
            pdf_max_inflated_bytes: settings.pdf_max_inflated_bytes,
            pdf_max_pages: settings.pdf_max_pages,
            pdf_max_objects: settings.pdf_max_objects,
            pdf_max_depth: settings.pdf_max_depth,
            image_max_pixels: settings.image_max_pixels,
            heic: settings.heic,
        }
    }
}

impl Default for ParseLimits {
    /// The embedded defaults.
    fn default() -> Self {
        ParseLimits::from_settings(&Settings::defaults())
    }
}

/// Why a document could not be processed, as the app will be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    /// The user's provider calls of the rolling day are used up (the spend guard): the
    /// provider was not called.
    DailyLimit,
}

impl Refusal {
    /// The registry's code for this refusal.
    pub fn code(self) -> Code {
        match self {
            Refusal::Encrypted => Code::DocumentEncrypted,
            Refusal::Unreadable => Code::DocumentUnreadable,
            Refusal::Unsupported => Code::UnsupportedMediaType,
            Refusal::TooComplex => Code::DocumentTooComplex,
            Refusal::Rejected => Code::DocumentRejected,
            Refusal::Refused => Code::DocumentRefused,
            Refusal::Missing => Code::DocumentMissing,
            Refusal::ServiceUnavailable => Code::ServiceUnavailable,
            Refusal::DailyLimit => Code::DailyLimitReached,
        }
    }

    /// The error a job refused this way ends with.
    pub fn job_error(self) -> JobError {
        self.code().job_error()
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
    /// The document's data key was wrapped by a master key this instance does not have (a
    /// rotation in progress, a misconfigured instance): not the document's fault and not
    /// tampering. The job is handed back, its attempt not counted, until the key appears or
    /// its lifetime ends.
    #[error("the master key {kid:?} is not configured here")]
    KeyMissing { kid: String },
}

/// Turns one document into a result.
pub trait Processor: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Processes `document`, charging its provider calls to `budget` before making any.
    fn process<'a>(
        &'a self,
        document: Document,
        budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>>;
}

/// Asked before an attempt calls the provider: may this job's user make `calls` more? Refuses
/// with [`Refusal::DailyLimit`] (the spend guard), and then none of them is made.
pub trait CallBudget: Send + Sync {
    fn charge(&self, calls: u32) -> BoxFuture<'_, Result<(), ProcessError>>;
}

/// No spend guard: `medrelay process` and processors that call no provider.
pub struct Unlimited;

impl CallBudget for Unlimited {
    fn charge(&self, _calls: u32) -> BoxFuture<'_, Result<(), ProcessError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The processor `settings` configure (`MEDRELAY_PROCESSOR`).
pub fn configured(settings: &Settings) -> anyhow::Result<Arc<dyn Processor>> {
    Ok(match settings.processor {
        ProcessorKind::Local => Arc::new(local::LocalProcessor::new(
            sandbox::Sandbox::from_settings(settings)?,
        )),
        ProcessorKind::Anthropic => Arc::new(
            anthropic::AnthropicProcessor::new(settings)
                .context("configuring the anthropic processor")?,
        ),
    })
}
