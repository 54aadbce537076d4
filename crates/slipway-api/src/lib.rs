//! The admin API, v1: the wire types of every `/api/v1` endpoint and a typed async
//! client that speaks http and https. The CLI talks to the server only through this
//! crate, so every shape it reads is a type checked by the compiler.
//!
//! **Architecture invariant:** this crate depends on no Slipway crate but
//! `slipway-core`, and knows nothing of how the server does its work.

pub mod auth;
pub mod client;
pub mod containers;
pub mod error;
pub mod nodes;
pub mod services;

pub use auth::AuditEntry;
pub use client::{Client, ClientConfig, ClientError, DEFAULT_SERVER};
pub use error::{ErrorBody, ErrorDetail, status_of};

use serde::{Deserialize, Serialize};

/// `POST /api/v1/gc[?dry_run=true]`: what garbage collection removed (or would).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Blobs removed, as (digest, size).
    pub blobs: Vec<(String, u64)>,
    /// Untagged manifests removed, as (repository, digest).
    pub manifests: Vec<(String, String)>,
    /// Tags retention removed, as (repository, tag, digest).
    #[serde(default)]
    pub tags: Vec<(String, String, String)>,
    /// Sum of removed blob sizes.
    pub bytes_freed: u64,
    /// Layer snapshots the runtime removed (no container and no recent
    /// revision of a service uses them), as (layer digest, size on disk).
    #[serde(default)]
    pub snapshots: Vec<(String, u64)>,
    /// Bytes the runtime freed.
    #[serde(default)]
    pub runtime_bytes_freed: u64,
}

/// `GET /api/v1/status`: the server itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// Slipway's version.
    pub version: String,
    /// The data directory.
    pub data_dir: String,
    /// Bytes of blobs stored.
    pub stored_bytes: u64,
}
