//! Temporary object storage through the `object_store` crate: a local folder by default, any
//! S3-compatible store in production.
//!
//! Owns the key layout `{user prefix}/{job id}/{object}`: opaque ids only, never a user name
//! or a file name. Uploads stream in bounded chunks; nothing is held whole in memory.
//! The store never sees plaintext: callers hand it ciphertext from `crypto`.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

/// The object store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same S3 store seen as a multipart store: uploads we drive ourselves, so that their
    /// ids can be recorded and an upload a crash left incomplete can be aborted.
    s3: Option<Arc<PrefixStore<AmazonS3>>>,
    kind: StoreKind,
    /// The folder of a local store, to prune folders an aborted upload leaves empty.
    local_root: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Local,
    S3,
}

/// What an object is, as the last segment of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Document,
}

impl ObjectKind {
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Document => "document",
        }
    }
}

impl Store {
    /// Opens `file:///path` or `s3://bucket[/prefix]`.
    pub fn open(url: &str) -> anyhow::Result<Store> {
        if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating the object folder {path}"))?;
            // Empty folders are removed with their last object, so a deleted job leaves no trace
            // (not even its opaque prefix) in the folder.
            let fs = LocalFileSystem::new_with_prefix(path)
                .with_context(|| format!("opening the object folder {path}"))?
                .with_automatic_cleanup(true);
            Ok(Store {
                inner: Arc::new(fs),
                s3: None,
                kind: StoreKind::Local,
                local_root: Some(std::path::PathBuf::from(path)),
            })
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(
                !bucket.is_empty(),
                "MEDRELAY_STORAGE_URL s3://BUCKET[/prefix] needs a bucket"
            );
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .is_ok_and(|e| e.starts_with("http://"))
            {
                builder = builder.with_allow_http(true);
            }
            if std::env::var("AWS_DEFAULT_REGION").is_err() && std::env::var("AWS_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            let s3 = builder.build().context("configuring S3 storage")?;
            let s3 = Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')));
            Ok(Store {
                inner: s3.clone(),
                s3: Some(s3),
                kind: StoreKind::S3,
                local_root: None,
            })
        } else {
            anyhow::bail!("MEDRELAY_STORAGE_URL must start with file:// or s3://")
        }
    }

    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    pub fn object_path(user_prefix: &str, job_id: &str, kind: ObjectKind) -> Path {
        Path::from(format!("{user_prefix}/{job_id}/{}", kind.name()))
    }

    /// A streaming writer. The chunk size bounds memory per upload: S3 needs parts of 5 MiB at
    /// least; a local folder takes any size, so it buffers far less.
    pub fn writer(&self, path: &Path) -> ObjectWriter {
        let inner = match &self.s3 {
            Some(s3) => Inner::S3(S3Upload {
                s3: s3.clone(),
                path: path.clone(),
                buffer: Vec::new(),
                buffered: 0,
                upload: None,
                parts: Vec::new(),
            }),
            None => Inner::Buffered(
                // One part in flight: an abort then has at most one blocking write to outlive.
                BufWriter::with_capacity(self.inner.clone(), path.clone(), 256 * 1024)
                    .with_max_concurrency(1),
            ),
        };
        ObjectWriter {
            inner,
            prune: self
                .local_root
                .as_ref()
                .map(|root| (root.clone(), path.clone())),
        }
    }

    /// Deletes staging files of the local folder (`name#n`, an upload a crash interrupted) and
    /// empty folders, when older than `older_than_ms`. object_store's listing hides both.
    pub fn sweep_local_staging(&self, now_ms: i64, older_than_ms: i64) -> u64 {
        let Some(root) = &self.local_root else {
            return 0;
        };
        let age = |meta: &std::fs::Metadata| {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            now_ms - modified
        };
        let mut removed = 0;
        let mut dirs = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(path.clone());
                    dirs.push(path);
                } else if entry.file_name().to_string_lossy().contains('#')
                    && age(&meta) >= older_than_ms
                    && std::fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
        }
        // Deepest first, and only folders untouched for the TTL: a fresh empty folder may be
        // one an upload just created and is about to fsync and fill.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            if std::fs::metadata(&dir).is_ok_and(|m| age(&m) >= older_than_ms) {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        removed
    }

    /// Aborts S3 multipart uploads that were started more than `older_than_ms` ago and never
    /// completed or aborted (a crash mid-upload). Returns how many it aborted.
    pub async fn abort_stale_uploads(
        &self,
        now_ms: i64,
        older_than_ms: i64,
    ) -> anyhow::Result<u64> {
        let Some(s3) = &self.s3 else {
            return Ok(0);
        };
        let markers: Vec<_> = self
            .inner
            .list(Some(&Path::from(UPLOAD_MARKERS)))
            .try_collect()
            .await
            .context("listing upload markers")?;
        let mut aborted = 0;
        for marker in markers {
            if now_ms - marker.last_modified.timestamp_millis() < older_than_ms {
                continue;
            }
            let id = match self.read(&marker.location).await {
                Ok(id) => String::from_utf8_lossy(&id).into_owned(),
                Err(_) => continue,
            };
            let target = Path::from_iter(marker.location.parts().skip(1));
            match s3.abort_multipart(&target, &id).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "aborting a stale multipart upload failed"),
            }
            self.delete(&marker.location).await?;
            aborted += 1;
        }
        Ok(aborted)
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
    pub async fn read(&self, path: &Path) -> anyhow::Result<Bytes> {
        let got = self.inner.get(path).await.context("reading an object")?;
        got.bytes().await.context("reading an object")
    }

    /// Deletes one object; deleting what is already gone is success.
    pub async fn delete(&self, path: &Path) -> anyhow::Result<()> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).context("deleting an object"),
        }
    }

    /// Deletes every object under `prefix` (a user prefix, or `user/job`). Returns the count.
    /// Objects that vanish meanwhile (another deleter won) count as deleted; other errors are
    /// reported after every other object was tried.
    pub async fn delete_prefix(&self, prefix: &str) -> anyhow::Result<u64> {
        let prefix_path = Path::from(prefix);
        let paths = self
            .inner
            .list(Some(&prefix_path))
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
        if let Some(root) = &self.local_root {
            // Folders emptied by a concurrent deleter may be left behind; remove them.
            prune_empty_parents(root, &prefix_path.clone().join("_"));
        }
        match first_error {
            None => Ok(deleted),
            Some(e) => Err(e).context("deleting objects by prefix"),
        }
    }

    /// Removes the folders of a deleted local object that are now empty.
    pub fn prune_empty(&self, path: &Path) {
        if let Some(root) = &self.local_root {
            prune_empty_parents(root, path);
        }
    }

    /// Lists every object key (tests and the sweeper).
    pub async fn list_all(&self) -> anyhow::Result<Vec<(Path, u64)>> {
        self.inner
            .list(None)
            .map_ok(|m| (m.location, m.size))
            .try_collect()
            .await
            .context("listing objects")
    }

    /// Every object with its last-modified time in unix milliseconds (the sweeper).
    pub async fn list_with_times(&self) -> anyhow::Result<Vec<(Path, i64)>> {
        self.inner
            .list(None)
            .map_ok(|m| (m.location, m.last_modified.timestamp_millis()))
            .try_collect()
            .await
            .context("listing objects")
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
pub struct ObjectWriter {
    inner: Inner,
    prune: Option<(std::path::PathBuf, Path)>,
}

enum Inner {
    Buffered(BufWriter),
    S3(S3Upload),
}

/// Where the id of every S3 multipart upload in progress is recorded, one marker object per
/// upload: `_uploads/{object key}` holding the upload id (an opaque id, no content).
pub const UPLOAD_MARKERS: &str = "_uploads";
/// S3's smallest part (all but the last).
const S3_PART: usize = 5 * 1024 * 1024;

struct S3Upload {
    s3: Arc<PrefixStore<AmazonS3>>,
    path: Path,
    buffer: Vec<Bytes>,
    buffered: usize,
    upload: Option<String>,
    parts: Vec<object_store::multipart::PartId>,
}

impl S3Upload {
    fn marker(&self) -> Path {
        Path::from_iter(
            std::iter::once(object_store::path::PathPart::from(UPLOAD_MARKERS))
                .chain(self.path.parts()),
        )
    }

    fn take_buffer(&mut self) -> object_store::PutPayload {
        self.buffered = 0;
        object_store::PutPayload::from_iter(std::mem::take(&mut self.buffer))
    }

    async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        self.buffered += chunk.len();
        self.buffer.push(chunk);
        if self.buffered >= S3_PART {
            let id = match &self.upload {
                Some(id) => id.clone(),
                None => {
                    let id = self
                        .s3
                        .create_multipart(&self.path)
                        .await
                        .context("starting an upload")?;
                    // Recorded before the first part, so a crash from here on leaves a marker.
                    self.s3
                        .put(&self.marker(), Bytes::from(id.clone().into_bytes()).into())
                        .await
                        .context("recording an upload")?;
                    self.upload = Some(id.clone());
                    id
                }
            };
            let payload = self.take_buffer();
            let part = self
                .s3
                .put_part(&self.path, &id, self.parts.len(), payload)
                .await
                .context("writing a part")?;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        match self.upload.clone() {
            None => {
                let payload = self.take_buffer();
                self.s3
                    .put(&self.path, payload)
                    .await
                    .context("writing an object")?;
            }
            Some(id) => {
                if self.buffered > 0 {
                    let payload = self.take_buffer();
                    let part = self
                        .s3
                        .put_part(&self.path, &id, self.parts.len(), payload)
                        .await
                        .context("writing the last part")?;
                    self.parts.push(part);
                }
                self.s3
                    .complete_multipart(&self.path, &id, std::mem::take(&mut self.parts))
                    .await
                    .context("completing an upload")?;
                self.s3
                    .delete(&self.marker())
                    .await
                    .context("clearing an upload record")?;
            }
        }
        Ok(())
    }

    async fn abort(self) -> anyhow::Result<()> {
        if let Some(id) = &self.upload {
            self.s3
                .abort_multipart(&self.path, id)
                .await
                .context("aborting an upload")?;
            self.s3
                .delete(&self.marker())
                .await
                .context("clearing an upload record")?;
        }
        Ok(())
    }
}

impl ObjectWriter {
    pub async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Buffered(w) => w.put(chunk).await.context("writing an object"),
            Inner::S3(u) => u.write(chunk).await,
        }
    }

    pub async fn finish(self) -> anyhow::Result<()> {
        match self.inner {
            Inner::Buffered(mut w) => w.shutdown().await.context("completing an object"),
            Inner::S3(u) => u.finish().await,
        }
    }

    pub async fn abort(mut self) {
        let outcome = match self.inner {
            Inner::Buffered(mut w) => w.abort().await.context("aborting an upload"),
            Inner::S3(u) => u.abort().await,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %format!("{e:#}"), "aborting an upload failed; the sweeper will remove it");
        }
        if let Some((root, path)) = self.prune.take() {
            // A part write already handed to a blocking thread cannot be cancelled and may
            // remove its staging file only after the abort returned: prune until the job's
            // folder is gone (bounded; the sweeper removes whatever is still left).
            let job_dir = path
                .parts()
                .take(path.parts().count().saturating_sub(1))
                .fold(root.clone(), |dir, part| dir.join(part.as_ref()));
            for _ in 0..20 {
                prune_empty_parents(&root, &path);
                if !job_dir.exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Removes the folders of `path` below `root` that are empty (an aborted local upload leaves
/// its folders behind; a non-empty folder is left alone).
fn prune_empty_parents(root: &std::path::Path, path: &Path) {
    let parts: Vec<_> = path.parts().collect();
    for depth in (1..parts.len()).rev() {
        let mut dir = root.to_path_buf();
        for part in &parts[..depth] {
            dir.push(part.as_ref());
        }
        if std::fs::remove_dir(&dir).is_err() {
            break;
        }
    }
}
