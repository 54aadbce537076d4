//! Images to layer snapshots: resolving a reference through its `ImageSource` and
//! unpacking each layer once into `snapshots/sha256/<hex>`, shared by every container.

use std::fs::{self};
use std::path::PathBuf;
use std::sync::Arc;

use slipway_image::ImageRef;

use crate::RuntimeError;
use crate::image::{self, ImageSource, RemoteSource, ResolvedImage};
use crate::unpack::{self, LayerCompression};

use crate::runtime::*;

impl Runtime {
    /// The snapshot directory of a layer.
    pub fn snapshot_dir(&self, digest: &slipway_core::Digest) -> PathBuf {
        self.cfg
            .root
            .join("snapshots")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// The repository of the embedded registry an image reference names, or
    /// `None` when it names another registry (or is not a valid reference).
    pub fn local_repo(&self, reference: &str) -> Option<String> {
        let r = ImageRef::parse(reference).ok()?;
        match &r.host {
            Some(h) if !self.cfg.local_hosts.iter().any(|l| l == h) => None,
            _ => Some(r.repo.to_string()),
        }
    }

    /// Resolves an image reference, locally when it names the embedded registry.
    pub async fn resolve(&self, reference: &str) -> Result<ResolvedImage, RuntimeError> {
        let r = ImageRef::parse(reference)
            .map_err(|e| RuntimeError::InvalidSpec(format!("image: {e}")))?;
        let source: Arc<dyn ImageSource> = match &r.host {
            Some(h) if !self.cfg.local_hosts.iter().any(|l| l == h) => {
                Arc::new(RemoteSource::new(h))
            }
            _ => self.local.clone(),
        };
        image::resolve(source, &r).await
    }

    /// Unpacks every layer not yet unpacked; returns snapshot dirs, bottom first.
    pub async fn ensure_snapshots(
        &self,
        img: &ResolvedImage,
    ) -> Result<Vec<PathBuf>, RuntimeError> {
        let _guard = self.unpack_lock.lock().await;
        let mut dirs = Vec::new();
        for layer in &img.layers {
            let dir = self.snapshot_dir(&layer.digest);
            if !dir.is_dir() {
                let compression = LayerCompression::from_media_type(&layer.media_type)?;
                let blob = img
                    .source
                    .layer(&img.repo, &layer.digest, &self.cfg.root.join("downloads"))
                    .await
                    .map_err(|e| match e {
                        image::SourceError::NotFound(m) => {
                            RuntimeError::ImageNotFound(format!("layer {}: {m}", layer.digest))
                        }
                        image::SourceError::Io(ctx, e) => RuntimeError::Io(ctx, e),
                    })?;
                let tmp = self
                    .cfg
                    .root
                    .join("snapshots")
                    .join(format!("tmp-{}", uuid::Uuid::new_v4()));
                let (digest, tmp2) = (layer.digest.clone(), tmp.clone());
                let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
                let image::LayerBlob { file, temp } = blob;
                let res = tokio::task::spawn_blocking(move || {
                    unpack::unpack_layer(file, &digest, compression, &tmp2, &lowers)
                })
                .await
                .map_err(|e| RuntimeError::Io("unpack task".into(), std::io::Error::other(e)))?;
                if let Some(temp) = temp {
                    let _ = fs::remove_file(&temp);
                }
                if let Err(e) = res {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e.into());
                }
                fs::rename(&tmp, &dir).map_err(io("move snapshot into place"))?;
                tracing::debug!(layer = %layer.digest, "unpacked layer");
            } else {
                crate::snapgc::touch(&dir);
            }
            dirs.push(dir);
        }
        let layers: Vec<slipway_core::Digest> =
            img.layers.iter().map(|l| l.digest.clone()).collect();
        self.record_image(&img.digest, &layers);
        Ok(dirs)
    }
}
