//! Domain types shared by every Slipway crate.
//!
//! This crate owns the vocabulary: [`Digest`], [`RepoName`], [`Tag`], [`Reference`],
//! the OCI media types in [`media`], [`ErrorKind`] (how every error is classified once)
//! and small value parsers such as [`parse_duration`].
//!
//! **Architecture invariant:** this crate does no I/O and knows no HTTP stack. Every
//! value here that can become part of a file path is validated on construction, so a
//! `Digest` or `RepoName` in hand is always safe to join onto a directory.

mod digest;
mod duration;
mod error;
pub mod form;
pub mod glob;
pub mod media;
mod name;
pub mod placement;
pub mod revision;
pub mod service;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use duration::{DurationError, format_duration, now_ms, parse_duration};
pub use error::ErrorKind;
pub use name::{NameError, Reference, ReferenceError, RepoName, Tag, tag_version};
