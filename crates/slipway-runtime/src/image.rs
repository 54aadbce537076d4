//! Resolving an image reference to its linux/amd64 config and layers, through an
//! [`ImageSource`]: the embedded store (the app's implementation reads it directly,
//! no HTTP) or a remote registry ([`RemoteSource`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use slipway_core::{Digest, Reference, RepoName, media};
use slipway_image::ImageRef;
use slipway_image::client::RegistryClient;

use crate::RuntimeError;

/// Why a source could not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The manifest or blob does not exist (in that repository).
    #[error("{0}")]
    NotFound(String),
    /// Reading or writing locally failed (a full disk, say).
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A layer blob ready to be read from its start.
#[derive(Debug)]
pub struct LayerBlob {
    /// The open file.
    pub file: File,
    /// A download to remove once unpacked (`None` for a blob the source keeps).
    pub temp: Option<PathBuf>,
}

/// Where the runtime reads images from.
#[async_trait]
pub trait ImageSource: Send + Sync {
    /// The manifest (media type, bytes) of `repo` at `reference`.
    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(String, Vec<u8>), SourceError>;
    /// A small blob, whole (an image config).
    async fn blob(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<u8>, SourceError>;
    /// A layer blob; a remote source downloads it into `cache` first.
    async fn layer(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cache: &Path,
    ) -> Result<LayerBlob, SourceError>;
}

/// A layer to unpack.
#[derive(Debug, Clone)]
pub struct LayerRef {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Media type.
    pub media_type: String,
}

/// What a container needs from its image.
#[derive(Clone)]
pub struct ResolvedImage {
    /// The manifest digest actually run.
    pub digest: Digest,
    /// The image config (`config` object of the config blob).
    pub config: Value,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
    /// Where the layer blobs come from.
    pub source: Arc<dyn ImageSource>,
    /// The repository they come from.
    pub repo: RepoName,
}

impl std::fmt::Debug for ResolvedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.digest)
    }
}

/// A registry over HTTP.
pub struct RemoteSource(RegistryClient);

impl RemoteSource {
    /// The registry at `host` (`host:port`).
    pub fn new(host: &str) -> Self {
        Self(RegistryClient::new(host))
    }

    /// The registry at `host`, sending `Authorization: Bearer TOKEN`.
    pub fn with_token(host: &str, token: Option<String>) -> Self {
        Self(RegistryClient::new(host).with_token(token))
    }
}

#[async_trait]
impl ImageSource for RemoteSource {
    async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(String, Vec<u8>), SourceError> {
        self.0
            .get_manifest(repo.as_str(), &reference.to_string())
            .await
            .map(|(mt, b)| (mt, b.to_vec()))
            .map_err(|e| SourceError::NotFound(e.to_string()))
    }

    async fn blob(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<u8>, SourceError> {
        self.0
            .get_blob(repo.as_str(), digest)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| SourceError::NotFound(e.to_string()))
    }

    async fn layer(
        &self,
        repo: &RepoName,
        digest: &Digest,
        cache: &Path,
    ) -> Result<LayerBlob, SourceError> {
        std::fs::create_dir_all(cache)
            .map_err(|e| SourceError::Io("create download cache".into(), e))?;
        let path = cache.join(format!("{}.{}", digest.hex(), uuid::Uuid::new_v4()));
        match self.0.get_blob_to_file(repo.as_str(), digest, &path).await {
            Ok(_) => {
                let file = File::open(&path)
                    .map_err(|e| SourceError::Io(format!("open download of {digest}"), e))?;
                Ok(LayerBlob {
                    file,
                    temp: Some(path),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(match e {
                    // Writing the download failed here (a full disk, say).
                    slipway_image::client::ClientError::Io(e) => {
                        SourceError::Io(format!("download layer {digest}"), e)
                    }
                    e => SourceError::NotFound(format!("layer {digest}: {e}")),
                })
            }
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

fn source_error(image: &str, e: SourceError) -> RuntimeError {
    match e {
        SourceError::NotFound(m) => not_found(image, m),
        SourceError::Io(ctx, e) => RuntimeError::Io(ctx, e),
    }
}

/// Resolves `image` through `source`: an index picks its linux/amd64 manifest, the
/// manifest's bytes must match the digest it is asked by, and the config must be
/// linux/amd64.
pub async fn resolve(
    source: Arc<dyn ImageSource>,
    image: &ImageRef,
) -> Result<ResolvedImage, RuntimeError> {
    let name = image.to_string();
    let repo = &image.repo;
    let (mut mt, mut bytes) = source
        .manifest(repo, &image.reference)
        .await
        .map_err(|e| source_error(&name, e))?;
    let mut asked = match &image.reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => None,
    };
    if media::is_index(&mt)
        || serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v["manifests"].is_array())
    {
        if let Some(d) = &asked {
            check_digest(&bytes, d, &name)?;
        }
        let index: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::ImageInvalid(format!("{name}: {e}")))?;
        let child = pick_platform(&index, &name)?;
        (mt, bytes) = source
            .manifest(repo, &Reference::Digest(child.clone()))
            .await
            .map_err(|e| source_error(&name, e))?;
        asked = Some(child);
    }
    let _ = mt;
    let digest = match asked {
        Some(d) => {
            check_digest(&bytes, &d, &name)?;
            d
        }
        None => Digest::sha256_of(&bytes),
    };
    let (_, layers, config_digest) = parse_manifest(&bytes, &name)?;
    let config_bytes = source
        .blob(repo, &config_digest)
        .await
        .map_err(|e| source_error(&name, e))?;
    let config = check_config(&config_bytes, &config_digest, &name)?;
    Ok(ResolvedImage {
        digest,
        config,
        layers,
        source,
        repo: repo.clone(),
    })
}

/// The manifest bytes must be what the digest names (sha256 digests are checked).
fn check_digest(bytes: &[u8], digest: &Digest, image: &str) -> Result<(), RuntimeError> {
    if digest.to_string().starts_with("sha256:") && &Digest::sha256_of(bytes) != digest {
        return Err(RuntimeError::ImageInvalid(format!(
            "{image}: manifest does not match its digest {digest}"
        )));
    }
    Ok(())
}
