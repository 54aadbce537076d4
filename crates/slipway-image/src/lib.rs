//! Building OCI images without a daemon ([`pack`]) and talking to OCI registries over
//! HTTP ([`client`]).
//!
//! Packing is deterministic: entries are sorted, mtimes fixed to the Unix epoch (or
//! `SOURCE_DATE_EPOCH`), ownership normalised to 0:0 and compression headers carry no
//! timestamps, so the same inputs always give the same digests.
//!
//! **Architecture invariant:** this crate knows OCI images, not containers; the
//! runtime and a future Dockerfile builder call it as a library.

pub mod client;
pub mod pack;
pub mod reference;

pub use pack::{
    Compression, ConfigOverrides, Input, Layer, PackError, build_layer, image_config,
    image_manifest,
};
pub use reference::ImageRef;
