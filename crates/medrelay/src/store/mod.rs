//! Temporary object storage through the `object_store` crate: a local folder by default
//! ([`local`]), any S3-compatible store in production ([`s3`]), behind one [`Store`].
//!
//! The only place that knows how an object key is built: `{user prefix}/{job id}/{object}`,
//! opaque ids only, never a user name or a file name (see [`Store::document_key`] and
//! [`Store::job_prefix`]). Uploads stream in bounded chunks; nothing is held whole in memory.
//! The store never sees plaintext: callers hand it ciphertext from `crypto`. It deletes what
//! it is told to delete and decides nothing about when: that is `lifecycle`'s.

mod local;
mod s3;

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt};

use self::local::{Local, LocalWriter};
use self::s3::{S3, S3Upload};
use crate::ids::{JobId, UserPrefix};

/// Logs and counts one failed step of a sweep; the sweep goes on and the next round retries.
pub(crate) fn sweep_failed(what: &str, error: &dyn std::fmt::Display) {
    metrics::counter!("medrelay_sweep_failures_total").increment(1);
    tracing::warn!(error = %error, "{what} failed; the next sweep retries");
}

/// The object store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Local(Local),
    S3(S3),
}

/// What an object is, as the last segment of its key (and the `kind` its encryption binds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Document,
}

impl ObjectKind {
    /// Every kind of object a job may have.
    pub const ALL: [ObjectKind; 1] = [ObjectKind::Document];

    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Document => "document",
        }
    }
}

/// Where the id of every S3 multipart upload in progress is recorded, one marker object per
/// upload: `_uploads/{object key}` holding the upload id (an opaque id, no content).
const UPLOAD_MARKERS: &str = "_uploads";

/// The marker of an upload to `path`.
fn marker_for(path: &Path) -> Path {
    Path::from_iter(std::iter::once(PathPart::from(UPLOAD_MARKERS)).chain(path.parts()))
}

impl Store {
    /// Opens `file:///path` or `s3://bucket[/prefix]`.
    pub fn open(url: &str) -> anyhow::Result<Store> {
        let (backend, inner) = if let Some(path) = url.strip_prefix("file://") {
            let (local, inner) = Local::open(path)?;
            (Backend::Local(local), inner)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (s3, inner) = S3::open(rest)?;
            (Backend::S3(s3), inner)
        } else {
            anyhow::bail!("MEDRELAY_STORAGE_URL must start with file:// or s3://")
        };
        Ok(Store { inner, backend })
    }

    /// Everything of one user: `{user prefix}`.
    pub fn user_root(user: &UserPrefix) -> Path {
        Path::from(user.as_str())
    }

    /// Everything of one job: `{user prefix}/{job id}`.
    pub fn job_prefix(user: &UserPrefix, job: &JobId) -> Path {
        Self::user_root(user).join(job.as_str())
    }

    /// One object of a job: `{user prefix}/{job id}/{kind}`.
    fn object_key(user: &UserPrefix, job: &JobId, kind: ObjectKind) -> Path {
        Self::job_prefix(user, job).join(kind.name())
    }

    /// A job's document: `{user prefix}/{job id}/document`.
    pub fn document_key(user: &UserPrefix, job: &JobId) -> Path {
        Self::object_key(user, job, ObjectKind::Document)
    }

    /// One sealed part of a resumable upload that becomes this job: `{user prefix}/{job
    /// id}/part-{name}` (the name says where the part starts and is otherwise random).
    pub fn part_key(user: &UserPrefix, job: &JobId, name: &str) -> Path {
        Self::job_prefix(user, job).join(format!("part-{name}"))
    }

    /// A streaming writer. The chunk size bounds memory per upload: S3 needs parts of 5 MiB at
    /// least; a local folder takes any size, so it buffers far less.
    pub fn writer(&self, path: &Path) -> ObjectWriter {
        ObjectWriter(match &self.backend {
            Backend::Local(local) => Writer::Local(local.writer(self.inner.clone(), path)),
            Backend::S3(s3) => Writer::S3(s3.writer(path)),
        })
    }

    /// Removes what uploads a crash interrupted left behind, once older than `older_than_ms`:
    /// S3 multipart uploads (whose parts no listing shows) or local staging files and empty
    /// folders. Returns how many uploads it removed.
    pub async fn remove_abandoned_uploads(
        &self,
        now_ms: i64,
        older_than_ms: i64,
    ) -> anyhow::Result<u64> {
        match &self.backend {
            Backend::Local(local) => Ok(local.sweep_staging(now_ms, older_than_ms)),
            Backend::S3(s3) => s3.abort_stale_uploads(now_ms, older_than_ms).await,
        }
    }

    /// Writes a whole object at once (small objects and tests).
    pub async fn put(&self, path: &Path, bytes: Bytes) -> anyhow::Result<()> {
        self.inner
            .put(path, bytes.into())
            .await
            .context("writing an object")?;
        Ok(())
    }

    /// Reads a whole object (documents are bounded by the upload limit).
    pub async fn read(&self, path: &Path) -> Result<Bytes, object_store::Error> {
        self.inner.get(path).await?.bytes().await
    }

    /// Deletes one object; deleting what is already gone is success.
    pub async fn delete(&self, path: &Path) -> anyhow::Result<()> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).context("deleting an object"),
        }
    }

    /// Removes the folders of a deleted local object that are now empty.
    pub fn prune_empty(&self, path: &Path) {
        if let Backend::Local(local) = &self.backend {
            local.prune_empty_parents(path);
        }
    }

    /// Deletes every object of one job, each at its known key (no listing); what is already
    /// gone is success.
    pub async fn delete_job_objects(&self, user: &UserPrefix, job: &JobId) -> anyhow::Result<()> {
        for kind in ObjectKind::ALL {
            let path = Self::object_key(user, job, kind);
            self.delete(&path).await?;
            self.prune_empty(&path);
        }
        Ok(())
    }

    /// Deletes every object under `prefix` (see [`Store::user_root`], [`Store::job_prefix`]).
    /// Returns the count. Objects that vanish meanwhile (another deleter won) count as
    /// deleted; other errors are reported after every other object was tried.
    pub async fn delete_prefix(&self, prefix: &Path) -> anyhow::Result<u64> {
        let paths = self
            .inner
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut results = self.inner.delete_stream(paths);
        let mut deleted = 0u64;
        let mut first_error = None;
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Backend::Local(local) = &self.backend {
            // Folders emptied by a concurrent deleter may be left behind; remove them.
            local.prune_empty_parents(&prefix.clone().join("_"));
        }
        match first_error {
            None => Ok(deleted),
            Some(e) => Err(e).context("deleting objects by prefix"),
        }
    }

    /// The same store seen through `wrap` (tests inject failures this way).
    #[doc(hidden)]
    pub fn wrapped(self, wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>) -> Store {
        Store {
            inner: wrap(self.inner),
            backend: self.backend,
        }
    }

    /// Every object key with its size (tests).
    pub async fn list_all(&self) -> anyhow::Result<Vec<(Path, u64)>> {
        self.inner
            .list(None)
            .map_ok(|m| (m.location, m.size))
            .try_collect()
            .await
            .context("listing objects")
    }

    /// Every object with its last-modified time in unix milliseconds (the sweeper). Upload
    /// markers are left out: they go with their upload.
    pub async fn list_with_times(&self) -> anyhow::Result<Vec<(Path, i64)>> {
        let all: Vec<_> = self
            .inner
            .list(None)
            .map_ok(|m| (m.location, m.last_modified.timestamp_millis()))
            .try_collect()
            .await
            .context("listing objects")?;
        Ok(all
            .into_iter()
            .filter(|(path, _)| {
                path.parts()
                    .next()
                    .is_none_or(|p| p.as_ref() != UPLOAD_MARKERS)
            })
            .collect())
    }

    /// Checks that the store answers (`/readyz`).
    pub async fn ping(&self) -> anyhow::Result<()> {
        let probe = Path::from("readyz-probe");
        match self.inner.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).context("the object store does not answer"),
        }
    }
}

/// An upload in progress. Call [`ObjectWriter::finish`] or [`ObjectWriter::abort`]; an
/// unfinished writer that is dropped leaves at most an incomplete upload, which the sweeper
/// removes.
pub struct ObjectWriter(Writer);

enum Writer {
    Local(LocalWriter),
    S3(S3Upload),
}

impl ObjectWriter {
    pub async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        match &mut self.0 {
            Writer::Local(w) => w.write(chunk).await,
            Writer::S3(u) => u.write(chunk).await,
        }
    }

    pub async fn finish(self) -> anyhow::Result<()> {
        match self.0 {
            Writer::Local(w) => w.finish().await,
            Writer::S3(u) => u.finish().await,
        }
    }

    /// Removes what was written; never fails (the sweeper removes what an abort could not).
    pub async fn abort(self) {
        let outcome = match self.0 {
            Writer::Local(w) => w.abort().await,
            Writer::S3(u) => u.abort().await,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %format!("{e:#}"), "aborting an upload failed; the sweeper will remove it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_hold_opaque_ids_only() {
        let user = UserPrefix::from_raw("0123456789abcdef0123456789abcdef");
        let job = JobId::from_raw("0193aaaa-0000-7000-8000-000000000001");
        assert_eq!(
            Store::document_key(&user, &job).as_ref(),
            "0123456789abcdef0123456789abcdef/0193aaaa-0000-7000-8000-000000000001/document"
        );
        assert!(Store::document_key(&user, &job).prefix_matches(&Store::job_prefix(&user, &job)));
        assert!(Store::job_prefix(&user, &job).prefix_matches(&Store::user_root(&user)));
        assert_eq!(
            marker_for(&Store::document_key(&user, &job)).as_ref(),
            "_uploads/0123456789abcdef0123456789abcdef/0193aaaa-0000-7000-8000-000000000001/document"
        );
    }
}
