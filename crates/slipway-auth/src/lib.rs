//! Who may do what: users, roles, API tokens, registry tokens, sealed secrets.
//!
//! [`Auth`] is the one owner of `<data>/auth.redb` and the keys under
//! `<data>/keys/`. It turns presented [`Credentials`] into a [`Principal`],
//! issues Distribution-style registry JWTs for the scopes a principal may have,
//! and answers [`Principal::allows`]. It knows nothing of HTTP: `slipway-app`
//! maps routes to actions and answers 401/403.
//!
//! **Invariants.** Passwords and token secrets are never stored or logged in
//! clear: passwords as argon2id, token secrets as SHA-256, secret values sealed
//! under a key kept outside the database. Every comparison of a secret is
//! constant-time. An unknown user and a wrong password get the same answer.

pub mod db;
pub use slipway_core::glob;
pub mod header;
pub mod jwt;
pub mod limiter;
pub mod opaque;
pub mod password;
pub mod policy;
pub mod scope;
pub mod sealed;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

pub use db::{AuthDb, DbError, SecretRecord, TokenRecord, UserRecord};
pub use header::Credentials;
pub use policy::{Action, Grant, Kind, Permissions, Role};
pub use scope::Access;

/// Writes a private file (mode 0600) durably: temp file, fsync, rename, fsync dir.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How authentication behaves.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The `service` of challenges and the `aud` of tokens.
    pub service: String,
    /// Registry token lifetime.
    pub token_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
    /// What anonymous callers may do.
    pub anonymous: Permissions,
    /// Failed logins allowed per address and per user within `limit_window`.
    pub limit_failures: usize,
    /// The window of the failed-login limit.
    pub limit_window: Duration,
    /// Where the sealing key of secrets lives (apart from the database).
    pub secrets_key: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            service: "slipway".into(),
            token_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(90 * 24 * 3600),
            anonymous: Permissions::default(),
            limit_failures: 10,
            limit_window: Duration::from_secs(60),
            secrets_key: None,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `alice`, `token:ci`, or `anonymous`.
    pub name: String,
    /// How it authenticated.
    pub via: Via,
    rights: Rights,
}

/// How a principal authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No credentials.
    Anonymous,
    /// A password.
    Password,
    /// An API token.
    ApiToken,
    /// A refresh token.
    RefreshToken,
    /// A registry JWT.
    RegistryToken,
    /// Authentication is off.
    Unrestricted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rights {
    Permissions(Permissions),
    /// A registry JWT grants exactly its access claim.
    Access(Vec<Access>),
}

impl Principal {
    /// The caller when authentication is off: allowed everything.
    pub fn unrestricted() -> Self {
        Self {
            name: "anonymous".into(),
            via: Via::Unrestricted,
            rights: Rights::Permissions(Permissions::admin()),
        }
    }

    /// A principal with `permissions`, for tests and the trigger path.
    pub fn with_permissions(name: &str, via: Via, permissions: Permissions) -> Self {
        Self {
            name: name.to_owned(),
            via,
            rights: Rights::Permissions(permissions),
        }
    }

    /// Whether the caller presented no credentials.
    pub fn is_anonymous(&self) -> bool {
        self.via == Via::Anonymous
    }

    /// Whether `action` on the repository or service `name` is allowed.
    pub fn allows(&self, kind: Kind, name: &str, action: Action) -> bool {
        match &self.rights {
            Rights::Permissions(p) => p.allows(kind, name, action),
            Rights::Access(access) => {
                kind == Kind::Repository
                    && access.iter().any(|a| {
                        a.kind == "repository"
                            && a.name == name
                            && a.actions.iter().any(|x| x == action.as_str() || x == "*")
                    })
            }
        }
    }

    /// Whether the whole catalog may be listed.
    pub fn allows_catalog(&self) -> bool {
        match &self.rights {
            Rights::Permissions(p) => p.allows_catalog(),
            Rights::Access(access) => access
                .iter()
                .any(|a| a.kind == "registry" && a.name == "catalog"),
        }
    }

    /// Whether this is an administrator (users, tokens, secrets, audit, gc).
    pub fn is_admin(&self) -> bool {
        matches!(&self.rights, Rights::Permissions(p) if p.admin)
    }

    /// Whether `/metrics` may be read.
    pub fn allows_metrics(&self) -> bool {
        matches!(&self.rights, Rights::Permissions(p) if p.admin || p.metrics)
    }

    /// The access a registry token for `requested` scopes may carry: the
    /// intersection of what was asked and what is allowed.
    pub fn grant(&self, requested: &[Access]) -> Vec<Access> {
        let mut out = Vec::new();
        for req in requested {
            let actions: Vec<String> = match req.kind.as_str() {
                "repository" => {
                    let wants = |a: Action| req.actions.iter().any(|x| x == a.as_str() || x == "*");
                    [Action::Pull, Action::Push, Action::Delete]
                        .into_iter()
                        .filter(|a| wants(*a) && self.allows(Kind::Repository, &req.name, *a))
                        .map(|a| a.as_str().to_owned())
                        .collect()
                }
                "registry" if req.name == "catalog" && self.allows_catalog() => {
                    vec!["*".to_owned()]
                }
                _ => Vec::new(),
            };
            if !actions.is_empty() {
                out.push(Access {
                    kind: req.kind.clone(),
                    name: req.name.clone(),
                    actions,
                });
            }
        }
        out
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Bad, unknown, expired or revoked credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Too many failed logins.
    #[error("too many failed logins: retry in {} s", .0.as_secs().max(1))]
    RateLimited(Duration),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Invalid input to a management call (field, message).
    #[error("{1}")]
    Invalid(&'static str, String),
    /// Already exists.
    #[error("{0}")]
    Exists(String),
    /// Unknown name.
    #[error("{0}")]
    NotFound(String),
    /// Not in the current state (removing the last admin).
    #[error("{0}")]
    Refused(String),
}

/// A registry token answer.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// Its lifetime.
    pub expires_in: Duration,
    /// What it grants.
    pub access: Vec<Access>,
}

/// What a new API token may do and until when.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Unique name.
    pub name: String,
    /// Its rights.
    pub permissions: Permissions,
    /// Lifetime; `None` never expires.
    pub ttl: Option<Duration>,
}

/// The owner of users, tokens, keys and secrets.
pub struct Auth {
    db: AuthDb,
    signer: jwt::Signer,
    seal: sealed::SealKey,
    limiter: limiter::Limiter,
    config: AuthConfig,
    /// Recently verified Basic credentials, so that a client sending Basic on
    /// every request does not pay argon2 each time. Keyed by a salted hash of
    /// user and password; valid while the user's stored hash is unchanged.
    verified: Mutex<HashMap<[u8; 32], (String, Instant)>>,
    salt: [u8; 16],
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth")
    }
}

/// A valid argon2id hash of nothing anyone knows, verified for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2xpcHdheXNsaXB3YXk$2pVPEOdlLcyw5TnOrEYsXhHZcckAJlaTeRElS6bc+hY";

const VERIFIED_TTL: Duration = Duration::from_secs(60);

fn invalid_name(field: &'static str, name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(
            field,
            format!(
                "{field}: {name:?} is not a valid name: use 1-64 letters, digits, '.', '_', '-' or '@'"
            ),
        ))
    }
}

impl Auth {
    /// Opens `<data>/auth.redb` and the keys under `<data>/keys/`.
    pub fn open(data_dir: &Path, config: AuthConfig) -> Result<Self, AuthError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| DbError::Other(format!("cannot create {}: {e}", data_dir.display())))?;
        let db = AuthDb::open(&data_dir.join("auth.redb"))?;
        let keys = data_dir.join("keys");
        let signer = jwt::Signer::load_or_create(&keys.join("registry-token.ed25519.pk8"))
            .map_err(|e| DbError::Other(e.to_string()))?;
        let seal_path = config
            .secrets_key
            .clone()
            .unwrap_or_else(|| keys.join("secrets.key"));
        let seal = sealed::SealKey::load_or_create(&seal_path)
            .map_err(|e| DbError::Other(format!("secrets key {}: {e}", seal_path.display())))?;
        let limiter = limiter::Limiter::new(config.limit_failures, config.limit_window);
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&opaque::random_bytes(16));
        Ok(Self {
            db,
            signer,
            seal,
            limiter,
            config,
            verified: Mutex::default(),
            salt,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The database.
    pub fn db(&self) -> &AuthDb {
        &self.db
    }

    /// The published keys.
    pub fn jwks(&self) -> serde_json::Value {
        self.signer.jwks()
    }

    /// Whether any user exists.
    pub fn has_users(&self) -> Result<bool, AuthError> {
        Ok(self.db.has_users()?)
    }

    /// The anonymous caller.
    pub fn anonymous(&self) -> Principal {
        Principal {
            name: "anonymous".into(),
            via: Via::Anonymous,
            rights: Rights::Permissions(self.config.anonymous.clone()),
        }
    }

    /// Turns credentials into a principal. `peer` is the source address, for
    /// the failed-login limit.
    pub fn authenticate(&self, creds: &Credentials, peer: IpAddr) -> Result<Principal, AuthError> {
        let ip_key = format!("ip:{peer}");
        match creds {
            Credentials::Basic { user, password } => {
                if opaque::parse(password).is_some() {
                    // `docker login -u anything -p <token>`.
                    return self.opaque(password, &ip_key);
                }
                self.password_login(user, password, &ip_key)
            }
            Credentials::Bearer(t) if jwt::looks_like_jwt(t) => {
                let claims = self
                    .signer
                    .verify(t, &self.config.service, now_ms() / 1000)
                    .map_err(|e| AuthError::Unauthenticated(e.to_string()))?;
                Ok(Principal {
                    name: if claims.sub.is_empty() {
                        "anonymous".into()
                    } else {
                        claims.sub
                    },
                    via: Via::RegistryToken,
                    rights: Rights::Access(claims.access),
                })
            }
            Credentials::Bearer(t) => self.opaque(t, &ip_key),
        }
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn password_login(
        &self,
        user: &str,
        password: &str,
        ip_key: &str,
    ) -> Result<Principal, AuthError> {
        let keys = [ip_key.to_owned(), format!("user:{user}")];
        let now = Instant::now();
        self.limiter
            .check(&keys, now)
            .map_err(AuthError::RateLimited)?;
        let record = self.db.user(user)?;
        let key = self.cache_key(user, password);
        if let Some(r) = &record {
            let cached = self
                .verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .filter(|(h, at)| *h == r.hash && at.elapsed() < VERIFIED_TTL)
                .is_some();
            if cached {
                return Ok(self.user_principal(r, Via::Password));
            }
        }
        // Verify against a dummy hash for unknown users, so that timing does not
        // tell which names exist.
        let ok = password::verify(
            password,
            record.as_ref().map_or(DUMMY_HASH, |r| r.hash.as_str()),
        );
        let Some(mut record) = record.filter(|_| ok) else {
            self.limiter.fail(&keys, now);
            tracing::info!(user = %user, source = %ip_key, "failed login");
            return Err(AuthError::Unauthenticated(
                "wrong user name or password".into(),
            ));
        };
        self.limiter.clear(&keys[1]);
        if password::needs_rehash(&record.hash)
            && let Ok(h) = password::hash(password)
        {
            record.hash = h;
            self.db.update_user(&record)?;
        }
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 10_000 {
            cache.retain(|_, (_, at)| at.elapsed() < VERIFIED_TTL);
        }
        cache.insert(key, (record.hash.clone(), Instant::now()));
        Ok(self.user_principal(&record, Via::Password))
    }

    fn user_principal(&self, r: &UserRecord, via: Via) -> Principal {
        Principal {
            name: r.name.clone(),
            via,
            rights: Rights::Permissions(r.permissions.clone()),
        }
    }

    fn opaque(&self, token: &str, ip_key: &str) -> Result<Principal, AuthError> {
        // Token secrets are 256 random bits: nothing to brute-force, so a valid
        // token is never held back by its address's failed logins (which would
        // let one bad client on a shared address lock everyone out). Failures
        // still count against the address for password logins.
        let keys = [ip_key.to_owned()];
        let now = Instant::now();
        let refused = || {
            self.limiter.fail(&keys, now);
            AuthError::Unauthenticated("the token is invalid, expired or revoked".into())
        };
        let Some((kind, id, secret)) = opaque::parse(token) else {
            return Err(refused());
        };
        let Some(rec) = self.db.token(id)? else {
            return Err(refused());
        };
        let kind_ok = match kind {
            opaque::TokenKind::Api => rec.kind == "api",
            opaque::TokenKind::Refresh => rec.kind == "refresh",
        };
        if !kind_ok || !opaque::verify(secret, &rec.hash) || !rec.usable(now_ms()) {
            return Err(refused());
        }
        match kind {
            opaque::TokenKind::Api => Ok(Principal {
                name: format!("token:{}", rec.name),
                via: Via::ApiToken,
                rights: Rights::Permissions(rec.permissions),
            }),
            opaque::TokenKind::Refresh => {
                let user = self.db.user(&rec.name)?.ok_or_else(refused)?;
                Ok(self.user_principal(&user, Via::RefreshToken))
            }
        }
    }

    /// The current rights of a principal by name (`alice`, `token:ci`), as a
    /// push trigger re-checks them; `None` if it no longer exists.
    pub fn principal_named(&self, name: &str) -> Result<Option<Principal>, AuthError> {
        if name == "anonymous" {
            return Ok(Some(self.anonymous()));
        }
        if let Some(token) = name.strip_prefix("token:") {
            let now = now_ms();
            return Ok(self
                .db
                .tokens()?
                .into_iter()
                .find(|t| t.kind == "api" && t.name == token && t.usable(now))
                .map(|t| Principal {
                    name: name.to_owned(),
                    via: Via::ApiToken,
                    rights: Rights::Permissions(t.permissions),
                }));
        }
        Ok(self
            .db
            .user(name)?
            .map(|u| self.user_principal(&u, Via::Password)))
    }

    /// Signs a registry token for `principal` granting what it may have of
    /// `requested`.
    pub fn issue(&self, principal: &Principal, requested: &[Access]) -> IssuedToken {
        let now = now_ms() / 1000;
        let access = principal.grant(requested);
        let claims = jwt::Claims {
            iss: self.config.service.clone(),
            sub: if principal.is_anonymous() {
                String::new()
            } else {
                principal.name.clone()
            },
            aud: self.config.service.clone(),
            exp: now + self.config.token_ttl.as_secs(),
            nbf: now,
            iat: now,
            jti: opaque::random_id(),
            access: access.clone(),
        };
        IssuedToken {
            token: self.signer.sign(&claims),
            expires_in: self.config.token_ttl,
            access,
        }
    }

    /// Mints a refresh (identity) token for a user who logged in.
    pub fn refresh_token(&self, principal: &Principal) -> Result<String, AuthError> {
        if !matches!(principal.via, Via::Password | Via::RefreshToken) {
            return Err(AuthError::Invalid(
                "grant_type",
                "only a user may get a refresh token".into(),
            ));
        }
        let m = opaque::mint(opaque::TokenKind::Refresh);
        let now = now_ms();
        self.db.put_token(&TokenRecord {
            id: m.id,
            kind: "refresh".into(),
            name: principal.name.clone(),
            created_by: principal.name.clone(),
            hash: m.hash,
            permissions: Permissions::default(),
            created_ms: now,
            expires_ms: Some(now + self.config.refresh_ttl.as_millis() as u64),
            revoked_ms: None,
        })?;
        Ok(m.token)
    }

    /// Adds a user.
    pub fn add_user(
        &self,
        name: &str,
        password: &str,
        permissions: Permissions,
    ) -> Result<(), AuthError> {
        invalid_name("name", name)?;
        let hash = password::hash(password)
            .map_err(|e| AuthError::Invalid("password", format!("password: {e}")))?;
        let ok = self.db.add_user(&UserRecord {
            name: name.to_owned(),
            hash,
            permissions,
            created_ms: now_ms(),
        })?;
        if ok {
            Ok(())
        } else {
            Err(AuthError::Exists(format!("user {name:?} already exists")))
        }
    }

    /// Imports htpasswd entries (bcrypt) with `permissions`; returns how many
    /// were added (existing users are left alone).
    pub fn import_htpasswd(
        &self,
        text: &str,
        permissions: &Permissions,
    ) -> Result<Vec<String>, AuthError> {
        let entries =
            password::parse_htpasswd(text).map_err(|e| AuthError::Invalid("htpasswd", e))?;
        let mut added = Vec::new();
        for e in entries {
            invalid_name("name", &e.user)?;
            if self.db.add_user(&UserRecord {
                name: e.user.clone(),
                hash: e.hash,
                permissions: permissions.clone(),
                created_ms: now_ms(),
            })? {
                added.push(e.user);
            }
        }
        Ok(added)
    }

    /// Sets a user's password; revokes its refresh tokens.
    pub fn set_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        let mut u = self
            .db
            .user(name)?
            .ok_or_else(|| AuthError::NotFound(format!("no user {name:?}")))?;
        u.hash = password::hash(password)
            .map_err(|e| AuthError::Invalid("password", format!("password: {e}")))?;
        self.db.update_user(&u)?;
        self.revoke_refresh_of(name)
    }

    /// Changes a user's rights.
    pub fn set_permissions(&self, name: &str, permissions: Permissions) -> Result<(), AuthError> {
        let mut u = self
            .db
            .user(name)?
            .ok_or_else(|| AuthError::NotFound(format!("no user {name:?}")))?;
        u.permissions = permissions;
        Ok(self.db.update_user(&u)?)
    }

    fn revoke_refresh_of(&self, name: &str) -> Result<(), AuthError> {
        let now = now_ms();
        for mut t in self.db.tokens()? {
            if t.kind == "refresh" && t.name == name && t.revoked_ms.is_none() {
                t.revoked_ms = Some(now);
                self.db.put_token(&t)?;
            }
        }
        Ok(())
    }

    /// Removes a user and revokes its refresh tokens.
    pub fn remove_user(&self, name: &str) -> Result<(), AuthError> {
        let users = self.db.users()?;
        let is_admin = |u: &UserRecord| u.permissions.admin;
        if users.iter().any(|u| u.name == name && is_admin(u))
            && users.iter().filter(|u| is_admin(u)).count() == 1
        {
            return Err(AuthError::Refused(format!(
                "{name:?} is the last admin: add another admin first"
            )));
        }
        if self.db.remove_user(name, now_ms())? {
            Ok(())
        } else {
            Err(AuthError::NotFound(format!("no user {name:?}")))
        }
    }

    /// Creates an API token; returns its record and the token text (shown once).
    pub fn create_token(
        &self,
        req: TokenRequest,
        created_by: &str,
    ) -> Result<(TokenRecord, String), AuthError> {
        invalid_name("name", &req.name)?;
        let now = now_ms();
        if self
            .db
            .tokens()?
            .iter()
            .any(|t| t.kind == "api" && t.name == req.name && t.revoked_ms.is_none())
        {
            return Err(AuthError::Exists(format!(
                "a token named {:?} exists: revoke it first or pick another name",
                req.name
            )));
        }
        let m = opaque::mint(opaque::TokenKind::Api);
        let rec = TokenRecord {
            id: m.id,
            kind: "api".into(),
            name: req.name,
            created_by: created_by.to_owned(),
            hash: m.hash,
            permissions: req.permissions,
            created_ms: now,
            expires_ms: req.ttl.map(|d| now + d.as_millis() as u64),
            revoked_ms: None,
        };
        self.db.put_token(&rec)?;
        Ok((rec, m.token))
    }

    /// API tokens, newest first.
    pub fn api_tokens(&self) -> Result<Vec<TokenRecord>, AuthError> {
        let mut v: Vec<_> = self
            .db
            .tokens()?
            .into_iter()
            .filter(|t| t.kind == "api")
            .collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
        Ok(v)
    }

    /// Revokes the API token with this name or id.
    pub fn revoke_token(&self, name_or_id: &str) -> Result<TokenRecord, AuthError> {
        let now = now_ms();
        let mut t = self
            .db
            .tokens()?
            .into_iter()
            .find(|t| {
                t.kind == "api"
                    && t.revoked_ms.is_none()
                    && (t.name == name_or_id || t.id == name_or_id)
            })
            .ok_or_else(|| AuthError::NotFound(format!("no live token named {name_or_id:?}")))?;
        t.revoked_ms = Some(now);
        self.db.put_token(&t)?;
        Ok(t)
    }

    /// Sets a secret's value; returns its new version.
    pub fn set_secret(
        &self,
        name: &str,
        value: &[u8],
        services: Vec<String>,
    ) -> Result<u64, AuthError> {
        invalid_name("name", name)?;
        if value.len() > 512 * 1024 {
            return Err(AuthError::Invalid(
                "value",
                "value: a secret is at most 512 KiB".into(),
            ));
        }
        for g in &services {
            glob::validate(g)
                .map_err(|e| AuthError::Invalid("services", format!("services: {e}")))?;
        }
        let version = self.db.secret(name)?.map_or(0, |s| s.version) + 1;
        self.db.put_secret(&SecretRecord {
            name: name.to_owned(),
            version,
            sealed: self.seal.seal(name, value),
            services: if services.is_empty() {
                vec!["*".into()]
            } else {
                services
            },
            updated_ms: now_ms(),
        })?;
        Ok(version)
    }

    /// A secret's record, if it exists and `service` may use it.
    fn usable_secret(&self, name: &str, service: &str) -> Result<SecretRecord, AuthError> {
        let s = self.db.secret(name)?.ok_or_else(|| {
            AuthError::NotFound(format!(
                "no secret {name:?}: create it with `slipway secret set {name}`"
            ))
        })?;
        if !s.services.iter().any(|g| glob::matches(g, service)) {
            return Err(AuthError::Invalid(
                "secrets",
                format!(
                    "secrets: service {service:?} may not use secret {name:?} (allowed: {})",
                    s.services.join(", ")
                ),
            ));
        }
        Ok(s)
    }

    /// A secret's current version, if `service` may use it.
    pub fn secret_version(&self, name: &str, service: &str) -> Result<u64, AuthError> {
        Ok(self.usable_secret(name, service)?.version)
    }

    /// A secret's value and version, if `service` may use it.
    pub fn open_secret(&self, name: &str, service: &str) -> Result<(Vec<u8>, u64), AuthError> {
        let s = self.usable_secret(name, service)?;
        let v = self
            .seal
            .open(name, &s.sealed)
            .map_err(|e| DbError::Other(e.to_string()))?;
        Ok((v, s.version))
    }

    /// The secrets' records (values stay sealed).
    pub fn secrets(&self) -> Result<Vec<SecretRecord>, AuthError> {
        Ok(self.db.secrets()?)
    }

    /// Removes a secret.
    pub fn remove_secret(&self, name: &str) -> Result<(), AuthError> {
        if self.db.remove_secret(name)? {
            Ok(())
        } else {
            Err(AuthError::NotFound(format!("no secret {name:?}")))
        }
    }
}

#[cfg(test)]
mod tests;
