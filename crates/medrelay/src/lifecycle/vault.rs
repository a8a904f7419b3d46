//! Sealing and opening: a document as it streams in, the document for its attempt, the
//! result for its owner. Every ciphertext is bound to its user prefix, job and kind, so a
//! ciphertext moved to another job fails to open. Opening fails closed: no plaintext leaves
//! unless every segment authenticated.

use bytes::Bytes;
use zeroize::Zeroizing;

use super::{Claimed, Lifecycle};
use crate::crypto::{self, Binding, DataKey, IntegrityError, WrappedKey};
use crate::db::{JobRow, Sealed, UploadRow};
use crate::ids::{JobId, UserPrefix};
use crate::model::DocumentResult;
use crate::processor::{Document, MediaType, ProcessError, Refusal};
use crate::push::PushToken;
use crate::store::{ObjectKind, Store};

/// What `Binding::kind` says for a result (kept in the job row, not the store).
const RESULT_KIND: &str = "result";
/// What `Binding::kind` says for a device's push token (kept in the job row).
const PUSH_TOKEN_KIND: &str = "push-token";
/// What `Binding::kind` says for the parts of a resumable upload (each part is sealed under a
/// key derived from the upload's data key and the part's name, which says where it starts).
const UPLOAD_PART_KIND: &str = "upload-part";

fn binding<'a>(prefix: &'a UserPrefix, job: &'a JobId, kind: &'a str) -> Binding<'a> {
    Binding {
        user_prefix: prefix.as_str(),
        job_id: job.as_str(),
        kind,
    }
}

impl Lifecycle {
    /// A fresh data key for a new document, and its wrapped form for the job row.
    pub(super) fn new_document_key(
        &self,
        prefix: &UserPrefix,
        job: &JobId,
    ) -> anyhow::Result<(DataKey, WrappedKey)> {
        let kind = ObjectKind::Document.name();
        self.inner.keyring.new_data_key(&binding(prefix, job, kind))
    }

    /// The stream cipher for a new document's bytes.
    pub(super) fn document_sealer(
        &self,
        key: &DataKey,
        prefix: &UserPrefix,
        job: &JobId,
    ) -> anyhow::Result<crypto::SealingStream> {
        let kind = ObjectKind::Document.name();
        crypto::SealingStream::new(key, &binding(prefix, job, kind))
    }

    /// Reads and opens a claimed job's document (fails closed). A missing object is an
    /// ordinary failure (a delete raced the upload); a failed integrity check is unmanaged.
    pub async fn document(&self, job: &Claimed) -> Result<Document, ProcessError> {
        let row = &job.row;
        let media_type = MediaType::parse(&row.media_type).ok_or_else(|| {
            ProcessError::Unmanaged(anyhow::anyhow!("job has an unknown media type"))
        })?;
        let wrapped = row.document_key().ok_or_else(|| {
            ProcessError::Unmanaged(anyhow::anyhow!("the job's document key is missing"))
        })?;
        // Before reading the object: an instance without the key reads nothing.
        if !self.inner.keyring.knows(&wrapped.kid) {
            return Err(ProcessError::KeyMissing { kid: wrapped.kid });
        }
        let path = Store::document_key(&row.user_prefix, &row.id);
        let bytes = match self.inner.store.read(&path).await {
            Ok(bytes) => bytes,
            // A delete of the user's data can race an upload's commit: an ordinary failure,
            // not a reason to purge everything of the user.
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ProcessError::Abort(Refusal::Missing));
            }
            Err(e) => {
                return Err(ProcessError::Retry {
                    reason: format!("reading the document: {e}"),
                    retry_after: None,
                });
            }
        };
        let kind = ObjectKind::Document.name();
        let binding = binding(&row.user_prefix, &row.id, kind);

        let plaintext = self
            .inner
            .keyring
            .unwrap_key(&wrapped, &binding)
            .and_then(|key| crypto::open(&key, &binding, &bytes))
            .map_err(|e| ProcessError::Unmanaged(e.into()))?;
        drop(bytes);
        Ok(Document {
            media_type,
            bytes: Bytes::from(plaintext.to_vec()),
        })
    }

    /// Seals a result under a fresh data key bound to its job.
    pub(super) fn seal_result(
        &self,
        row: &JobRow,
        result: &DocumentResult,
    ) -> anyhow::Result<Sealed> {
        let json = Zeroizing::new(serde_json::to_vec(result)?);
        let binding = binding(&row.user_prefix, &row.id, RESULT_KIND);
        let (key, wrapped) = self.inner.keyring.new_data_key(&binding)?;
        let sealed = crypto::seal(&key, &binding, &json)?;
        Ok(Sealed {
            sealed,
            key: wrapped,
        })
    }

    /// Opens a stored result; `None` when the row holds none. `Err(Ok(kid))`: its master
    /// key is not configured here (a configuration problem); `Err(Err(_))`: it does not
    /// authenticate (tampering).
    pub(super) fn open_result(
        &self,
        row: &JobRow,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Result<String, IntegrityError>> {
        let (Some(sealed), Some(wrapped)) = (&row.result, row.result_key()) else {
            return Ok(None);
        };
        if !self.inner.keyring.knows(&wrapped.kid) {
            return Err(Ok(wrapped.kid));
        }
        self.open_known_result(row, sealed, &wrapped).map_err(Err)
    }

    fn open_known_result(
        &self,
        row: &JobRow,
        sealed: &[u8],
        wrapped: &WrappedKey,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, IntegrityError> {
        let binding = binding(&row.user_prefix, &row.id, RESULT_KIND);
        let key = self.inner.keyring.unwrap_key(wrapped, &binding)?;
        crypto::open(&key, &binding, sealed).map(Some)
    }

    /// Seals a device's push token under a fresh data key bound to its job.
    pub(super) fn seal_push_token(
        &self,
        prefix: &UserPrefix,
        job: &JobId,
        token: &PushToken,
    ) -> anyhow::Result<Sealed> {
        let binding = binding(prefix, job, PUSH_TOKEN_KIND);
        let (key, wrapped) = self.inner.keyring.new_data_key(&binding)?;
        let sealed = crypto::seal(&key, &binding, token.expose().as_bytes())?;
        Ok(Sealed {
            sealed,
            key: wrapped,
        })
    }

    /// Opens a job's sealed push token (fails closed). `Err(Ok(kid))`: its master key is not
    /// configured here (a configuration problem); `Err(Err(_))`: it does not authenticate
    /// (tampering).
    pub(super) fn open_push_token(
        &self,
        row: &JobRow,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, Result<String, IntegrityError>> {
        if !self.inner.keyring.knows(&sealed.key.kid) {
            return Err(Ok(sealed.key.kid.clone()));
        }
        let binding = binding(&row.user_prefix, &row.id, PUSH_TOKEN_KIND);
        let key = self
            .inner
            .keyring
            .unwrap_key(&sealed.key, &binding)
            .map_err(Err)?;
        crypto::open(&key, &binding, &sealed.sealed).map_err(Err)
    }

    /// A fresh data key for a new resumable upload's parts, and its wrapped form.
    pub(super) fn new_upload_key(
        &self,
        prefix: &UserPrefix,
        id: &JobId,
    ) -> anyhow::Result<(DataKey, WrappedKey)> {
        self.inner
            .keyring
            .new_data_key(&binding(prefix, id, UPLOAD_PART_KIND))
    }

    /// The data key of an upload's parts. `Err(Ok(kid))`: its master key is not configured
    /// here; `Err(Err(_))`: it does not authenticate.
    pub(super) fn upload_key(
        &self,
        row: &UploadRow,
    ) -> Result<DataKey, Result<String, IntegrityError>> {
        let wrapped = row.part_key();
        if !self.inner.keyring.knows(&wrapped.kid) {
            return Err(Ok(wrapped.kid));
        }
        self.inner
            .keyring
            .unwrap_key(
                &wrapped,
                &binding(&row.user_prefix, &row.id, UPLOAD_PART_KIND),
            )
            .map_err(Err)
    }

    /// The stream cipher of one part of an upload, under a key of that part's own.
    pub(super) fn part_sealer(
        &self,
        key: &DataKey,
        prefix: &UserPrefix,
        id: &JobId,
        name: &str,
    ) -> anyhow::Result<crypto::SealingStream> {
        let part_key = key.derive(name.as_bytes())?;
        crypto::SealingStream::new(&part_key, &binding(prefix, id, UPLOAD_PART_KIND))
    }

    /// Opens one part of an upload (fails closed: a part moved to another place or upload,
    /// truncated or altered does not open).
    pub(super) fn open_part(
        &self,
        key: &DataKey,
        row: &UploadRow,
        name: &str,
        sealed: &[u8],
    ) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let part_key = key.derive(name.as_bytes())?;
        let binding = binding(&row.user_prefix, &row.id, UPLOAD_PART_KIND);
        Ok(crypto::open(&part_key, &binding, sealed)?)
    }
}
