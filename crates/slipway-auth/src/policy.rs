//! Roles, grants and what they allow.
//!
//! A principal holds grants: a role on a repository glob or a service glob. For a
//! given name, the longest matching glob decides (ties go to the higher role), so
//! `team/* = reader` plus `team/app = developer` lets one push `team/app` and
//! only pull the rest of `team/`. Containers are named in the service namespace:
//! service globs govern them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::glob;

/// A named bundle of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Pull; read service status and events.
    Reader,
    /// Push and pull; read services.
    Developer,
    /// Pull; deploy, roll back, scale, pause, resume, promote, abort; read logs.
    Deployer,
    /// Push, pull, delete; everything a deployer does, remove services, run containers.
    Maintainer,
    /// Everything, including users, tokens, secrets and the audit log.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Self; 5] = [
        Self::Reader,
        Self::Developer,
        Self::Deployer,
        Self::Maintainer,
        Self::Admin,
    ];

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Developer => "developer",
            Self::Deployer => "deployer",
            Self::Maintainer => "maintainer",
            Self::Admin => "admin",
        }
    }

    fn allows(self, kind: Kind, action: Action) -> bool {
        use Action::*;
        match (kind, self) {
            (_, Self::Admin) => true,
            (Kind::Repository, Self::Reader | Self::Deployer) => action == Pull,
            (Kind::Repository, Self::Developer) => matches!(action, Pull | Push),
            (Kind::Repository, Self::Maintainer) => matches!(action, Pull | Push | Delete),
            (Kind::Service, Self::Reader | Self::Developer) => action == Read,
            (Kind::Service, Self::Deployer) => {
                matches!(action, Read | Deploy | Rollback | Scale | Control | Logs)
            }
            (Kind::Service, Self::Maintainer) => matches!(
                action,
                Read | Deploy | Rollback | Scale | Control | Logs | Remove | Run
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: use reader, developer, deployer, maintainer or admin")
            })
    }
}

/// What a grant's glob names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Registry repositories.
    Repository,
    /// Services, and containers by name.
    Service,
}

/// Something a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read manifests, blobs and tags of a repository.
    Pull,
    /// Upload blobs and manifests.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
    /// Read a service's or container's status, history and events.
    Read,
    /// Deploy a new revision.
    Deploy,
    /// Roll back.
    Rollback,
    /// Change the replica count.
    Scale,
    /// Pause, resume, promote, abort.
    Control,
    /// Read logs.
    Logs,
    /// Remove a service.
    Remove,
    /// Run, stop and remove containers.
    Run,
}

impl Action {
    /// The action's name (Distribution's for the registry ones).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
            Self::Delete => "delete",
            Self::Read => "read",
            Self::Deploy => "deploy",
            Self::Rollback => "rollback",
            Self::Scale => "scale",
            Self::Control => "control",
            Self::Logs => "logs",
            Self::Remove => "remove",
            Self::Run => "run",
        }
    }

    /// The registry action a scope string names.
    pub fn from_registry(s: &str) -> Option<Self> {
        match s {
            "pull" => Some(Self::Pull),
            "push" => Some(Self::Push),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// A role on the names a glob matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// Repositories or services.
    pub kind: Kind,
    /// Which names.
    pub glob: String,
    /// What may be done to them.
    pub role: Role,
}

impl Grant {
    /// Parses `GLOB=ROLE` for `kind`.
    pub fn parse(kind: Kind, s: &str) -> Result<Self, String> {
        let (glob, role) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?}: write GLOB=ROLE, for example 'team/*=developer'"))?;
        glob::validate(glob)?;
        Ok(Self {
            kind,
            glob: glob.to_owned(),
            role: role.parse()?,
        })
    }
}

/// What a principal may do: its grants, plus the system-wide rights.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Everything, everywhere.
    #[serde(default)]
    pub admin: bool,
    /// May read `/metrics`.
    #[serde(default)]
    pub metrics: bool,
    /// Per-glob roles.
    #[serde(default)]
    pub grants: Vec<Grant>,
}

impl Permissions {
    /// Everything.
    pub fn admin() -> Self {
        Self {
            admin: true,
            metrics: true,
            grants: Vec::new(),
        }
    }

    /// The role the longest glob matching `name` gives, if any.
    pub fn role_for(&self, kind: Kind, name: &str) -> Option<Role> {
        if self.admin {
            return Some(Role::Admin);
        }
        self.grants
            .iter()
            .filter(|g| g.kind == kind && glob::matches(&g.glob, name))
            .max_by_key(|g| (g.glob.len(), g.role))
            .map(|g| g.role)
    }

    /// Whether `action` on `name` is allowed.
    pub fn allows(&self, kind: Kind, name: &str, action: Action) -> bool {
        self.role_for(kind, name)
            .is_some_and(|r| r.allows(kind, action))
    }

    /// Whether the whole catalog may be listed: admins, and whoever may pull
    /// every repository (a reader grant on `*`).
    pub fn allows_catalog(&self) -> bool {
        self.admin
            || self
                .grants
                .iter()
                .any(|g| g.kind == Kind::Repository && g.glob == "*")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(kind: Kind, s: &str) -> Grant {
        Grant::parse(kind, s).expect("grant")
    }

    #[test]
    fn the_longest_matching_glob_decides() {
        let p = Permissions {
            grants: vec![
                grant(Kind::Repository, "team/*=reader"),
                grant(Kind::Repository, "team/app=developer"),
                grant(Kind::Service, "app=deployer"),
            ],
            ..Permissions::default()
        };
        assert!(p.allows(Kind::Repository, "team/app", Action::Push));
        assert!(p.allows(Kind::Repository, "team/other", Action::Pull));
        assert!(!p.allows(Kind::Repository, "team/other", Action::Push));
        assert!(!p.allows(Kind::Repository, "elsewhere", Action::Pull));
        assert!(p.allows(Kind::Service, "app", Action::Deploy));
        assert!(!p.allows(Kind::Service, "app", Action::Remove));
        assert!(!p.allows(Kind::Service, "other", Action::Read));
        assert!(!p.allows_catalog());
        // A narrower glob can also take rights away.
        let p = Permissions {
            grants: vec![
                grant(Kind::Repository, "*=maintainer"),
                grant(Kind::Repository, "vendor/*=reader"),
            ],
            ..Permissions::default()
        };
        assert!(p.allows(Kind::Repository, "mine", Action::Delete));
        assert!(!p.allows(Kind::Repository, "vendor/x", Action::Push));
        assert!(p.allows_catalog());
    }

    #[test]
    fn each_role_allows_what_its_documentation_says() {
        use Action::*;
        let repo = |r: Role| {
            [Pull, Push, Delete]
                .into_iter()
                .filter(|a| r.allows(Kind::Repository, *a))
                .collect::<Vec<_>>()
        };
        assert_eq!(repo(Role::Reader), [Pull]);
        assert_eq!(repo(Role::Developer), [Pull, Push]);
        assert_eq!(repo(Role::Deployer), [Pull]);
        assert_eq!(repo(Role::Maintainer), [Pull, Push, Delete]);
        let svc = |r: Role| {
            [Read, Deploy, Rollback, Scale, Control, Logs, Remove, Run]
                .into_iter()
                .filter(|a| r.allows(Kind::Service, *a))
                .count()
        };
        assert_eq!(svc(Role::Reader), 1);
        assert_eq!(svc(Role::Developer), 1);
        assert_eq!(svc(Role::Deployer), 6);
        assert_eq!(svc(Role::Maintainer), 8);
        assert_eq!(svc(Role::Admin), 8);
    }

    #[test]
    fn grants_parse_glob_equals_role_and_name_the_mistake() {
        assert_eq!(
            grant(Kind::Service, "web-*=deployer"),
            Grant {
                kind: Kind::Service,
                glob: "web-*".into(),
                role: Role::Deployer
            }
        );
        assert!(Grant::parse(Kind::Service, "web").is_err());
        assert!(
            Grant::parse(Kind::Service, "web=owner")
                .expect_err("role")
                .contains("unknown role")
        );
        assert!(Grant::parse(Kind::Service, "=reader").is_err());
    }
}
