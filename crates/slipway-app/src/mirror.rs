//! Pull-through mirrors (`[[registry.mirror]]`): repositories under a name prefix
//! are copies of an upstream registry's. A pull of something not here yet fetches
//! it from upstream and stores it (manifests by tag are fetched again once older
//! than `revalidate`), then the registry serves it as its own; later pulls are
//! local, and still work when the upstream is down. Mirrored repositories are
//! read-only.
//!
//! It runs in front of the registry's routes, after the auth gate, so pulling
//! through a mirror needs the same rights as any pull.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{Method, StatusCode};
use serde::Deserialize;
use slipway_core::{Digest, Reference, RepoName};
use slipway_image::client::{ClientError, RegistryClient};
use slipway_registry::route::{self, Route};
use slipway_registry::{Code, RegistryError};
use slipway_store::Store;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `[[registry.mirror]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Repositories named `PREFIX/…` mirror the upstream's `…`.
    pub prefix: String,
    /// The upstream registry: `HOST:PORT` or `http://HOST:PORT`.
    pub upstream: String,
    /// A bearer token for the upstream, if it needs one.
    #[serde(default)]
    pub token: Option<String>,
    /// Tags are fetched again once their copy is older than this. Default 5m.
    #[serde(default = "default_revalidate")]
    pub revalidate: slipway_core::service::Dur,
}

fn default_revalidate() -> slipway_core::service::Dur {
    slipway_core::service::Dur(Duration::from_secs(300))
}

struct Mirror {
    prefix: String,
    client: RegistryClient,
    revalidate: Duration,
}

/// Every mirror, and when each mirrored tag was last fetched.
pub(crate) struct Mirrors {
    list: Vec<Mirror>,
    store: Arc<Store>,
    fetched: Mutex<HashMap<(String, String), Instant>>,
}

/// Why a mirror could not get something.
fn upstream_error(m: &Mirror, e: &ClientError) -> RegistryError {
    RegistryError::new(
        Code::Unknown,
        format!(
            "the upstream of mirror {:?} ({}) failed: {e}",
            m.prefix,
            m.client.base()
        ),
    )
    .with_status(StatusCode::BAD_GATEWAY)
}

fn not_found(e: &ClientError) -> bool {
    matches!(e, ClientError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
}

fn store_error(e: &slipway_store::StoreError) -> RegistryError {
    RegistryError::new(Code::Unknown, format!("storing a mirrored copy: {e}"))
        .with_status(StatusCode::INTERNAL_SERVER_ERROR)
}

impl Mirrors {
    pub(crate) fn new(configs: &[MirrorConfig], store: Arc<Store>) -> Arc<Self> {
        Arc::new(Self {
            list: configs
                .iter()
                .map(|c| Mirror {
                    prefix: c.prefix.trim_end_matches('/').to_owned(),
                    client: RegistryClient::new(&c.upstream).with_token(c.token.clone()),
                    revalidate: c.revalidate.0,
                })
                .collect(),
            store,
            fetched: Mutex::default(),
        })
    }

    /// The mirror `repo` is under, and the upstream's name for it.
    fn of<'a>(&'a self, repo: &RepoName) -> Option<(&'a Mirror, String)> {
        self.list.iter().find_map(|m| {
            repo.as_str()
                .strip_prefix(&m.prefix)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|upstream| (m, upstream.to_owned()))
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> slipway_store::Result<T> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| {
                RegistryError::new(Code::Unknown, format!("mirror task failed: {e}"))
                    .with_status(StatusCode::INTERNAL_SERVER_ERROR)
            })?
            .map_err(|e| store_error(&e))
    }

    /// Makes sure the manifest `repo:reference` is here, fetching it if needed.
    async fn manifest(
        &self,
        m: &Mirror,
        upstream: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(), RegistryError> {
        let (r, rr) = (repo.clone(), reference.clone());
        let here = self
            .blocking(move |s| Ok(s.stat_manifest(&r, &rr).is_ok()))
            .await?;
        let key = (repo.to_string(), reference.to_string());
        let fresh = match reference {
            // Content by digest never changes.
            Reference::Digest(_) => here,
            Reference::Tag(_) => {
                here && lock(&self.fetched)
                    .get(&key)
                    .is_some_and(|t| t.elapsed() < m.revalidate)
            }
        };
        if fresh {
            return Ok(());
        }
        let (media_type, bytes) = match m
            .client
            .get_manifest(upstream, &reference.to_string())
            .await
        {
            Ok(v) => v,
            // Gone upstream, or the upstream is down: what is here still serves.
            Err(e) if here => {
                tracing::warn!(mirror = %m.prefix, %repo, %reference, "keeping the mirrored copy: {e}");
                return Ok(());
            }
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(upstream_error(m, &e)),
        };
        let (r, rr) = (repo.clone(), reference.clone());
        self.blocking(move |s| s.put_mirrored_manifest(&r, &rr, &bytes, Some(&media_type)))
            .await?;
        lock(&self.fetched).insert(key, Instant::now());
        Ok(())
    }

    /// Makes sure the blob `repo@digest` is here, fetching it if needed.
    async fn blob(
        &self,
        m: &Mirror,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        let (r, d) = (repo.clone(), digest.clone());
        if self
            .blocking(move |s| Ok(s.stat_blob(&r, &d).is_ok()))
            .await?
        {
            return Ok(());
        }
        let tmp = self
            .store
            .root()
            .join("uploads")
            .join(format!("mirror-{}", uuid::Uuid::new_v4().simple()));
        let fetched = m.client.get_blob_to_file(upstream, digest, &tmp).await;
        if let Err(e) = fetched {
            let _ = std::fs::remove_file(&tmp);
            return if not_found(&e) {
                Ok(())
            } else {
                Err(upstream_error(m, &e))
            };
        }
        // Into the store like any upload: the digest is checked before it is
        // committed and linked.
        let (r, d, path) = (repo.clone(), digest.clone(), tmp.clone());
        let stored = self
            .blocking(move |s| {
                let id = s.start_upload(&r)?;
                let mut w = s.upload_writer(&r, &id.to_string(), None)?;
                let mut f = std::fs::File::open(&path)
                    .map_err(|e| slipway_store::StoreError::io("read a mirrored blob", e))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f
                        .read(&mut buf)
                        .map_err(|e| slipway_store::StoreError::io("read a mirrored blob", e))?;
                    if n == 0 {
                        break;
                    }
                    w.write(&buf[..n])?;
                }
                s.finish_upload(&r, w, &d)
            })
            .await;
        let _ = std::fs::remove_file(&tmp);
        stored.map(|_| ())
    }
}

/// The layer in front of the registry's routes.
pub(crate) async fn layer(
    State(mirrors): State<Arc<Mirrors>>,
    req: Request,
    next: Next,
) -> Response {
    if mirrors.list.is_empty() {
        return next.run(req).await;
    }
    let Some(rest) = req.uri().path().strip_prefix("/v2/") else {
        return next.run(req).await;
    };
    let Ok(route) = route::parse(rest) else {
        return next.run(req).await;
    };
    let repo = match &route {
        Route::Manifest(r, _)
        | Route::Blob(r, _)
        | Route::Tags(r)
        | Route::Referrers(r, _)
        | Route::UploadStart(r)
        | Route::Upload(r, _) => r.clone(),
        _ => return next.run(req).await,
    };
    let Some((m, upstream)) = mirrors.of(&repo) else {
        return next.run(req).await;
    };
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read {
        return RegistryError::new(
            Code::Denied,
            format!(
                "{repo} is a read-only mirror of {} ({}): push to the upstream",
                upstream,
                m.client.base()
            ),
        )
        .into_response();
    }
    let ensured = match &route {
        Route::Manifest(_, reference) => mirrors.manifest(m, &upstream, &repo, reference).await,
        Route::Blob(_, digest) => mirrors.blob(m, &upstream, &repo, digest).await,
        _ => Ok(()),
    };
    match ensured {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}
