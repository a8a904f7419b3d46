//! The rows the database hands back, and how job states and reasons are stored (as TEXT, the
//! same in both databases).

use crate::crypto::WrappedKey;
use crate::ids::{JobId, LeaseToken, UserId, UserPrefix};
use crate::model::{DeletionReason, JobStatus, PurgeReason};

/// A `jobs` row.
#[derive(Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: JobId,
    /// The column `user_id`: the owner's user id while the job is live; once tombstoned, the
    /// opaque user prefix instead (a tombstone keeps no user id). Read [`JobRow::user_id`].
    #[sqlx(rename = "user_id")]
    pub owner: String,
    pub user_prefix: UserPrefix,
    pub status: JobStatus,
    pub media_type: String,
    pub size_bytes: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub next_attempt_at: Option<i64>,
    pub lease_token: Option<LeaseToken>,
    pub lease_until: Option<i64>,
    pub result: Option<Vec<u8>>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub error_retryable: Option<bool>,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
    pub deleted_at: Option<i64>,
    pub deleted_reason: Option<DeletionReason>,
    pub document_kek: Option<String>,
    pub document_dek: Option<Vec<u8>>,
    pub result_kek: Option<String>,
    pub result_dek: Option<Vec<u8>>,
    pub unmanaged_at: Option<i64>,
    /// Attempts that ended with a lost lease.
    pub lost_leases: i64,
    /// The device's FCM token, sealed, until its push is sent or the job is deleted.
    pub push_token: Option<Vec<u8>>,
    pub push_kek: Option<String>,
    pub push_dek: Option<Vec<u8>>,
}

impl std::fmt::Debug for JobRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRow")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl JobRow {
    /// The owner, while the job is live (a tombstone has none).
    pub fn user_id(&self) -> Option<UserId> {
        self.deleted_at
            .is_none()
            .then(|| UserId::from_raw(self.owner.clone()))
    }

    /// The wrapped data key of the document, while the document exists.
    pub fn document_key(&self) -> Option<WrappedKey> {
        Some(WrappedKey {
            kid: self.document_kek.clone()?,
            bytes: self.document_dek.clone()?,
        })
    }

    /// The wrapped data key of the result, while the result exists.
    pub fn result_key(&self) -> Option<WrappedKey> {
        Some(WrappedKey {
            kid: self.result_kek.clone()?,
            bytes: self.result_dek.clone()?,
        })
    }

    /// The sealed push token and its wrapped data key, while the job keeps one.
    pub fn push_token(&self) -> Option<Sealed> {
        Sealed::from_columns(&self.push_token, &self.push_kek, &self.push_dek)
    }
}

/// A value sealed under a data key of its own, and that key wrapped by a master key.
#[derive(Clone)]
pub struct Sealed {
    pub sealed: Vec<u8>,
    pub key: WrappedKey,
}

impl Sealed {
    /// A sealed value from its three columns, when all are set.
    pub fn from_columns(
        sealed: &Option<Vec<u8>>,
        kek: &Option<String>,
        dek: &Option<Vec<u8>>,
    ) -> Option<Sealed> {
        Some(Sealed {
            sealed: sealed.clone()?,
            key: WrappedKey {
                kid: kek.clone()?,
                bytes: dek.clone()?,
            },
        })
    }
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A purge of one user's data, as queued by the database and recorded for audit.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PurgeRow {
    pub id: i64,
    pub user_prefix: UserPrefix,
    pub reason: PurgeReason,
    pub job_id: Option<JobId>,
    pub requested_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub jobs_purged: Option<i64>,
    pub objects_deleted: Option<i64>,
}

/// A new job, about to be committed after its document was stored.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub user_id: UserId,
    pub user_prefix: UserPrefix,
    pub media_type: &'static str,
    pub size_bytes: i64,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
    pub document_key: WrappedKey,
    /// The upload's push token, sealed (only where push is on).
    pub push_token: Option<Sealed>,
    pub now: i64,
    /// When its upload started: the job's `created_at`, from which it expires.
    pub created_at: i64,
    pub expires_at: i64,
}

/// What inserting a job did.
#[derive(Debug)]
pub enum Inserted {
    Created(Box<JobRow>),
    /// Another request with the same idempotency key won the race.
    Existing(Box<JobRow>),
}

/// Stores a Rust enum as its TEXT name in both databases. A name this version does not know
/// (written by a newer one during a rolling deploy) reads as `$fallback` with a warning, so
/// that one such row cannot stop the sweeper or the purge queue.
macro_rules! stored_as_text {
    ($($ty:ty => $fallback:expr),*) => {$(
        impl<DB: sqlx::Database> sqlx::Type<DB> for $ty
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $ty
        where
            &'static str: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut DB::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&'static str as sqlx::Encode<'q, DB>>::encode(self.as_str(), buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $ty
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&'r str as sqlx::Decode<'r, DB>>::decode(value)?;
                Ok(<$ty>::parse(text).unwrap_or_else(|| {
                    tracing::warn!(value = text, "unknown {} read as {:?}", stringify!($ty), $fallback);
                    $fallback
                }))
            }
        }
    )*};
}

// An unknown status ends nowhere new: treated as failed (never claimed, expired as usual). An
// unknown deletion reason is a deletion (404, not 410).
stored_as_text!(
    JobStatus => JobStatus::Failed,
    DeletionReason => DeletionReason::DeletedByUser,
    PurgeReason => PurgeReason::UnmanagedFailure
);
