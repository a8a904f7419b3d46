//! Accepting a document: it is sealed as it streams in (a fresh data key per document, the
//! key stored only wrapped), written to the store, and only then is its job committed. No
//! 202 without both; no object without a row; a refused upload leaves nothing behind.

use bytes::Bytes;
use object_store::path::Path;

use super::{Error, Lifecycle};
use crate::clock::{millis, now_millis};
use crate::crypto::{SealingStream, WrappedKey};
use crate::db::{DbError, InsertCaps, Inserted, NewJob, Sealed, Usage};
use crate::ids::{JobId, UserId, UserPrefix};
use crate::model::Job;
use crate::processor::MediaType;
use crate::push::PushToken;
use crate::store::{ObjectWriter, Store};

/// A document being received: every pushed byte is sealed and on its way to the store.
pub struct Incoming {
    lifecycle: Lifecycle,
    user: UserId,
    prefix: UserPrefix,
    id: JobId,
    media_type: MediaType,
    path: Path,
    sealer: SealingStream,
    writer: ObjectWriter,
    key: WrappedKey,
    size: u64,
    /// When the upload started (unix ms): the job expires one TTL after it.
    started: i64,
    /// The device's push token, sealed (only where push is configured).
    push: Option<Sealed>,
}

impl Lifecycle {
    /// Starts receiving a document of `user`, whose type was decided from its first bytes, in
    /// an upload that started at `started` (unix ms): no byte of it outlives `started` + TTL.
    pub fn accept(
        &self,
        user: &UserId,
        media_type: MediaType,
        started: i64,
    ) -> Result<Incoming, Error> {
        self.accept_as(user, media_type, started, JobId::new())
    }

    /// [`Lifecycle::accept`] for a job whose id was given before its first byte (a resumable
    /// upload's: the upload's id is its job's).
    pub(super) fn accept_as(
        &self,
        user: &UserId,
        media_type: MediaType,
        started: i64,
        id: JobId,
    ) -> Result<Incoming, Error> {
        let prefix = self.user_prefix(user);
        // Encrypted before a byte leaves the process.
        let (key, wrapped) = self
            .new_document_key(&prefix, &id)
            .map_err(Error::Internal)?;
        let sealer = self
            .document_sealer(&key, &prefix, &id)
            .map_err(Error::Internal)?;
        drop(key);
        let path = Store::document_key(&prefix, &id);
        let writer = self.store().writer(&path);
        Ok(Incoming {
            lifecycle: self.clone(),
            user: user.clone(),
            prefix,
            id,
            media_type,
            path,
            sealer,
            writer,
            key: wrapped,
            size: 0,
            started,
            push: None,
        })
    }
}

impl Incoming {
    /// Seals and writes the next bytes of the document.
    pub async fn push(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.size += chunk.len() as u64;
        let parts = self.sealer.push(chunk).map_err(Error::Internal)?;
        self.write(parts).await
    }

    /// Keeps the device's push token with the job, sealed at once, where push notifications
    /// are configured; elsewhere it is dropped here and nothing of it is kept.
    pub fn keep_push_token(&mut self, token: PushToken) -> Result<(), Error> {
        if self.lifecycle.pushes() {
            let sealed = self
                .lifecycle
                .seal_push_token(&self.prefix, &self.id, &token)
                .map_err(Error::Internal)?;
            self.push = Some(sealed);
        }
        Ok(())
    }

    /// Keeps a push token already sealed for this job (a resumable upload's).
    pub(super) fn keep_sealed_push_token(&mut self, sealed: Sealed) {
        if self.lifecycle.pushes() {
            self.push = Some(sealed);
        }
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    async fn write(&mut self, parts: Vec<Bytes>) -> Result<(), Error> {
        for part in parts {
            self.writer.write(part).await.map_err(Error::Unavailable)?;
        }
        Ok(())
    }

    /// Refuses the upload: whatever was written is removed.
    pub async fn abort(self) {
        self.writer.abort().await;
    }

    /// Finishes the object, then commits its job (idempotently, with `idempotency_key`: a
    /// request that lost the race to a twin gets the twin's job, and its copy is removed) if
    /// the user's limits leave room under `caps`, checked by the insert itself with the user
    /// locked (which also deletes `own_slot`, the upload's slot if it held one). Refused: the
    /// object is removed, and `refused` says why from the usage the insert saw.
    pub async fn commit<E>(
        self,
        idempotency_key: Option<String>,
        own_slot: Option<&str>,
        caps: InsertCaps,
        refused: impl FnOnce(&Usage) -> E,
    ) -> Result<std::result::Result<Job, E>, Error> {
        let last = match self.sealer.finish() {
            Ok(last) => last,
            Err(e) => {
                self.writer.abort().await;
                return Err(Error::Internal(e));
            }
        };
        // `finish` consumed the sealer: what is left to do is write and commit.
        let Incoming {
            lifecycle,
            user,
            prefix,
            id,
            media_type,
            path,
            mut writer,
            key,
            size,
            started,
            push,
            ..
        } = self;
        let written = async {
            for part in last {
                writer.write(part).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = written {
            writer.abort().await;
            return Err(Error::Unavailable(e));
        }
        writer.finish().await.map_err(Error::Unavailable)?;

        let now = now_millis();
        let new_job = NewJob {
            id,
            user_id: user,
            user_prefix: prefix,
            media_type: media_type.as_str(),
            size_bytes: size as i64,
            max_attempts: lifecycle.rules().max_attempts(),
            idempotency_key,
            document_key: key,
            push_token: push,
            now,
            // The TTL counts from the upload's first byte, not from its commit.
            created_at: started,
            expires_at: started + millis(lifecycle.rules().temp_ttl),
        };
        let inserted = match lifecycle
            .db()
            .insert_job_admitted(&new_job, own_slot, caps, refused)
            .await
        {
            Ok(Ok(inserted)) => inserted,
            Ok(Err(refused)) => {
                lifecycle.discard(&path).await;
                return Ok(Err(refused));
            }
            // The id is taken: a resumable upload's job committed by another request. Its
            // document is at this key; it is not ours to delete.
            Err(e @ DbError::Conflict(_)) if new_job.idempotency_key.is_none() => {
                return Err(e.into());
            }
            Err(e) => {
                // No 202 without a committed row, and no object without a row.
                lifecycle.discard(&path).await;
                return Err(e.into());
            }
        };
        match inserted {
            Inserted::Created(row) => {
                metrics::counter!("medrelay_upload_bytes_total").increment(size);
                metrics::counter!("medrelay_uploads_total", "media_type" => media_type.as_str())
                    .increment(1);
                tracing::info!(job_id = %row.id, size, media_type = media_type.as_str(), "document accepted");
                lifecycle.wake_worker();
                lifecycle.view(&row).map(Ok)
            }
            Inserted::Existing(row) => {
                lifecycle.discard(&path).await;
                lifecycle.view(&row).map(Ok)
            }
        }
    }
}

impl Lifecycle {
    /// Removes the object of an upload that will not become a job.
    async fn discard(&self, path: &Path) {
        if let Err(e) = self.store().delete(path).await {
            super::log_repairable("removing a refused upload", &e);
        }
    }
}
