//! The S3 backend (production; any S3-compatible server): object_store's `AmazonS3`, with
//! multipart uploads driven here so that each upload's id is recorded (a marker object) and
//! an upload a crash left incomplete can be aborted: S3 keeps its parts out of every listing.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{UPLOAD_MARKERS, marker_for};

/// S3's smallest part (all but the last).
const S3_PART: usize = 5 * 1024 * 1024;

/// A bucket (and optional prefix) holding the objects.
#[derive(Clone, Debug)]
pub struct S3 {
    s3: Arc<PrefixStore<AmazonS3>>,
}

impl S3 {
    /// Opens `bucket[/prefix]` with the standard `AWS_*` variables.
    pub fn open(rest: &str) -> anyhow::Result<(S3, Arc<dyn ObjectStore>)> {
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
        if std::env::var("AWS_DEFAULT_REGION").is_err() && std::env::var("AWS_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        let s3 = builder.build().context("configuring S3 storage")?;
        let s3 = Arc::new(PrefixStore::new(s3, prefix.trim_matches('/')));
        Ok((S3 { s3: s3.clone() }, s3))
    }

    pub fn writer(&self, path: &Path) -> S3Upload {
        S3Upload {
            s3: self.s3.clone(),
            path: path.clone(),
            buffer: Vec::new(),
            buffered: 0,
            upload: None,
            parts: Vec::new(),
        }
    }

    /// Aborts multipart uploads that were started more than `older_than_ms` ago and never
    /// completed or aborted (a crash mid-upload). Returns how many it aborted.
    pub async fn abort_stale_uploads(
        &self,
        now_ms: i64,
        older_than_ms: i64,
    ) -> anyhow::Result<u64> {
        let markers: Vec<_> = self
            .s3
            .list(Some(&Path::from(UPLOAD_MARKERS)))
            .try_collect()
            .await
            .context("listing upload markers")?;
        let mut aborted = 0;
        for marker in markers {
            if now_ms - marker.last_modified.timestamp_millis() < older_than_ms {
                continue;
            }
            // Each failure is counted and the rest goes on; the marker stays until its upload
            // is aborted (or gone), so the next round tries again.
            let id = match self.s3.get(&marker.location).await {
                Ok(got) => match got.bytes().await {
                    Ok(id) => String::from_utf8_lossy(&id).into_owned(),
                    Err(e) => {
                        super::sweep_failed("reading an upload marker", &e);
                        continue;
                    }
                },
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => {
                    super::sweep_failed("reading an upload marker", &e);
                    continue;
                }
            };
            let target = Path::from_iter(marker.location.parts().skip(1));
            match self.s3.abort_multipart(&target, &id).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    super::sweep_failed("aborting a stale multipart upload", &e);
                    continue;
                }
            }
            match self.s3.delete(&marker.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    super::sweep_failed("deleting an upload marker", &e);
                    continue;
                }
            }
            aborted += 1;
        }
        Ok(aborted)
    }
}

/// A streaming write into S3: one PUT when small, else a multipart upload recorded by a
/// marker until it completes or aborts.
pub struct S3Upload {
    s3: Arc<PrefixStore<AmazonS3>>,
    path: Path,
    buffer: Vec<Bytes>,
    buffered: usize,
    upload: Option<String>,
    parts: Vec<PartId>,
}

impl S3Upload {
    fn take_buffer(&mut self) -> object_store::PutPayload {
        self.buffered = 0;
        object_store::PutPayload::from_iter(std::mem::take(&mut self.buffer))
    }

    pub async fn write(&mut self, chunk: Bytes) -> anyhow::Result<()> {
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
                        .put(
                            &marker_for(&self.path),
                            Bytes::from(id.clone().into_bytes()).into(),
                        )
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

    pub async fn finish(mut self) -> anyhow::Result<()> {
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
                    .delete(&marker_for(&self.path))
                    .await
                    .context("clearing an upload record")?;
            }
        }
        Ok(())
    }

    pub async fn abort(self) -> anyhow::Result<()> {
        if let Some(id) = &self.upload {
            self.s3
                .abort_multipart(&self.path, id)
                .await
                .context("aborting an upload")?;
            self.s3
                .delete(&marker_for(&self.path))
                .await
                .context("clearing an upload record")?;
        }
        Ok(())
    }
}
