//! The OCI Distribution Spec v1.1 HTTP API, over [`slipway_store::Store`].
//!
//! Entry point: [`router`], which serves `/v2/…` and answers everything else under
//! it with OCI error JSON. Pushes and deletes are published as [`RegistryEvent`]s on
//! a broadcast channel; byte and upload counters are kept in [`RegistryMetrics`].
//!
//! Routing is done by hand ([`route::parse`]) because repository names contain `/`.
//! Every path segment is validated by the `slipway-core` parsers before it reaches
//! the store, and nothing is percent-decoded, so `%2e%2e` is simply an invalid name.
//!
//! **Architecture invariant:** this crate knows the OCI specs, not deployments. It
//! does no file I/O of its own except streaming blob files the store names.

mod error;
mod handlers;
pub use handlers::{Caller, CatalogFilter, RouteLabel};
mod metrics;
pub mod route;
pub mod zerocopy;

pub use error::{Code, RegistryError};
pub use metrics::RegistryMetrics;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use serde::Serialize;
use slipway_store::Store;
use tokio::sync::broadcast;

/// Limits and behaviour of the registry API.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 4 << 20,
        }
    }
}

/// What happened in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A manifest was pushed.
    Push,
    /// A manifest or tag was deleted.
    Delete,
}

/// A push or delete, published after the change is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistryEvent {
    /// Push or delete.
    pub action: Action,
    /// The repository.
    pub repository: String,
    /// The tag, when the change was made through one.
    pub tag: Option<String>,
    /// The manifest digest.
    pub digest: String,
    /// The manifest media type.
    pub media_type: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Who made the change, when authentication is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

/// Shared state of the registry handlers.
#[derive(Clone)]
pub struct Registry {
    store: Arc<Store>,
    config: RegistryConfig,
    events: broadcast::Sender<RegistryEvent>,
    metrics: Arc<RegistryMetrics>,
}

// === impl Registry ===

impl Registry {
    /// Builds the registry over `store`. Events go to `events`.
    pub fn new(
        store: Arc<Store>,
        config: RegistryConfig,
        events: broadcast::Sender<RegistryEvent>,
    ) -> Self {
        Self {
            store,
            config,
            events,
            metrics: Arc::default(),
        }
    }

    /// The byte and upload counters.
    pub fn metrics(&self) -> &Arc<RegistryMetrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn publish(
        &self,
        action: Action,
        repository: &str,
        tag: Option<String>,
        digest: String,
        media_type: String,
        principal: Option<String>,
    ) {
        let timestamp_ms = slipway_core::now_ms();
        // No subscriber is fine: events are best-effort notifications.
        let _ = self.events.send(RegistryEvent {
            action,
            repository: repository.to_owned(),
            tag,
            digest,
            media_type,
            timestamp_ms,
            principal,
        });
    }
}

/// The `/v2` router.
pub fn router(registry: Registry) -> Router {
    handlers::router(registry)
}

/// How long an upload request may take between body chunks before it is abandoned
/// (the session stays resumable).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
