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
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

/// The object store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
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
            let prefix = prefix.trim_matches('/');
            let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            };
            Ok(Store {
                inner,
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
        let (capacity, concurrency) = match self.kind {
            StoreKind::Local => (256 * 1024, 2),
            StoreKind::S3 => (5 * 1024 * 1024, 2),
        };
        ObjectWriter {
            inner: BufWriter::with_capacity(self.inner.clone(), path.clone(), capacity)
                .with_max_concurrency(concurrency),
            prune: self
                .local_root
                .as_ref()
                .map(|root| (root.clone(), path.clone())),
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
    inner: BufWriter,
    prune: Option<(std::path::PathBuf, Path)>,
}

impl ObjectWriter {
    pub async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        self.inner.put(chunk).await.context("writing an object")
    }

    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.inner.shutdown().await.context("completing an object")
    }

    pub async fn abort(mut self) {
        if let Err(e) = self.inner.abort().await {
            tracing::warn!(error = %e, "aborting an upload failed; the sweeper will remove it");
        }
        if let Some((root, path)) = self.prune.take() {
            prune_empty_parents(&root, &path);
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
