//! The registry of every error code the app can see, each defined once: its stable kebab-case
//! name, whether retrying can help, and the patient-readable words, as the `code` of a
//! problem+json answer (with its HTTP status) and/or as the `error.code` of a failed job.
//!
//! The tables of `docs/api-notes.md` are generated from here ([`api_notes_tables`]); a test
//! fails when they drift. Adding a code: add a variant, fill its [`Spec`], regenerate the docs
//! (`MEDRELAY_BLESS=1 cargo test -p medrelay error::codes`).

use crate::model::JobError;

/// A stable error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Unauthorized,
    JobNotFound,
    NotFound,
    MethodNotAllowed,
    JobExpired,
    EmptyDocument,
    MissingFile,
    BadRequest,
    UploadTimeout,
    DocumentTooLarge,
    UnsupportedMediaType,
    InternalError,
    ServiceUnavailable,
    DocumentEncrypted,
    DocumentUnreadable,
    DocumentTooComplex,
    DocumentRejected,
    DocumentRefused,
    DocumentMissing,
    ProcessingUnavailable,
    ProcessingFailed,
    TooManyRequests,
    DailyLimitReached,
    UploadNotFound,
    UploadExpired,
    UploadOffsetMismatch,
    UploadBusy,
    UploadLengthExceeded,
    UploadContentType,
    ChecksumMismatch,
    TusVersionUnsupported,
}

/// How a code answers an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct Http {
    pub status: u16,
    pub title: &'static str,
    /// May hold `{limit_mb}` or `{what}`, filled by the error that carries the value.
    pub detail: &'static str,
    /// What it means, for the API notes (not sent to the app).
    pub meaning: &'static str,
}

/// How a code ends a failed job.
#[derive(Clone, Copy, Debug)]
pub struct JobEnd {
    /// The `error.message`, for the patient.
    pub message: &'static str,
    /// What it means, for the API notes (not sent to the app).
    pub meaning: &'static str,
}

/// Everything about one code.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub code: &'static str,
    /// Whether the same action may succeed later.
    pub retryable: bool,
    /// As a problem+json answer, if the API answers with it, and what that means.
    pub http: Option<Http>,
    /// As a failed job's error, if a job can end with it.
    pub job: Option<JobEnd>,
}

/// The 415 detail for HEIC photos where the service has them switched off (same code).
pub const HEIC_DETAIL: &str = "HEIC photos are not accepted here. Please send the photo as JPEG: on iPhone, choose Settings > Camera > Formats > Most Compatible, or share the photo as JPEG.";
/// The 415 detail for AVIF photos, which no decoder here reads (same code).
pub const AVIF_DETAIL: &str = "AVIF photos are not supported. Please send the photo as JPEG: most phones can share a photo as JPEG, or save it in the most compatible format.";

const fn http(
    status: u16,
    title: &'static str,
    detail: &'static str,
    meaning: &'static str,
) -> Option<Http> {
    Some(Http {
        status,
        title,
        detail,
        meaning,
    })
}

const fn job(message: &'static str, meaning: &'static str) -> Option<JobEnd> {
    Some(JobEnd { message, meaning })
}

impl Code {
    pub const ALL: [Code; 31] = [
        Code::EmptyDocument,
        Code::MissingFile,
        Code::BadRequest,
        Code::Unauthorized,
        Code::JobNotFound,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::UploadTimeout,
        Code::JobExpired,
        Code::DocumentTooLarge,
        Code::UnsupportedMediaType,
        Code::InternalError,
        Code::ServiceUnavailable,
        Code::DocumentEncrypted,
        Code::DocumentUnreadable,
        Code::DocumentTooComplex,
        Code::DocumentRejected,
        Code::DocumentRefused,
        Code::DocumentMissing,
        Code::ProcessingUnavailable,
        Code::ProcessingFailed,
        Code::TooManyRequests,
        Code::DailyLimitReached,
        Code::UploadNotFound,
        Code::UploadExpired,
        Code::UploadOffsetMismatch,
        Code::UploadBusy,
        Code::UploadLengthExceeded,
        Code::UploadContentType,
        Code::ChecksumMismatch,
        Code::TusVersionUnsupported,
    ];

    pub const fn spec(self) -> Spec {
        match self {
            Code::Unauthorized => Spec {
                code: "unauthorized",
                retryable: false,
                http: http(
                    401,
                    "Not signed in",
                    "Your session has ended or is not valid. Please sign in again.",
                    "missing, malformed, expired or badly signed token",
                ),
                job: None,
            },
            Code::JobNotFound => Spec {
                code: "job-not-found",
                retryable: false,
                http: http(
                    404,
                    "Job not found",
                    "We could not find this document. It may have been deleted or never uploaded.",
                    "no such job, or another user's",
                ),
                job: None,
            },
            Code::NotFound => Spec {
                code: "not-found",
                retryable: false,
                http: http(
                    404,
                    "Not found",
                    "This address does not exist.",
                    "no such route",
                ),
                job: None,
            },
            Code::MethodNotAllowed => Spec {
                code: "method-not-allowed",
                retryable: false,
                http: http(
                    405,
                    "Method not allowed",
                    "This action is not possible here.",
                    "the route exists, the method does not",
                ),
                job: None,
            },
            Code::UploadNotFound => Spec {
                code: "upload-not-found",
                retryable: false,
                http: http(
                    404,
                    "Upload not found",
                    "We could not find this upload. It may have expired or been cancelled. Please send the document again.",
                    "no such resumable upload of this user (never created, terminated, swept after its TTL, refused, or another user's)",
                ),
                job: None,
            },
            Code::UploadExpired => Spec {
                code: "upload-expired",
                retryable: false,
                http: http(
                    410,
                    "Upload expired",
                    "This upload was not finished within an hour and was deleted. Please send the document again.",
                    "the resumable upload passed `Upload-Expires`; its bytes are gone or about to be",
                ),
                job: None,
            },
            Code::UploadOffsetMismatch => Spec {
                code: "upload-offset-mismatch",
                retryable: true,
                http: http(
                    409,
                    "Upload out of step",
                    "Part of this upload had already arrived. The app will continue from where the upload stands.",
                    "`Upload-Offset` is not the upload's offset (ask with `HEAD`); nothing of the request was kept",
                ),
                job: None,
            },
            Code::UploadBusy => Spec {
                code: "upload-busy",
                retryable: true,
                http: http(
                    423,
                    "Upload being finished",
                    "This upload is being finished right now. Please check again in a moment.",
                    "another request is turning the upload into its job",
                ),
                job: None,
            },
            Code::UploadLengthExceeded => Spec {
                code: "upload-length-exceeded",
                retryable: false,
                http: http(
                    413,
                    "More than announced",
                    "The app sent more data than it announced for this upload. Please send the document again.",
                    "a `PATCH` would carry the upload past its `Upload-Length`; nothing of the request was kept",
                ),
                job: None,
            },
            Code::UploadContentType => Spec {
                code: "upload-content-type",
                retryable: false,
                http: http(
                    415,
                    "Wrong upload format",
                    "The app sent this part of the upload in a form we cannot read. Please update the app.",
                    "a `PATCH` (or a `POST` with data) whose `Content-Type` is not `application/offset+octet-stream`",
                ),
                job: None,
            },
            Code::ChecksumMismatch => Spec {
                code: "checksum-mismatch",
                retryable: true,
                http: http(
                    460,
                    "Damaged in transit",
                    "Part of the upload arrived damaged and was discarded. The app will send it again.",
                    "the request's bytes do not match its `Upload-Checksum`; nothing of it was kept",
                ),
                job: None,
            },
            Code::TusVersionUnsupported => Spec {
                code: "tus-version-unsupported",
                retryable: false,
                http: http(
                    412,
                    "Protocol version not supported",
                    "This version of the app cannot upload here. Please update the app.",
                    "`Tus-Resumable` is missing or not `1.0.0` (the answer's `Tus-Version` lists what is supported)",
                ),
                job: None,
            },
            Code::JobExpired => Spec {
                code: "job-expired",
                retryable: false,
                http: http(
                    410,
                    "Job expired",
                    "This document and its results were deleted, as we keep them for one hour at most. Please upload it again if you still need it.",
                    "the job passed `expires_at`; its data is gone (answered for 24 h)",
                ),
                job: None,
            },
            Code::EmptyDocument => Spec {
                code: "empty-document",
                retryable: false,
                http: http(
                    400,
                    "Empty document",
                    "The file is empty. Please choose the document again and retry.",
                    "the upload has no bytes",
                ),
                job: None,
            },
            Code::MissingFile => Spec {
                code: "missing-file",
                retryable: false,
                http: http(
                    400,
                    "No file",
                    "No file was attached. Please choose a document and retry.",
                    "a multipart form without a `file` part",
                ),
                job: None,
            },
            Code::BadRequest => Spec {
                code: "bad-request",
                retryable: false,
                http: http(
                    400,
                    "Bad request",
                    "The request could not be read: {what}.",
                    "a malformed request (header, form, interrupted body)",
                ),
                job: None,
            },
            Code::UploadTimeout => Spec {
                code: "upload-timeout",
                retryable: true,
                http: http(
                    408,
                    "Upload too slow",
                    "The upload was too slow and was stopped. Please check your connection and try again.",
                    "the upload sent nothing for 30 s, sent less than `MEDRELAY_UPLOAD_MIN_RATE` bytes/s over 30 s, or ran past `MEDRELAY_UPLOAD_DEADLINE`; nothing of it is kept",
                ),
                job: None,
            },
            Code::DocumentTooLarge => Spec {
                code: "document-too-large",
                retryable: false,
                http: http(
                    413,
                    "Document too large",
                    "This file is larger than {limit_mb} MB. Please choose a smaller file or scan fewer pages.",
                    "larger than `MEDRELAY_MAX_UPLOAD_BYTES`",
                ),
                job: None,
            },
            Code::UnsupportedMediaType => Spec {
                code: "unsupported-media-type",
                retryable: false,
                http: http(
                    415,
                    "Unsupported file type",
                    "This file type is not supported. Please send a PDF or a photo (JPEG, PNG, WebP or HEIC).",
                    "not a PDF, JPEG, PNG, WebP or HEIC; AVIF, and HEIC where `MEDRELAY_HEIC` is off, with advice to send JPEG",
                ),
                job: job(
                    "This file type is not supported. Please send a PDF or a photo (JPEG, PNG, WebP or HEIC).",
                    "the processor cannot take this type",
                ),
            },
            Code::InternalError => Spec {
                code: "internal-error",
                retryable: true,
                http: http(
                    500,
                    "Something went wrong",
                    "Something went wrong on our side. Please try again in a moment.",
                    "a bug or a broken invariant (logged with its cause, never sent)",
                ),
                job: None,
            },
            Code::ServiceUnavailable => Spec {
                code: "service-unavailable",
                retryable: true,
                http: http(
                    503,
                    "Service unavailable",
                    "The service is busy or briefly unavailable. Please try again in a moment.",
                    "the database or the store cannot serve now (with `Retry-After`)",
                ),
                job: job(
                    "Reading documents is temporarily unavailable. Please try again later.",
                    "the provider cannot serve us now (credentials, permissions, spend limit)",
                ),
            },
            Code::DocumentEncrypted => Spec {
                code: "document-encrypted",
                retryable: false,
                http: None,
                job: job(
                    "This PDF is protected by a password, so we cannot read it. Please remove the password (for example, print it to a new PDF) and upload it again.",
                    "password-protected PDF",
                ),
            },
            Code::DocumentUnreadable => Spec {
                code: "document-unreadable",
                retryable: false,
                http: None,
                job: job(
                    "We could not read this file. It may be damaged. Please export or scan the document again and upload the new file.",
                    "damaged file, or not what its first bytes claim",
                ),
            },
            Code::DocumentTooComplex => Spec {
                code: "document-too-complex",
                retryable: false,
                http: None,
                job: job(
                    "This document is too complex for us to read. Please upload fewer pages at a time or a simpler scan.",
                    "a limit of the parser sandbox stopped it (time, memory, pixels), or it is too large for one answer",
                ),
            },
            Code::DocumentRejected => Spec {
                code: "document-rejected",
                retryable: false,
                http: None,
                job: job(
                    "We could not process this document. Please try a clearer scan or photo, or export the document again.",
                    "the provider rejected the document as invalid input",
                ),
            },
            Code::DocumentRefused => Spec {
                code: "document-refused",
                retryable: false,
                http: None,
                job: job(
                    "We could not process this document. Please make sure it is a medical document and try again.",
                    "the provider declined to process the document",
                ),
            },
            Code::DocumentMissing => Spec {
                code: "document-missing",
                retryable: true,
                http: None,
                job: job(
                    "We no longer have this document. Please upload it again.",
                    "the document was deleted before it was read (a delete raced the upload)",
                ),
            },
            Code::ProcessingUnavailable => Spec {
                code: "processing-unavailable",
                retryable: true,
                http: None,
                job: job(
                    "We could not read your document right now because the service is busy. Please try again in a few minutes.",
                    "every retry failed transiently",
                ),
            },
            Code::TooManyRequests => Spec {
                code: "too-many-requests",
                retryable: true,
                http: http(
                    429,
                    "Too many requests",
                    "You are sending many documents at once. Please wait a minute and try again.",
                    "a fair-use limit (per user or per instance, see Limits); `Retry-After` says when a slot or a token frees up",
                ),
                job: None,
            },
            Code::DailyLimitReached => Spec {
                code: "daily-limit-reached",
                retryable: true,
                http: None,
                job: job(
                    "You have sent many documents today, so we paused reading more for now. Please upload this document again tomorrow.",
                    "the spend guard: the user's provider calls of the rolling day reached `MEDRELAY_USER_PROVIDER_CALLS_PER_DAY`; the provider was not called",
                ),
            },
            Code::ProcessingFailed => Spec {
                code: "processing-failed",
                retryable: true,
                http: None,
                job: job(
                    "Something went wrong while reading your document, and we deleted it to keep it safe. Please upload it again.",
                    "an unmanaged failure (a crash in processing, a failed integrity check): every temporary byte of the user was purged",
                ),
            },
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.spec().code
    }

    pub const fn retryable(self) -> bool {
        self.spec().retryable
    }

    /// How this code answers an HTTP request. Only codes the API answers with are asked.
    pub fn http(self) -> Http {
        self.spec()
            .http
            .unwrap_or_else(|| Code::InternalError.http())
    }

    /// The error a failed job carries with this code.
    pub fn job_error(self) -> JobError {
        let spec = self.spec();
        JobError {
            code: spec.code.into(),
            message: spec
                .job
                .map(|j| j.message)
                .or(spec.http.map(|h| h.detail))
                .unwrap_or_default()
                .into(),
            retryable: spec.retryable,
        }
    }
}

/// The error-code tables of `docs/api-notes.md`, as markdown.
pub fn api_notes_tables() -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut out = String::from(
        "Answers of the API (`application/problem+json`):\n\n\
         | status | code | retryable | meaning |\n|---|---|---|---|\n",
    );
    let mut http: Vec<_> = Code::ALL
        .iter()
        .filter_map(|c| c.spec().http.map(|h| (h, c.spec())))
        .collect();
    http.sort_by_key(|(h, _)| h.status);
    for (h, spec) in http {
        out.push_str(&format!(
            "| {} | `{}` | {} | {} |\n",
            h.status,
            spec.code,
            yes_no(spec.retryable),
            h.meaning
        ));
    }
    out.push_str(
        "\nA failed job's `error.code` (its `message` is written for the patient):\n\n\
         | code | meaning | retryable |\n|---|---|---|\n",
    );
    for spec in Code::ALL.iter().map(|c| c.spec()) {
        if let Some(job) = spec.job {
            out.push_str(&format!(
                "| `{}` | {} | {} |\n",
                spec.code,
                job.meaning,
                yes_no(spec.retryable)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "<!-- error codes: generated from src/error/codes.rs -->\n";
    const END: &str = "<!-- end of error codes -->";

    #[test]
    fn every_code_is_defined_once_and_says_something() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            let spec = code.spec();
            assert!(seen.insert(spec.code), "{} twice", spec.code);
            assert!(spec.http.is_some() || spec.job.is_some(), "{}", spec.code);
            let words = (spec.job.map(|j| j.message))
                .into_iter()
                .chain(spec.http.map(|h| h.detail));
            for text in words {
                assert!(text.len() > 20 && text.ends_with('.'), "{}", spec.code);
            }
        }
        assert_eq!(seen.len(), Code::ALL.len());
    }

    #[test]
    fn the_api_notes_tables_are_generated_from_the_registry() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api-notes.md");
        let notes = std::fs::read_to_string(&path).expect("docs/api-notes.md");
        let (head, rest) = notes.split_once(BEGIN).expect("the begin marker");
        let (_, tail) = rest.split_once(END).expect("the end marker");
        let expected = format!("{head}{BEGIN}{}{END}{tail}", api_notes_tables());
        if std::env::var_os("MEDRELAY_BLESS").is_some() {
            std::fs::write(&path, &expected).unwrap();
        }
        assert!(
            notes == expected,
            "docs/api-notes.md drifted from src/error/codes.rs: run \
             MEDRELAY_BLESS=1 cargo test -p medrelay error::codes"
        );
    }
}
