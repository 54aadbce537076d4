//! `/api/v1/containers`: running images as containers. The runtime persists the
//! same [`ContainerInfo`] it reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// When a container is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    #[default]
    No,
    /// When it exits non-zero (or is killed).
    OnFailure,
    /// Whenever it exits, unless stopped by the user.
    Always,
}

impl RestartPolicy {
    /// Parses `no`, `on-failure` or `always`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "no" => Ok(Self::No),
            "on-failure" => Ok(Self::OnFailure),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "restart: {other:?} is not one of no, on-failure, always"
            )),
        }
    }
}

/// `POST /api/v1/containers`: a request to run a container.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Image reference, e.g. `hello:1.0.0` or `127.0.0.1:5000/hello:1.0.0`.
    pub image: String,
    /// Container name; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// `K=V` pairs, added to the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// The port the workload listens on (host network); exported as `$PORT`.
    #[serde(default)]
    pub port: Option<u16>,
    /// Memory limit, e.g. `64m`, `1g`, or bytes.
    #[serde(default)]
    pub memory: Option<String>,
    /// CPU limit, e.g. `0.5`.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[serde(default)]
    pub pids: Option<i64>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Mount the root filesystem read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Named volumes: `name:/path/in/container`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Replace the image's entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Replace the image's command.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Labels, for the deploy controller's bookkeeping.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The signal `stop` sends first (default: the image's `StopSignal`, else
    /// SIGTERM).
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Capabilities added to Docker's default set (`NET_ADMIN`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities dropped from it (`NET_RAW`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Run in a user namespace: the container's root is an unprivileged host
    /// uid (the runtime's `userns` range), on a private, shifted copy of the image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub userns: bool,
}

/// A container's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Prepared, process not started yet.
    Created,
    /// The process is running.
    Running,
    /// Exited; waiting out the backoff before the next start.
    Restarting,
    /// Exited and will not be restarted.
    Exited,
    /// Stopped by the user.
    Stopped,
}

/// How a container's root filesystem was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootfsKind {
    /// An overlay mount over the snapshots.
    Overlay,
    /// A private copy.
    Copy,
}

/// What the API reports about a container (also the runtime's persisted state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// Name (unique).
    pub name: String,
    /// The OCI runtime's container id (and cgroup leaf): unique per creation.
    pub id: String,
    /// The request it was created from.
    pub spec: RunRequest,
    /// The manifest digest it runs.
    pub image_digest: String,
    /// State.
    pub status: Status,
    /// Host pid of the container's init, while running.
    pub pid: Option<u32>,
    /// Last exit code (128+N for signal N), if known.
    pub exit_code: Option<i32>,
    /// Whether the last exit was an OOM kill.
    pub oom_killed: bool,
    /// How many times it was restarted.
    pub restart_count: u32,
    /// The current backoff before the next restart, in ms.
    pub backoff_ms: Option<u64>,
    /// Last start, ms since the epoch.
    pub started_at_ms: Option<u64>,
    /// Last exit, ms since the epoch.
    pub finished_at_ms: Option<u64>,
    /// How the rootfs was made.
    pub rootfs: RootfsKind,
    /// A human note on the last transition.
    pub message: Option<String>,
    /// The signal `stop` sends first (resolved at creation: the request's, the
    /// image's `StopSignal`, or SIGTERM), as a number.
    #[serde(default)]
    pub stop_signal: Option<i32>,
}
