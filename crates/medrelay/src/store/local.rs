//! The local-folder backend (embedded defaults): object_store's `LocalFileSystem`, plus what
//! it hides from its listing and leaves behind: staging files of an upload a crash interrupted
//! (`name#n`) and folders an aborted upload left empty.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use tokio::io::AsyncWriteExt;

/// A local folder holding the objects.
#[derive(Clone, Debug)]
pub struct Local {
    root: PathBuf,
}

impl Local {
    /// Opens (and creates) the folder at `path`.
    pub fn open(path: &str) -> anyhow::Result<(Local, Arc<dyn ObjectStore>)> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating the object folder {path}"))?;
        // Empty folders are removed with their last object, so a deleted job leaves no trace
        // (not even its opaque prefix) in the folder.
        let fs = LocalFileSystem::new_with_prefix(path)
            .with_context(|| format!("opening the object folder {path}"))?
            .with_automatic_cleanup(true);
        Ok((
            Local {
                root: PathBuf::from(path),
            },
            Arc::new(fs),
        ))
    }

    pub fn writer(&self, inner: Arc<dyn ObjectStore>, path: &Path) -> LocalWriter {
        LocalWriter {
            // One part in flight: an abort then has at most one blocking write to outlive.
            // Each part is one hop through tokio's blocking pool: 1 MiB parts take a quarter
            // of the hops 256 KiB did (issue #14; docs/benchmarks.md).
            writer: BufWriter::with_capacity(inner, path.clone(), 1024 * 1024)
                .with_max_concurrency(1),
            root: self.root.clone(),
            path: path.clone(),
        }
    }

    /// Deletes staging files (`name#n`, an upload a crash interrupted) and empty folders,
    /// when older than `older_than_ms`. object_store's listing hides both.
    pub fn sweep_staging(&self, now_ms: i64, older_than_ms: i64) -> u64 {
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
        let mut stack = vec![self.root.clone()];
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

    /// Removes the folders of `path` that are now empty.
    pub fn prune_empty_parents(&self, path: &Path) {
        prune_empty_parents(&self.root, path);
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

/// A streaming write into the local folder (through a staging file).
pub struct LocalWriter {
    writer: BufWriter,
    root: PathBuf,
    path: Path,
}

impl LocalWriter {
    pub async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
        self.writer.put(chunk).await.context("writing an object")
    }

    pub async fn finish(mut self) -> anyhow::Result<()> {
        self.writer.shutdown().await.context("completing an object")
    }

    pub async fn abort(mut self) -> anyhow::Result<()> {
        let outcome = self.writer.abort().await.context("aborting an upload");
        // A part write already handed to a blocking thread cannot be cancelled and may remove
        // its staging file only after the abort returned: prune until the job's folder is gone
        // (bounded; the sweeper removes whatever is still left).
        let job_dir = self
            .path
            .parts()
            .take(self.path.parts().count().saturating_sub(1))
            .fold(self.root.clone(), |dir, part| dir.join(part.as_ref()));
        for _ in 0..20 {
            prune_empty_parents(&self.root, &self.path);
            if !job_dir.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        outcome
    }
}
