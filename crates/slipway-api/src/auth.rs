//! Users, API tokens, secrets, the audit log and login, on the wire.

use serde::{Deserialize, Serialize};

/// A role on a glob of repositories or services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSpec {
    /// `repository` or `service`.
    pub kind: String,
    /// Which names (`team/*`).
    pub glob: String,
    /// `reader`, `developer`, `deployer`, `maintainer` or `admin`.
    pub role: String,
}

/// Rights, as set by `user add` and `token create`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rights {
    /// Everything, including users, tokens, secrets and the audit log.
    #[serde(default)]
    pub admin: bool,
    /// May read `/metrics`.
    #[serde(default)]
    pub metrics: bool,
    /// Per-glob roles.
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
}

/// `POST /api/v1/users`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUser {
    /// Login name.
    pub name: String,
    /// Password (8 characters or more).
    pub password: String,
    /// Rights.
    #[serde(default)]
    pub rights: Rights,
}

/// `PUT /api/v1/users/{name}/password`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPassword {
    /// The new password.
    pub password: String,
}

/// A user, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    /// Login name.
    pub name: String,
    /// Rights.
    pub rights: Rights,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
}

/// `POST /api/v1/tokens`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateToken {
    /// Unique name.
    pub name: String,
    /// Rights.
    #[serde(default)]
    pub rights: Rights,
    /// Lifetime in seconds; none never expires.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// An API token, as listed (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Id (the part after `slw_`).
    pub id: String,
    /// Name.
    pub name: String,
    /// Who created it.
    pub created_by: String,
    /// Rights.
    pub rights: Rights,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// Expiry.
    pub expires_ms: Option<u64>,
    /// Revocation time.
    pub revoked_ms: Option<u64>,
}

/// The answer to `POST /api/v1/tokens`: the token text, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    /// Use as `Authorization: Bearer …` or as a registry password.
    pub token: String,
    /// Its record.
    pub info: TokenInfo,
}

/// `PUT /api/v1/secrets/{name}`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSecret {
    /// The value.
    pub value: String,
    /// Service globs that may use it (default: all).
    #[serde(default)]
    pub services: Vec<String>,
}

/// A secret, as listed (never its value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretInfo {
    /// Name.
    pub name: String,
    /// Bumped by every change of value.
    pub version: u64,
    /// Service globs that may use it.
    pub services: Vec<String>,
    /// Milliseconds since the epoch.
    pub updated_ms: u64,
    /// Services that rolled to a new revision because the value changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled: Vec<String>,
}

/// `GET /api/v1/whoami`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The principal.
    pub name: String,
    /// How it authenticated (`password`, `api-token`, …).
    pub via: String,
    /// Whether authentication is on at all.
    pub auth_enabled: bool,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// Who (`alice`, `token:ci`, `anonymous`).
    pub principal: String,
    /// Source address.
    pub source: String,
    /// What (`push`, `deploy`, `login`, `user.add`, …).
    pub action: String,
    /// On what (`repository:team/app:v1`, `service:web`, `user:bob`).
    pub target: String,
    /// `ok`, `denied` or `failed`.
    pub result: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// The registry token endpoint's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The JWT (Docker's name).
    pub token: String,
    /// The JWT (OAuth2's name).
    pub access_token: String,
    /// Seconds.
    pub expires_in: u64,
    /// RFC 3339.
    pub issued_at: String,
    /// A refresh (identity) token, when offline access was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}
