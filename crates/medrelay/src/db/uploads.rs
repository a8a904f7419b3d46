//! Resumable uploads (tus): the `uploads` table and every statement on it. The offset lives
//! here, not in a process, so that any instance resumes an upload after any restart. Appends
//! are compare-and-set on the offset: of two requests at the same offset, one commits and the
//! other is told the offset moved (409); no lock outlives a crashed instance.

use super::{Db, Result, Sealed};
use crate::crypto::WrappedKey;
use crate::ids::{JobId, UserId, UserPrefix};

/// An `uploads` row.
#[derive(Clone, sqlx::FromRow)]
pub struct UploadRow {
    pub id: JobId,
    pub user_id: UserId,
    pub user_prefix: UserPrefix,
    pub length: i64,
    pub upload_offset: i64,
    /// Names of the sealed parts holding bytes `0..upload_offset`, space-separated, in order.
    pub parts: String,
    pub part_count: i64,
    pub media_type: Option<String>,
    pub part_kek: String,
    pub part_dek: Vec<u8>,
    pub push_token: Option<Vec<u8>>,
    pub push_kek: Option<String>,
    pub push_dek: Option<Vec<u8>>,
    pub completing_until: Option<i64>,
    pub completing_token: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
}

impl std::fmt::Debug for UploadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadRow")
            .field("id", &self.id)
            .field("length", &self.length)
            .field("upload_offset", &self.upload_offset)
            .finish_non_exhaustive()
    }
}

impl UploadRow {
    /// The wrapped data key from which every part's key derives.
    pub fn part_key(&self) -> WrappedKey {
        WrappedKey {
            kid: self.part_kek.clone(),
            bytes: self.part_dek.clone(),
        }
    }

    /// The part names, in order.
    pub fn part_names(&self) -> impl Iterator<Item = &str> {
        self.parts.split_ascii_whitespace()
    }

    /// The sealed push token, if the upload carried one.
    pub fn push_token(&self) -> Option<Sealed> {
        Sealed::from_columns(&self.push_token, &self.push_kek, &self.push_dek)
    }
}

/// A new upload, before its first byte.
#[derive(Debug)]
pub struct NewUpload<'a> {
    pub id: &'a JobId,
    pub user_id: &'a UserId,
    pub user_prefix: &'a UserPrefix,
    pub length: i64,
    pub part_key: &'a WrappedKey,
    pub push_token: Option<&'a Sealed>,
    pub now: i64,
    pub expires_at: i64,
}

/// What an append committed.
#[derive(Debug)]
pub struct Append<'a> {
    /// The offset the request started from: the commit happens only if it is still current.
    pub from: i64,
    pub to: i64,
    /// The names of the parts that hold `from..to`, in order.
    pub parts: &'a [String],
    pub media_type: Option<&'a str>,
}

impl Db {
    /// Records a new upload.
    pub async fn insert_upload(&self, upload: &NewUpload<'_>) -> Result<()> {
        let sql = "INSERT INTO uploads (id, user_id, user_prefix, length, part_kek, part_dek, \
                   push_token, push_kek, push_dek, created_at, updated_at, expires_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11)";
        let push = upload.push_token;
        on_pool!(self, |p| sqlx::query(sql)
            .bind(upload.id)
            .bind(upload.user_id)
            .bind(upload.user_prefix)
            .bind(upload.length)
            .bind(&upload.part_key.kid)
            .bind(&upload.part_key.bytes)
            .bind(push.map(|s| s.sealed.as_slice()))
            .bind(push.map(|s| s.key.kid.as_str()))
            .bind(push.map(|s| s.key.bytes.as_slice()))
            .bind(upload.now)
            .bind(upload.expires_at)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// An upload of this user, expired or not (another user's is `None`, as if absent).
    pub async fn get_upload(&self, user_id: &UserId, id: &JobId) -> Result<Option<UploadRow>> {
        let sql = "SELECT * FROM uploads WHERE id = $1 AND user_id = $2";
        let row = on_pool!(self, |p| sqlx::query_as::<_, UploadRow>(sql)
            .bind(id)
            .bind(user_id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// The user's uploads that have not expired at `now`.
    pub async fn count_open_uploads(&self, user_prefix: &UserPrefix, now: i64) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM uploads WHERE user_prefix = $1 AND expires_at > $2";
        let count = on_pool!(self, |p| sqlx::query_scalar::<_, i64>(sql)
            .bind(user_prefix)
            .bind(now)
            .fetch_one(p)
            .await)?;
        Ok(count)
    }

    /// Moves the offset from `append.from` to `append.to`, adding its parts, if nobody moved it
    /// first and the upload is not being completed. Returns whether it committed.
    pub async fn append_upload(&self, id: &JobId, append: &Append<'_>, now: i64) -> Result<bool> {
        let sql = "UPDATE uploads SET upload_offset = $1, parts = parts || $2, \
                   part_count = part_count + $3, media_type = COALESCE(media_type, $4), \
                   updated_at = $5 \
                   WHERE id = $6 AND upload_offset = $7 AND expires_at > $5 \
                   AND (completing_until IS NULL OR completing_until < $5)";
        let names: String = append.parts.iter().map(|n| format!("{n} ")).collect();
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(append.to)
            .bind(&names)
            .bind(append.parts.len() as i64)
            .bind(append.media_type)
            .bind(now)
            .bind(id)
            .bind(append.from)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Takes the right to turn the upload into its job until `until`, under `token`, if its
    /// offset is still `from`, it has not expired and nobody else holds that right. Returns
    /// whether it was taken.
    pub async fn claim_upload_completion(
        &self,
        id: &JobId,
        from: i64,
        token: &str,
        now: i64,
        until: i64,
    ) -> Result<bool> {
        let sql = "UPDATE uploads SET completing_until = $1, completing_token = $2, \
                   updated_at = $3 \
                   WHERE id = $4 AND upload_offset = $5 AND expires_at > $3 \
                   AND (completing_until IS NULL OR completing_until < $3)";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(until)
            .bind(token)
            .bind(now)
            .bind(id)
            .bind(from)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Extends the right to complete, if `token` still holds it. Returns whether it does.
    pub async fn renew_upload_completion(
        &self,
        id: &JobId,
        token: &str,
        until: i64,
    ) -> Result<bool> {
        let sql = "UPDATE uploads SET completing_until = $1 \
                   WHERE id = $2 AND completing_token = $3";
        let done = on_pool!(self, |p| sqlx::query(sql)
            .bind(until)
            .bind(id)
            .bind(token)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Gives up the right to complete, if `token` holds it (the job was refused or failed).
    pub async fn release_upload_completion(&self, id: &JobId, token: &str) -> Result<()> {
        let sql = "UPDATE uploads SET completing_until = NULL, completing_token = NULL \
                   WHERE id = $1 AND completing_token = $2";
        on_pool!(self, |p| sqlx::query(sql)
            .bind(id)
            .bind(token)
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Removes an upload's row only while it is at `offset` and nobody completes it (a type
    /// refused by the request that started there). Returns it, if it was removed.
    pub async fn delete_upload_at(
        &self,
        id: &JobId,
        offset: i64,
        now: i64,
    ) -> Result<Option<UploadRow>> {
        let sql = "DELETE FROM uploads WHERE id = $1 AND upload_offset = $2 \
                   AND (completing_until IS NULL OR completing_until < $3) RETURNING *";
        let row = on_pool!(self, |p| sqlx::query_as::<_, UploadRow>(sql)
            .bind(id)
            .bind(offset)
            .bind(now)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Removes an upload's row unless a request is completing it (termination). Returns it, if
    /// it was removed.
    pub async fn delete_idle_upload(&self, id: &JobId, now: i64) -> Result<Option<UploadRow>> {
        let sql = "DELETE FROM uploads WHERE id = $1 \
                   AND (completing_until IS NULL OR completing_until < $2) RETURNING *";
        let row = on_pool!(self, |p| sqlx::query_as::<_, UploadRow>(sql)
            .bind(id)
            .bind(now)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Removes an upload's row (its wrapped keys with it). Returns it, if it was there.
    pub async fn delete_upload(&self, id: &JobId) -> Result<Option<UploadRow>> {
        let sql = "DELETE FROM uploads WHERE id = $1 RETURNING *";
        let row = on_pool!(self, |p| sqlx::query_as::<_, UploadRow>(sql)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        Ok(row)
    }

    /// Removes every upload of a user. Returns their ids.
    pub async fn delete_uploads_of(&self, user_prefix: &UserPrefix) -> Result<Vec<JobId>> {
        let sql = "DELETE FROM uploads WHERE user_prefix = $1 RETURNING id";
        let ids = on_pool!(self, |p| sqlx::query_scalar::<_, JobId>(sql)
            .bind(user_prefix)
            .fetch_all(p)
            .await)?;
        Ok(ids)
    }

    /// Uploads whose lifetime has ended at `now`, oldest first.
    pub async fn expired_uploads(&self, now: i64, limit: i64) -> Result<Vec<UploadRow>> {
        // One being completed is left to its request, whose job expires at the same instant.
        let sql = "SELECT * FROM uploads WHERE expires_at <= $1 \
                   AND (completing_until IS NULL OR completing_until < $1) \
                   ORDER BY expires_at LIMIT $2";
        let rows = on_pool!(self, |p| sqlx::query_as::<_, UploadRow>(sql)
            .bind(now)
            .bind(limit)
            .fetch_all(p)
            .await)?;
        Ok(rows)
    }
}
