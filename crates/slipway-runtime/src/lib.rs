//! Running images as containers: layer snapshots shared by every container, an
//! overlay root filesystem per container, an OCI bundle generated with oci-spec, and
//! runc to run it, supervised with restart policies.
//!
//! Entry point: [`Runtime::open`], then [`Runtime::run`], [`Runtime::stop`],
//! [`Runtime::remove`], [`Runtime::list`]. [`Runtime::recover`] re-adopts containers
//! after a daemon restart.
//!
//! On disk, under the runtime root:
//! - `snapshots/sha256/<hex>/`: one unpacked layer, shared; its mtime is its last
//!   use, and unused ones are collected (`snapgc.rs`);
//! - `images/sha256/<hex>`: the layer digests of an image run here;
//! - `containers/<name>/`: `state.json`, `bundle/` (config.json, rootfs mount point),
//!   `upper/`, `work/`, `container.log*`;
//! - `volumes/<name>/`: named volumes, kept when containers go;
//! - `runc/`: the OCI runtime's own state.
//!
//! **Architecture invariant:** only this crate spawns container processes, mounts
//! root filesystems or writes bundles. Nothing a container does can reach outside
//! its rootfs: tar entries are confined to their layer, names are validated before
//! they become paths, and the process runs in its own pid, mount, ipc and uts
//! namespaces under a cgroup.

pub mod bundle;
mod cgroupwarm;
mod container;
mod durable;
pub mod image;
mod logs;
mod pidwatch;
mod recover;
pub mod rootfs;
pub mod runc;
mod runtime;
pub mod security;
mod snapgc;
mod snapshots;
pub mod spec;
mod supervise;
pub mod unpack;

pub use container::Secrets;
pub use runtime::{ContainerInfo, Runtime, RuntimeConfig, Status};
pub use snapgc::{SnapshotGcOptions, SnapshotGcReport, disk_used_percent};
pub use spec::{RestartPolicy, RunRequest};

use slipway_core::ErrorKind;

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A request field is invalid (the message names it).
    #[error("{0}")]
    InvalidSpec(String),
    /// The image does not exist.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// The image has no linux/amd64 variant.
    #[error("{0}")]
    NoPlatform(String),
    /// The image is malformed.
    #[error("image is invalid: {0}")]
    ImageInvalid(String),
    /// A layer is corrupt or hostile.
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    /// The OCI runtime failed or is missing.
    #[error(transparent)]
    Runc(#[from] runc::RuncError),
    /// The port is taken.
    #[error("port: {0} is already in use on this host; pick another with --port")]
    PortInUse(u16),
    /// No such container.
    #[error("no container named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("a container named {0:?} already exists: remove it first or pick another --name")]
    AlreadyExists(String),
    /// The container is running and removal was not forced.
    #[error("container {0:?} is running: stop it first, or remove it with --force")]
    Running(String),
    /// The bundle could not be generated.
    #[error("cannot generate the OCI bundle: {0}")]
    Bundle(String),
    /// Local I/O failed.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

impl RuntimeError {
    /// How this error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            // A full disk while writing a snapshot is the host's doing; other write
            // errors (a hardlink to a directory, say) come from what the layer holds.
            Self::Unpack(unpack::UnpackError::Write { source, .. })
                if io_kind(source) == ErrorKind::ResourceExhausted =>
            {
                ErrorKind::ResourceExhausted
            }
            Self::InvalidSpec(_)
            | Self::NoPlatform(_)
            | Self::ImageInvalid(_)
            | Self::Unpack(_) => ErrorKind::InvalidArgument,
            Self::ImageNotFound(_) | Self::NotFound(_) => ErrorKind::NotFound,
            Self::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Self::PortInUse(_) | Self::Running(_) => ErrorKind::FailedPrecondition,
            Self::Runc(runc::RuncError::Missing(_)) => ErrorKind::Unavailable,
            Self::Io(_, e) => io_kind(e),
            Self::Runc(_) | Self::Bundle(_) => ErrorKind::Internal,
        }
    }
}

/// A full disk (or quota) is the host running out of space; other I/O errors are
/// internal.
fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            ErrorKind::ResourceExhausted
        }
        _ => ErrorKind::Internal,
    }
}
