//! Resolving an image reference to its linux/amd64 config and layers, from the
//! embedded store (read directly, no HTTP) or from a remote registry.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use slipway_core::{Digest, Reference, RepoName, media};
use slipway_image::ImageRef;
use slipway_image::client::RegistryClient;
use slipway_store::Store;

use crate::RuntimeError;

/// A layer to unpack.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Media type.
    pub media_type: String,
}

/// What a container needs from its image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The manifest digest actually run.
    pub digest: Digest,
    /// The image config (`config` object of the config blob).
    pub config: Value,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// Where the layer blobs come from.
    pub source: Source,
}

/// Where blobs are read from.
#[derive(Clone)]
pub enum Source {
    /// The embedded store.
    Local(Arc<Store>, RepoName),
    /// A remote registry (layers are downloaded to a cache first).
    Remote(Box<RegistryClient>, RepoName),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(_, r) => write!(f, "local {r}"),
            Self::Remote(c, r) => write!(f, "{}/{r}", c.base()),
        }
    }
}

fn not_found(image: &str, why: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::ImageNotFound(format!("{image}: {why}"))
}

fn pick_platform(index: &Value, image: &str) -> Result<Digest, RuntimeError> {
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let found = manifests.iter().find(|m| {
        let p = &m["platform"];
        p["os"] == "linux" && p["architecture"] == "amd64"
    });
    let Some(m) = found else {
        let have: Vec<String> = manifests
            .iter()
            .map(|m| {
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                )
            })
            .collect();
        return Err(RuntimeError::NoPlatform(format!(
            "{image} has no linux/amd64 manifest (it has: {})",
            have.join(", ")
        )));
    };
    m["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            RuntimeError::ImageInvalid(format!("{image}: index entry without a valid digest"))
        })
}

fn parse_manifest(
    bytes: &[u8],
    image: &str,
) -> Result<(Value, Vec<LayerRef>, Digest), RuntimeError> {
    let m: Value = serde_json::from_slice(bytes)
        .map_err(|e| RuntimeError::ImageInvalid(format!("{image}: manifest is not JSON: {e}")))?;
    let config: Digest = m["config"]["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            RuntimeError::ImageInvalid(format!("{image}: manifest has no config digest"))
        })?;
    let mut layers = Vec::new();
    for l in m["layers"].as_array().cloned().unwrap_or_default() {
        let digest = l["digest"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| {
                RuntimeError::ImageInvalid(format!("{image}: layer without a valid digest"))
            })?;
        layers.push(LayerRef {
            digest,
            media_type: l["mediaType"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok((m, layers, config))
}

fn check_config(bytes: &[u8], digest: &Digest, image: &str) -> Result<Value, RuntimeError> {
    if &Digest::sha256_of(bytes) != digest {
        return Err(RuntimeError::ImageInvalid(format!(
            "{image}: config blob does not match its digest {digest}"
        )));
    }
    let c: Value = serde_json::from_slice(bytes)
        .map_err(|e| RuntimeError::ImageInvalid(format!("{image}: config is not JSON: {e}")))?;
    if c["os"].as_str().is_some_and(|o| o != "linux")
        || c["architecture"].as_str().is_some_and(|a| a != "amd64")
    {
        return Err(RuntimeError::NoPlatform(format!(
            "{image} is {}/{}, not linux/amd64",
            c["os"], c["architecture"]
        )));
    }
    Ok(c["config"].clone())
}

/// Resolves from the embedded store.
pub fn resolve_local(store: &Arc<Store>, image: &ImageRef) -> Result<ResolvedImage, RuntimeError> {
    let name = image.to_string();
    let get = |r: &Reference| {
        store
            .get_manifest(&image.repo, r)
            .map_err(|e| not_found(&name, e))
    };
    let (mut meta, mut bytes) = get(&image.reference)?;
    if media::is_index(&meta.media_type) {
        let index: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::ImageInvalid(format!("{name}: {e}")))?;
        let child = pick_platform(&index, &name)?;
        (meta, bytes) = get(&Reference::Digest(child))?;
    }
    let (_, layers, config_digest) = parse_manifest(&bytes, &name)?;
    let config_bytes = std::fs::read(store.blob_file(&config_digest))
        .map_err(|e| not_found(&name, format!("config blob {config_digest}: {e}")))?;
    store
        .stat_blob(&image.repo, &config_digest)
        .map_err(|e| not_found(&name, e))?;
    let config = check_config(&config_bytes, &config_digest, &name)?;
    for l in &layers {
        store
            .stat_blob(&image.repo, &l.digest)
            .map_err(|e| not_found(&name, e))?;
    }
    Ok(ResolvedImage {
        digest: meta.digest,
        config,
        layers,
        source: Source::Local(store.clone(), image.repo.clone()),
    })
}

/// Resolves from a remote registry over HTTP.
pub async fn resolve_remote(host: &str, image: &ImageRef) -> Result<ResolvedImage, RuntimeError> {
    let name = image.to_string();
    let client = RegistryClient::new(host);
    let repo = image.repo.as_str();
    let (mut mt, mut bytes) = client
        .get_manifest(repo, &image.reference.to_string())
        .await
        .map_err(|e| not_found(&name, e))?;
    let mut digest = match &image.reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(_) => Digest::sha256_of(&bytes),
    };
    if media::is_index(&mt)
        || serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v["manifests"].is_array())
    {
        let index: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::ImageInvalid(format!("{name}: {e}")))?;
        let child = pick_platform(&index, &name)?;
        (mt, bytes) = client
            .get_manifest(repo, &child.to_string())
            .await
            .map_err(|e| not_found(&name, e))?;
        digest = child;
    }
    let _ = mt;
    if Digest::sha256_of(&bytes) != digest {
        return Err(RuntimeError::ImageInvalid(format!(
            "{name}: manifest does not match its digest {digest}"
        )));
    }
    let (_, layers, config_digest) = parse_manifest(&bytes, &name)?;
    let config_bytes = client
        .get_blob(repo, &config_digest)
        .await
        .map_err(|e| not_found(&name, e))?;
    let config = check_config(&config_bytes, &config_digest, &name)?;
    Ok(ResolvedImage {
        digest,
        config,
        layers,
        source: Source::Remote(Box::new(client), image.repo.clone()),
    })
}

impl Source {
    /// A local file holding the layer blob: the store's own file, or a download.
    pub async fn layer_file(
        &self,
        layer: &Digest,
        cache: &std::path::Path,
    ) -> Result<PathBuf, RuntimeError> {
        match self {
            Self::Local(store, _) => Ok(store.blob_file(layer)),
            Self::Remote(client, repo) => {
                std::fs::create_dir_all(cache)
                    .map_err(|e| RuntimeError::Io("create download cache".into(), e))?;
                let path = cache.join(format!("{}.{}", layer.hex(), uuid::Uuid::new_v4()));
                match client.get_blob_to_file(repo.as_str(), layer, &path).await {
                    Ok(_) => Ok(path),
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        Err(match e {
                            // Writing the download failed here (a full disk, say).
                            slipway_image::client::ClientError::Io(e) => {
                                RuntimeError::Io(format!("download layer {layer}"), e)
                            }
                            e => RuntimeError::ImageNotFound(format!("layer {layer}: {e}")),
                        })
                    }
                }
            }
        }
    }
}
