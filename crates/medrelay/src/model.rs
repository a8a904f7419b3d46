//! The types of a job: its wire form of api.md (Job, its status and error, the extraction
//! Result) and the reasons it can end for. States and reasons are enums, stored as their
//! names (`db`) and never compared as text.
//!
//! Patient data (the Result) is printable only as JSON for the owner of the job: its `Debug`
//! prints nothing, so it cannot reach a log by accident.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::ids::JobId;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Processing,
    RetryScheduled,
    Succeeded,
    Failed,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::RetryScheduled,
        JobStatus::Succeeded,
        JobStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::RetryScheduled => "retry_scheduled",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

/// Why a job was deleted before its time: what its PHI-free tombstone says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeletionReason {
    /// The user deleted this job (`DELETE /v1/jobs/{id}`).
    DeletedByUser,
    /// The user deleted all of their data (`DELETE /v1/me/data`).
    AllDataDeletedByUser,
    /// An operator ran `medrelay purge-user`.
    Operator,
    /// Its lifetime (`MEDRELAY_TEMP_TTL`) was over.
    Expired,
}

impl DeletionReason {
    pub const ALL: [DeletionReason; 4] = [
        DeletionReason::DeletedByUser,
        DeletionReason::AllDataDeletedByUser,
        DeletionReason::Operator,
        DeletionReason::Expired,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionReason::DeletedByUser => "deleted",
            DeletionReason::AllDataDeletedByUser => "client",
            DeletionReason::Operator => "operator",
            DeletionReason::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The `reason` label of `medrelay_deletions_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            DeletionReason::DeletedByUser | DeletionReason::AllDataDeletedByUser => "client",
            DeletionReason::Operator => "operator",
            DeletionReason::Expired => "expired",
        }
    }
}

/// Why the database queued a purge of a user (the trigger writes the name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurgeReason {
    /// A job of the user failed in a way nobody planned for.
    UnmanagedFailure,
}

impl PurgeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PurgeReason::UnmanagedFailure => "unmanaged-failure",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [PurgeReason::UnmanagedFailure]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// Why a job failed, in words for the patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Stable kebab-case code for the app to branch on.
    pub code: String,
    /// A friendly message that suggests what to do.
    pub message: String,
    /// Whether uploading the document again may succeed.
    pub retryable: bool,
}

/// A processing job, as the app sees it.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    #[schema(value_type = String)]
    pub id: JobId,
    pub status: JobStatus,
    pub media_type: String,
    pub size_bytes: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    pub result: Option<DocumentResult>,
    pub error: Option<JobError>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// The extraction result. Unknown values are `null` or empty lists, never invented.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DocumentResult {
    pub processor: ProcessorInfo,
    pub document: DocumentInfo,
    pub summary: Option<String>,
    pub patient: PatientInfo,
    pub providers: Vec<Provider>,
    pub diagnoses: Vec<Diagnosis>,
    pub medications: Vec<Medication>,
    pub lab_results: Vec<LabResult>,
    pub allergies: Vec<Allergy>,
    pub procedures: Vec<Procedure>,
    pub follow_up: Vec<String>,
    /// Full extracted text, where the processor produced it.
    pub text: Option<String>,
}

impl fmt::Debug for DocumentResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DocumentResult([patient data redacted])")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProcessorInfo {
    pub name: String,
    pub model: Option<String>,
}

/// `document.type` values of api.md.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DocumentType {
    LabReport,
    Prescription,
    DischargeSummary,
    ImagingReport,
    VisitNote,
    Referral,
    VaccinationRecord,
    Insurance,
    Invoice,
    #[default]
    Other,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DocumentInfo {
    #[serde(rename = "type")]
    pub kind: DocumentType,
    pub title: Option<String>,
    /// `YYYY-MM-DD`.
    pub date: Option<String>,
    pub language: Option<String>,
    pub page_count: Option<u32>,
    /// The media type decided from the bytes (an extension of api.md).
    pub media_type: Option<String>,
    /// Pixel size of a photo (an extension of api.md); `null` for PDFs.
    pub pixel_width: Option<u32>,
    pub pixel_height: Option<u32>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PatientInfo {
    pub name: Option<String>,
    pub date_of_birth: Option<String>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Provider {
    pub name: Option<String>,
    pub role: Option<String>,
    pub organization: Option<String>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Diagnosis {
    pub description: String,
    pub code: Option<String>,
    pub code_system: Option<String>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Medication {
    pub name: String,
    pub dose: Option<String>,
    pub frequency: Option<String>,
    pub route: Option<String>,
    pub instructions: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabFlag {
    Low,
    Normal,
    High,
    Abnormal,
    Critical,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LabResult {
    pub test: String,
    pub value: Option<String>,
    pub unit: Option<String>,
    pub reference_range: Option<String>,
    pub flag: Option<LabFlag>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Allergy {
    pub substance: String,
    pub reaction: Option<String>,
}

#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Procedure {
    pub name: String,
    pub date: Option<String>,
}
