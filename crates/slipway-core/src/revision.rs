//! The vocabulary of a service's life: how a command ended, what happened to a
//! revision, and what the service's controller is doing. Shared by the controller
//! (which decides them) and the admin API (which reports them).

use serde::{Deserialize, Serialize};

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "kebab-case")]
pub enum Outcome {
    /// Done: for a deploy, the new revision serves all traffic.
    Done,
    /// The new revision failed; the previous one serves again.
    RolledBack(String),
    /// It failed and there was nothing to roll back to.
    Failed(String),
    /// A gate refused the revision before anything started.
    Rejected(String),
}

/// What happened to a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevisionStatus {
    /// Being rolled out.
    Progressing,
    /// Serving.
    Active,
    /// Replaced by a newer revision.
    Superseded,
    /// Rolled back.
    RolledBack,
    /// Failed with nothing to roll back to.
    Failed,
    /// Refused by a deploy gate; never started.
    Rejected,
}

impl RevisionStatus {
    /// The word `history` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "progressing",
            Self::Active => "active",
            Self::Superseded => "superseded",
            Self::RolledBack => "rolled-back",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

/// What a service's controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Created, nothing deployed yet.
    #[default]
    New,
    /// Serving its active revision; nothing in progress.
    Idle,
    /// A rollout is in progress.
    RollingOut,
    /// A rollout is held by `pause`.
    Paused,
    /// Replacing failed instances.
    Healing,
    /// Changing the number of instances.
    Scaling,
    /// Converging after a daemon restart.
    Recovering,
    /// Being removed.
    Removing,
}

impl Phase {
    /// The word `status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Idle => "idle",
            Self::RollingOut => "rolling-out",
            Self::Paused => "paused",
            Self::Healing => "healing",
            Self::Scaling => "scaling",
            Self::Recovering => "recovering",
            Self::Removing => "removing",
        }
    }
}
