//! Resumable uploads (tus 1.0): an upload is created with its length, receives its bytes in
//! any number of requests, and becomes its job (same id) when the last byte arrives. The
//! rules of `POST /v1/documents` hold: the type is decided from the first bytes (a refused
//! type terminates the upload at the request that tells), the size is bounded, the limits are
//! checked at the job's insert, and no byte outlives the upload's creation + TTL.
//!
//! Every byte is sealed as it arrives. A request's bytes become one or more *parts*: each part
//! is a sealed object of its own (at most [`PART_MAX`] plaintext bytes, so at most one S3 PUT,
//! and at most that much plaintext in memory when it is opened again), under a key derived from
//! the upload's data key and the part's name; the name says where the part starts. Nothing of
//! a request is kept between requests but sealed parts in the store and their names and the
//! offset in the database (`uploads`), so any instance resumes an upload, after any restart.
//! Appends commit by compare-and-set on the offset. When the last byte arrives, the parts are
//! opened in order and sealed again into the job's one document object, by the same
//! [`Incoming`](super::Incoming) as a `POST`, and the job is committed; then the upload's row
//! and parts go. See `docs/adr/0012-resumable-uploads.md`.

use std::time::Duration;

use aws_lc_rs::digest;
use zeroize::Zeroizing;

use super::{Error, Incoming, Lifecycle, log_repairable};
use crate::clock::{millis, now_millis};
use crate::crypto::{self, DataKey, SealingStream};
use crate::db::{Append, InsertCaps, NewUpload, UploadRow, Usage};
use crate::ids::{JobId, UserId, UserPrefix};
use crate::model::Job;
use crate::processor::sniff::SNIFF_LEN;
use crate::processor::{MediaType, Sniffed, admit};
use crate::push::PushToken;
use crate::store::{ObjectWriter, Store};

/// The most plaintext one part holds: under S3's 5 MiB part minimum once sealed, so a part is
/// one PUT, and what completing an upload holds in memory at once.
pub const PART_MAX: usize = 4 * 1024 * 1024;
/// The most parts one upload may have (a client sending tiny chunks is stopped here).
pub const MAX_PARTS: i64 = 4096;
/// While an upload's type is not decided, at most this many parts (each request re-reads the
/// earlier ones to decide it): a client must send the first 1 KiB in a few requests.
const MAX_UNDECIDED_PARTS: i64 = 16;
/// The right to turn a finished upload into its job lapses this long after its last renewal
/// (a crashed instance blocks the upload for at most this long).
const COMPLETION_LEASE: Duration = Duration::from_secs(30);
/// How often a completing request renews that right.
const COMPLETION_RENEW: Duration = Duration::from_secs(10);

/// Why an upload request cannot go on, as the tus answer says it.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// No such upload of this user (never created, terminated, another user's, or expired and
    /// swept).
    #[error("no such upload")]
    NotFound,
    /// Past its lifetime, not yet swept.
    #[error("the upload expired")]
    Expired,
    /// The request's offset is not the upload's.
    #[error("the offset does not match")]
    OffsetMismatch { current: i64 },
    /// Another request is turning the upload into its job.
    #[error("the upload is being completed")]
    Busy,
    /// More bytes than the upload's length.
    #[error("more bytes than the upload's length")]
    BeyondLength,
    /// The type is refused: the upload was terminated.
    #[error("the document type is refused")]
    Refused(Sniffed),
    /// The request's checksum did not match its bytes: they were discarded.
    #[error("the checksum does not match")]
    ChecksumMismatch,
    /// The request was cut off before its bytes could be checked against its checksum: they
    /// were discarded.
    #[error("the request was interrupted before its checksum could be checked")]
    Interrupted,
    /// Too many parts: the client sends chunks too small.
    #[error("too many parts")]
    TooManyParts,
    /// The upload became its job already.
    #[error("the upload is complete")]
    Completed { job: JobId, length: i64 },
    #[error(transparent)]
    Lifecycle(#[from] Error),
}

impl From<crate::db::DbError> for UploadError {
    fn from(e: crate::db::DbError) -> Self {
        UploadError::Lifecycle(e.into())
    }
}

/// What a `HEAD` shows of an upload.
#[derive(Debug)]
pub enum UploadState {
    Open(Box<UploadRow>),
    /// It became this job (whose document had this many bytes).
    Completed {
        job: JobId,
        length: i64,
    },
}

/// A checksum the client sent for one request's bytes.
pub struct Checksum {
    context: digest::Context,
    expected: Vec<u8>,
}

impl Checksum {
    /// `sha1` or `sha256` (lowercase, as tus names them) and the expected digest.
    pub fn new(algorithm: &str, expected: Vec<u8>) -> Option<Checksum> {
        let algorithm = match algorithm {
            "sha256" => &digest::SHA256,
            "sha1" => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            _ => return None,
        };
        Some(Checksum {
            context: digest::Context::new(algorithm),
            expected,
        })
    }

    /// The algorithms a client may use.
    pub const ALGORITHMS: &'static str = "sha1,sha256";
}

impl Lifecycle {
    /// Creates an upload of `length` bytes for `user`, keeping the device's push token sealed
    /// with it where push is configured. Its id is the id of the job it will become.
    pub async fn create_upload(
        &self,
        user: &UserId,
        length: u64,
        push: Option<PushToken>,
    ) -> Result<UploadRow, Error> {
        let id = JobId::new();
        let prefix = self.user_prefix(user);
        let (_key, wrapped) = self.new_upload_key(&prefix, &id).map_err(Error::Internal)?;
        let push = match push {
            Some(token) if self.pushes() => Some(
                self.seal_push_token(&prefix, &id, &token)
                    .map_err(Error::Internal)?,
            ),
            _ => None,
        };
        let now = now_millis();
        // The sweeper deletes objects that would pass the TTL before its next round; an upload
        // ends before its first part can be among them.
        let ttl = millis(self.rules().temp_ttl);
        let margin = millis(self.rules().sweep_interval).min(ttl / 12);
        let expires_at = now + ttl - margin;
        self.db()
            .insert_upload(&NewUpload {
                id: &id,
                user_id: user,
                user_prefix: &prefix,
                length: length as i64,
                part_key: &wrapped,
                push_token: push.as_ref(),
                now,
                expires_at,
            })
            .await?;
        metrics::counter!("medrelay_resumable_uploads_total", "event" => "created").increment(1);
        Ok(UploadRow {
            id,
            user_id: user.clone(),
            user_prefix: prefix,
            length: length as i64,
            upload_offset: 0,
            parts: String::new(),
            part_count: 0,
            media_type: None,
            part_kek: wrapped.kid,
            part_dek: wrapped.bytes,
            push_token: push.as_ref().map(|s| s.sealed.clone()),
            push_kek: push.as_ref().map(|s| s.key.kid.clone()),
            push_dek: push.map(|s| s.key.bytes),
            completing_until: None,
            completing_token: None,
            created_at: now,
            updated_at: now,
            expires_at,
        })
    }

    /// Where an upload of this user stands (`HEAD`).
    pub async fn upload_state(
        &self,
        user: &UserId,
        id: &JobId,
    ) -> Result<UploadState, UploadError> {
        let row = self.db().get_upload(user, id).await?;
        // A job with this id means the upload was completed (its row may linger after a crash
        // between the job's commit and the row's removal: it is removed now).
        if let Some(job) = self
            .db()
            .get_job_or_tombstone(user, &self.user_prefix(user), id)
            .await?
        {
            if let Some(row) = row {
                self.forget_completed_upload(&row).await;
            }
            if job.deleted_at.is_some() {
                return Err(UploadError::NotFound);
            }
            return Ok(UploadState::Completed {
                job: job.id,
                length: job.size_bytes,
            });
        }
        match row {
            None => Err(UploadError::NotFound),
            Some(row) if row.expires_at <= now_millis() => Err(UploadError::Expired),
            Some(row) => Ok(UploadState::Open(Box::new(row))),
        }
    }

    /// Starts appending to an upload of this user at `offset` (`PATCH`).
    pub async fn append_to_upload(
        &self,
        user: &UserId,
        id: &JobId,
        offset: i64,
        checksum: Option<Checksum>,
    ) -> Result<Appending, UploadError> {
        let row = match self.upload_state(user, id).await? {
            UploadState::Open(row) => *row,
            UploadState::Completed { job, length } => {
                return Err(UploadError::Completed { job, length });
            }
        };
        if row.upload_offset != offset {
            return Err(UploadError::OffsetMismatch {
                current: row.upload_offset,
            });
        }
        if row
            .completing_until
            .is_some_and(|until| until >= now_millis())
        {
            return Err(UploadError::Busy);
        }
        if row.media_type.is_none() && row.part_count >= MAX_UNDECIDED_PARTS {
            return Err(UploadError::TooManyParts);
        }
        let key = self.upload_key(&row).map_err(|e| match e {
            Ok(kid) => {
                super::key_missing(&kid, "an upload cannot be resumed");
                Error::Unavailable(anyhow::anyhow!("the upload's master key is not configured"))
            }
            Err(e) => Error::Internal(e.into()),
        })?;
        // While the type is not decided, its first bytes are read back (at most SNIFF_LEN) so
        // that the request that completes them decides it.
        let head = if row.media_type.is_none() {
            Some(self.read_upload(&key, &row, SNIFF_LEN).await?)
        } else {
            None
        };
        let media_type = row.media_type.as_deref().and_then(MediaType::parse);
        Ok(Appending {
            lifecycle: self.clone(),
            row,
            key,
            received: 0,
            current: None,
            sealed: Vec::new(),
            head,
            media_type,
            refused: None,
            checksum,
        })
    }

    /// Reads back the plaintext of an upload's parts, up to `max` bytes.
    async fn read_upload(
        &self,
        key: &DataKey,
        row: &UploadRow,
        max: usize,
    ) -> Result<Zeroizing<Vec<u8>>, UploadError> {
        let mut out = Zeroizing::new(Vec::new());
        for name in row.part_names() {
            if out.len() >= max {
                break;
            }
            let plaintext = self.read_part(key, row, name).await?;
            let take = (max - out.len()).min(plaintext.len());
            out.extend_from_slice(&plaintext[..take]);
        }
        Ok(out)
    }

    /// Reads and opens one part (fails closed).
    async fn read_part(
        &self,
        key: &DataKey,
        row: &UploadRow,
        name: &str,
    ) -> Result<Zeroizing<Vec<u8>>, UploadError> {
        let path = Store::part_key(&row.user_prefix, &row.id, name);
        let sealed = match self.store().read(&path).await {
            Ok(bytes) => bytes,
            // Swept or deleted meanwhile: the upload cannot be completed any more.
            Err(object_store::Error::NotFound { .. }) => return Err(UploadError::NotFound),
            Err(e) => return Err(Error::Unavailable(e.into()).into()),
        };
        self.open_part(key, row, name, &sealed)
            .map_err(|e| UploadError::Lifecycle(Error::Internal(e)))
    }

    /// Terminates an upload of this user (`DELETE`): its row and every part go now.
    pub async fn terminate_upload(&self, user: &UserId, id: &JobId) -> Result<(), UploadError> {
        match self.upload_state(user, id).await {
            Ok(UploadState::Open(_)) | Err(UploadError::Expired) => {}
            Ok(UploadState::Completed { .. }) => return Err(UploadError::NotFound),
            Err(e) => return Err(e),
        }
        let Some(row) = self.db().delete_idle_upload(id, now_millis()).await? else {
            // Still there: a request is turning it into its job.
            return Err(match self.db().get_upload(user, id).await? {
                Some(_) => UploadError::Busy,
                None => UploadError::NotFound,
            });
        };
        self.forget_upload_parts(&row)
            .await
            .map_err(Error::Unavailable)?;
        metrics::counter!("medrelay_resumable_uploads_total", "event" => "terminated").increment(1);
        Ok(())
    }

    /// Removes every upload past its lifetime, with its parts. Returns how many.
    pub async fn expire_uploads(&self, now: i64) -> Result<u64, Error> {
        let mut expired = 0;
        loop {
            let rows = self.db().expired_uploads(now, 500).await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                if let Some(row) = self.db().delete_upload(&row.id).await? {
                    if let Err(e) = self.forget_upload_parts(&row).await {
                        log_repairable("deleting an expired upload's parts", &e);
                    }
                    expired += 1;
                }
            }
        }
        if expired > 0 {
            metrics::counter!("medrelay_resumable_uploads_total", "event" => "expired")
                .increment(expired);
            metrics::counter!("medrelay_deletions_total", "reason" => "upload-expired")
                .increment(expired);
            tracing::info!(expired, "expired resumable uploads deleted");
        }
        Ok(expired)
    }

    /// After an upload's row is gone: deletes its parts, and whatever else lies under its id
    /// unless its job exists (parts of requests that lost a race or died with an instance).
    async fn forget_upload_parts(&self, row: &UploadRow) -> anyhow::Result<()> {
        let job = self.db().get_job_by_id(&row.id).await?;
        if job.is_none() {
            self.store()
                .delete_prefix(&Store::job_prefix(&row.user_prefix, &row.id))
                .await?;
            return Ok(());
        }
        for name in row.part_names() {
            let path = Store::part_key(&row.user_prefix, &row.id, name);
            self.store().delete(&path).await?;
        }
        Ok(())
    }

    /// Removes the row and parts of an upload whose job was committed.
    async fn forget_completed_upload(&self, row: &UploadRow) {
        let removed = async {
            // The row as given: a completing request's own parts are in it, not in the table.
            self.db().delete_upload(&row.id).await?;
            self.forget_upload_parts(row).await?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = removed {
            log_repairable("removing a completed upload's parts", &e);
        }
    }

    /// Deletes the rows of every upload of a user, whose objects go with the user's prefix.
    pub(super) async fn forget_uploads_of(&self, prefix: &UserPrefix) -> Result<u64, Error> {
        Ok(self.db().delete_uploads_of(prefix).await?.len() as u64)
    }

    /// Deletes parts this request wrote that will not be used.
    async fn discard_parts(&self, row: &UploadRow, names: &[String]) {
        for name in names {
            let path = Store::part_key(&row.user_prefix, &row.id, name);
            if let Err(e) = self.store().delete(&path).await {
                log_repairable("removing an unused upload part", &e);
            }
        }
    }
}

/// One part being written.
struct PartWriter {
    name: String,
    sealer: SealingStream,
    writer: ObjectWriter,
    size: usize,
}

/// A request appending to an upload: every byte is sealed into a part as it arrives.
pub struct Appending {
    lifecycle: Lifecycle,
    row: UploadRow,
    key: DataKey,
    received: u64,
    current: Option<PartWriter>,
    /// Parts of this request already written, in order.
    sealed: Vec<String>,
    /// The upload's first bytes while its type is not decided.
    head: Option<Zeroizing<Vec<u8>>>,
    media_type: Option<MediaType>,
    /// The type was refused, but the request carries a checksum: the refusal stands only if
    /// its bytes arrived intact.
    refused: Option<Sniffed>,
    checksum: Option<Checksum>,
}

impl std::fmt::Debug for Appending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appending")
            .field("upload", &self.row.id)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Appending {
    /// The upload.
    pub fn upload(&self) -> &UploadRow {
        &self.row
    }

    /// Where the upload would stand with this request's bytes.
    pub fn offset(&self) -> i64 {
        self.row.upload_offset + self.received as i64
    }

    /// Whether this request's bytes complete the upload.
    pub fn completes(&self) -> bool {
        self.offset() == self.row.length
    }

    /// Seals and writes the next bytes of this request. On an error the caller calls
    /// [`Appending::abandon`] (or [`Appending::refuse`] for [`UploadError::Refused`]).
    pub async fn push(&mut self, mut chunk: &[u8]) -> Result<(), UploadError> {
        if self.offset() + chunk.len() as i64 > self.row.length {
            return Err(UploadError::BeyondLength);
        }
        self.received += chunk.len() as u64;
        if let Some(checksum) = &mut self.checksum {
            checksum.context.update(chunk);
        }
        if let Some(head) = &mut self.head {
            let take = (SNIFF_LEN - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() >= SNIFF_LEN || self.completes() {
                self.decide()?;
            }
        }
        if self.refused.is_some() {
            // Only hashed from here on: nothing more of a refused upload is stored.
            return Ok(());
        }
        while !chunk.is_empty() {
            if self.current.as_ref().is_some_and(|p| p.size == PART_MAX) {
                self.close_part().await?;
            }
            let part = match &mut self.current {
                Some(part) => part,
                None => self.current.insert(self.open_part()?),
            };
            let take = (PART_MAX - part.size).min(chunk.len());
            part.size += take;
            let sealed = part
                .sealer
                .push(&chunk[..take])
                .map_err(|e| UploadError::Lifecycle(Error::Internal(e)))?;
            for bytes in sealed {
                part.writer
                    .write(bytes)
                    .await
                    .map_err(|e| UploadError::Lifecycle(Error::Unavailable(e)))?;
            }
            chunk = &chunk[take..];
        }
        Ok(())
    }

    /// Decides the type from the first bytes.
    fn decide(&mut self) -> Result<(), UploadError> {
        let Some(head) = self.head.take() else {
            return Ok(());
        };
        match admit(&head, self.lifecycle.rules().heic) {
            Sniffed::Accepted(media_type) => {
                self.media_type = Some(media_type);
                Ok(())
            }
            // A damaged chunk must not end a good upload: with a checksum, the refusal waits
            // for it.
            refused if self.checksum.is_some() => {
                self.refused = Some(refused);
                Ok(())
            }
            refused => Err(UploadError::Refused(refused)),
        }
    }

    fn open_part(&self) -> Result<PartWriter, UploadError> {
        let start = self.offset() as u64;
        let name = format!("{start:012x}-{}", random_hex(4)?);
        let lifecycle = &self.lifecycle;
        let sealer = lifecycle
            .part_sealer(&self.key, &self.row.user_prefix, &self.row.id, &name)
            .map_err(Error::Internal)?;
        let path = Store::part_key(&self.row.user_prefix, &self.row.id, &name);
        Ok(PartWriter {
            name,
            sealer,
            writer: lifecycle.store().writer(&path),
            size: 0,
        })
    }

    /// Seals the last segment of the current part and finishes its object.
    async fn close_part(&mut self) -> Result<(), UploadError> {
        let Some(part) = self.current.take() else {
            return Ok(());
        };
        let PartWriter {
            name,
            sealer,
            mut writer,
            ..
        } = part;
        let written = async {
            for bytes in sealer.finish()? {
                writer.write(bytes).await?;
            }
            writer.finish().await
        }
        .await;
        // Named before its end is known to have succeeded: a failure removes it with the rest.
        self.sealed.push(name);
        written.map_err(|e| UploadError::Lifecycle(Error::Unavailable(e)))
    }

    /// Ends this request after `error`: a refused type terminates the upload, anything else
    /// leaves it where it was.
    pub async fn give_up(self, error: &UploadError) {
        if matches!(error, UploadError::Refused(_)) {
            self.refuse().await
        } else {
            self.abandon().await
        }
    }

    /// Gives up this request: whatever it wrote goes; the upload stays where it was.
    pub async fn abandon(mut self) {
        if let Some(part) = self.current.take() {
            part.writer.abort().await;
        }
        self.lifecycle.discard_parts(&self.row, &self.sealed).await;
    }

    /// The type was refused: the whole upload is terminated (row and every part), unless
    /// another request moved it meanwhile.
    pub async fn refuse(self) {
        let lifecycle = self.lifecycle.clone();
        let row = self.row.clone();
        self.abandon().await;
        let removed = lifecycle
            .db()
            .delete_upload_at(&row.id, row.upload_offset, now_millis())
            .await;
        if let Ok(Some(row)) = removed
            && let Err(e) = lifecycle.forget_upload_parts(&row).await
        {
            log_repairable("removing a refused upload's parts", &e);
        }
        metrics::counter!("medrelay_resumable_uploads_total", "event" => "refused").increment(1);
    }

    /// Ends this request's bytes: seals the current part, checks the checksum. `interrupted`:
    /// the body broke off (its bytes are kept, unless a checksum cannot be checked). Returns
    /// the parts ready to commit.
    async fn seal(&mut self, interrupted: bool) -> Result<(), UploadError> {
        if let Some(checksum) = self.checksum.take() {
            if interrupted {
                return Err(UploadError::Interrupted);
            }
            let digest = checksum.context.finish();
            if digest.as_ref() != checksum.expected.as_slice() {
                return Err(UploadError::ChecksumMismatch);
            }
        }
        if let Some(refused) = self.refused {
            return Err(UploadError::Refused(refused));
        }
        self.close_part().await?;
        if self.row.part_count + self.sealed.len() as i64 > MAX_PARTS {
            return Err(UploadError::TooManyParts);
        }
        Ok(())
    }

    /// Commits this request's bytes to an upload that is not complete. Returns the new offset.
    /// On an error, what this request wrote is gone and the upload is where it was.
    pub async fn commit(mut self, interrupted: bool) -> Result<i64, UploadError> {
        if self.received == 0 {
            return Ok(self.row.upload_offset);
        }
        if let Err(e) = self.seal(interrupted).await {
            self.give_up(&e).await;
            return Err(e);
        }
        let now = now_millis();
        let to = self.offset();
        let committed = self
            .lifecycle
            .db()
            .append_upload(
                &self.row.id,
                &Append {
                    from: self.row.upload_offset,
                    to,
                    parts: &self.sealed,
                    media_type: self.media_type.map(MediaType::as_str),
                },
                now,
            )
            .await;
        match committed {
            Ok(true) => Ok(to),
            Ok(false) => {
                let why = lost_race(&self.lifecycle, &self.row).await;
                self.abandon().await;
                Err(why)
            }
            Err(e) => {
                self.abandon().await;
                Err(e.into())
            }
        }
    }

    /// Turns the upload, with this request's bytes (which complete it), into its job: under a
    /// renewed lease on the row (so that no other request completes it meanwhile), its parts
    /// are opened in order and sealed again into the job's document, the job is committed if
    /// the user's limits (checked by the insert, as for `POST /v1/documents`) leave room, then
    /// the upload's row and parts go. Refused or failed: this request's bytes are discarded and
    /// the upload stays where it was before them. `interrupted`: the body broke off after its
    /// last byte (kept, unless a checksum cannot be checked).
    pub async fn become_job<E>(
        mut self,
        interrupted: bool,
        own_slot: Option<&str>,
        caps: InsertCaps,
        refused: impl FnOnce(&Usage) -> E,
    ) -> Result<std::result::Result<Job, E>, UploadError> {
        if let Err(e) = self.seal(interrupted).await {
            self.give_up(&e).await;
            return Err(e);
        }
        let lifecycle = self.lifecycle.clone();
        let db = lifecycle.db();
        let id = self.row.id.clone();
        let token = match random_hex(16) {
            Ok(token) => token,
            Err(e) => {
                self.abandon().await;
                return Err(e.into());
            }
        };
        let now = now_millis();
        let claimed = db
            .claim_upload_completion(
                &id,
                self.row.upload_offset,
                &token,
                now,
                now + millis(COMPLETION_LEASE),
            )
            .await;
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                let why = lost_race(&self.lifecycle, &self.row).await;
                self.abandon().await;
                return Err(why);
            }
            Err(e) => {
                self.abandon().await;
                return Err(e.into());
            }
        }
        let outcome = assemble_and_commit(
            &lifecycle,
            &self.row,
            &self.key,
            &self.sealed,
            self.media_type,
            &token,
            (own_slot, caps, refused),
        )
        .await;
        match outcome {
            Ok(Ok(job)) => {
                metrics::counter!("medrelay_resumable_uploads_total", "event" => "completed")
                    .increment(1);
                let mut row = self.row.clone();
                // Every part, this request's too, goes with the row.
                for name in &self.sealed {
                    row.parts.push_str(name);
                    row.parts.push(' ');
                }
                lifecycle.forget_completed_upload(&row).await;
                Ok(Ok(job))
            }
            other => {
                if let Err(e) = db.release_upload_completion(&id, &token).await {
                    log_repairable("releasing an upload's completion", &e.into());
                }
                self.abandon().await;
                other
            }
        }
    }
}

/// Why a compare-and-set on an upload failed: it moved, is being completed, or is gone.
async fn lost_race(lifecycle: &Lifecycle, row: &UploadRow) -> UploadError {
    match lifecycle.upload_state(&row.user_id, &row.id).await {
        Ok(UploadState::Open(now)) if now.upload_offset != row.upload_offset => {
            UploadError::OffsetMismatch {
                current: now.upload_offset,
            }
        }
        Ok(UploadState::Open(_)) => UploadError::Busy,
        Ok(UploadState::Completed { job, length }) => UploadError::Completed { job, length },
        Err(e) => e,
    }
}

/// Opens an upload's parts in order and seals them again into its job's document, then
/// commits the job (see [`Appending::become_job`]).
async fn assemble_and_commit<E>(
    lifecycle: &Lifecycle,
    row: &UploadRow,
    key: &DataKey,
    last: &[String],
    media_type: Option<MediaType>,
    token: &str,
    (own_slot, caps, refused): (Option<&str>, InsertCaps, impl FnOnce(&Usage) -> E),
) -> Result<std::result::Result<Job, E>, UploadError> {
    // Renews the lease when due; fails when it was lost (the upload was deleted, terminated,
    // expired, or a crash-length stall let another request take over).
    let mut renewed = std::time::Instant::now();
    async fn renew(
        lifecycle: &Lifecycle,
        row: &UploadRow,
        token: &str,
        renewed: &mut std::time::Instant,
        force: bool,
    ) -> Result<(), UploadError> {
        if !force && renewed.elapsed() < COMPLETION_RENEW {
            return Ok(());
        }
        *renewed = std::time::Instant::now();
        let until = now_millis() + millis(COMPLETION_LEASE);
        match lifecycle
            .db()
            .renew_upload_completion(&row.id, token, until)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(UploadError::NotFound),
            Err(e) => Err(e.into()),
        }
    }
    let media_type = media_type
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("a complete upload without a type")))?;
    let mut incoming: Incoming =
        lifecycle.accept_as(&row.user_id, media_type, row.created_at, row.id.clone())?;
    let copied = async {
        for name in row.part_names().chain(last.iter().map(String::as_str)) {
            renew(lifecycle, row, token, &mut renewed, false).await?;
            let plaintext = lifecycle.read_part(key, row, name).await?;
            incoming.push(&plaintext).await?;
        }
        // Still ours, just before the document appears and the job is committed.
        renew(lifecycle, row, token, &mut renewed, true).await?;
        Ok::<_, UploadError>(())
    }
    .await;
    if let Err(e) = copied {
        incoming.abort().await;
        return Err(e);
    }
    if incoming.size() != row.length as u64 {
        incoming.abort().await;
        return Err(Error::Internal(anyhow::anyhow!(
            "an upload's parts do not add up to its length"
        ))
        .into());
    }
    if let Some(sealed) = row.push_token() {
        incoming.keep_sealed_push_token(sealed);
    }
    Ok(incoming.commit(None, own_slot, caps, refused).await?)
}

/// `len` random bytes as lowercase hex (part names, completion tokens).
fn random_hex(len: usize) -> Result<String, Error> {
    let bytes = crypto::random_bytes(len).map_err(Error::Internal)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
