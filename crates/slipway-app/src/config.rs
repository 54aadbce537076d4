//! The one typed configuration, loaded only here.
//!
//! Precedence: CLI flag > `SLIPWAY_*` environment (both resolved by the binary's
//! clap definitions) > TOML file > default. Everything is validated before any port
//! is bound, and every error names the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the data lives when neither `--data`, `SLIPWAY_DATA` nor `data_dir` says.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/slipway";
/// Where `slipway serve` listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";

/// A duration written as `"30s"`, `"10m"`, `"1h30m"` (shared with service specs).
pub use slipway_core::service::Dur;

/// The TOML file, as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on, e.g. `"127.0.0.1:5000"`.
    pub listen: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_grace: Option<Dur>,
    /// TLS certificate and key.
    pub tls: Option<TlsConfig>,
    /// Registry limits.
    #[serde(default)]
    pub registry: RegistrySection,
    /// Garbage collection.
    #[serde(default)]
    pub gc: GcSection,
    /// Outgoing webhooks for push and delete events.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Running containers.
    #[serde(default)]
    pub runtime: RuntimeSection,
    /// `[services]`
    #[serde(default)]
    pub services: ServicesSection,
    /// `[auth]`
    #[serde(default)]
    pub auth: AuthSection,
    /// `[audit]`
    #[serde(default)]
    pub audit: AuditSection,
    /// `[cluster]`
    #[serde(default)]
    pub cluster: ClusterSection,
    /// `[storage]`
    #[serde(default)]
    pub storage: StorageSection,
}

/// `[storage]`: where committed registry blobs live.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// `filesystem` (the default: under the data directory) or `s3`.
    pub backend: Option<String>,
    /// With `s3`: the server, `http(s)://HOST:PORT`; unset for AWS.
    pub endpoint: Option<String>,
    /// With `s3`: the bucket.
    pub bucket: Option<String>,
    /// With `s3`: the region. Default `us-east-1`.
    pub region: Option<String>,
    /// With `s3`: the access key id (default `$AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// With `s3`: the secret (default `$AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// With `s3`: prepended to every object name.
    pub prefix: Option<String>,
    /// Registry metadata shared by several replicas:
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME`. Unset: an embedded
    /// database under the data directory (one replica).
    pub database: Option<String>,
    /// With `s3`: answer blob GETs with a redirect to a presigned URL of the
    /// object (valid this long), so large pulls bypass the replica. Off by default.
    pub redirect: Option<Dur>,
}

/// `url` with any password replaced, for messages and logs.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Where committed blobs live, resolved.
#[derive(Debug, Clone)]
pub enum BlobStorage {
    /// Under the data directory.
    Filesystem,
    /// In a bucket.
    S3(slipway_s3::S3Config),
}

impl StorageSection {
    fn database(&self) -> Result<Option<String>, ConfigError> {
        let Some(url) = self.database.clone().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid {
                field: "storage.database".into(),
                message: format!(
                    "{:?} must be a PostgreSQL URL: postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME",
                    redact_password(&url)
                ),
            });
        }
        Ok(Some(url))
    }

    fn resolve(&self) -> Result<BlobStorage, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: format!("storage.{field}"),
            message,
        };
        match self.backend.as_deref().unwrap_or("filesystem") {
            "filesystem" if self.redirect.is_some() => Err(invalid(
                "redirect",
                "needs backend = \"s3\": a local blob has no URL to redirect to".into(),
            )),
            "filesystem" => Ok(BlobStorage::Filesystem),
            "s3" => {
                let bucket = self
                    .bucket
                    .clone()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| invalid("bucket", "is required with backend = \"s3\"".into()))?;
                let from_env = |v: &Option<String>, var: &str, field: &str| {
                    v.clone()
                        .or_else(|| std::env::var(var).ok())
                        .filter(|k| !k.is_empty())
                        .ok_or_else(|| {
                            invalid(
                                field,
                                format!("is required with backend = \"s3\" (or set ${var})"),
                            )
                        })
                };
                let endpoint = self.endpoint.clone().filter(|e| !e.is_empty());
                if let Some(e) = &endpoint
                    && !(e.starts_with("http://") || e.starts_with("https://"))
                {
                    return Err(invalid(
                        "endpoint",
                        format!("{e:?} must start with http:// or https://"),
                    ));
                }
                Ok(BlobStorage::S3(slipway_s3::S3Config {
                    endpoint,
                    bucket,
                    region: self.region.clone().unwrap_or_else(|| "us-east-1".into()),
                    access_key_id: from_env(
                        &self.access_key_id,
                        "AWS_ACCESS_KEY_ID",
                        "access_key_id",
                    )?,
                    secret_access_key: from_env(
                        &self.secret_access_key,
                        "AWS_SECRET_ACCESS_KEY",
                        "secret_access_key",
                    )?,
                    prefix: self.prefix.clone().unwrap_or_default(),
                    redirect: self.redirect.map(|d| d.0),
                }))
            }
            other => Err(invalid(
                "backend",
                format!("{other:?} is not a storage backend: use \"filesystem\" or \"s3\""),
            )),
        }
    }
}

/// `[cluster]`: timings of control planes and nodes sharing etcd.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The leader's etcd lease: a standby takes over within this after the
    /// leader dies. Default 5s.
    pub lease_ttl: Dur,
    /// How often a node refreshes its heartbeat. Default 1s.
    pub heartbeat_interval: Dur,
    /// A node whose last heartbeat is older than this, plus the grace, is down.
    /// Default 4s.
    pub heartbeat_ttl: Dur,
    /// Added to the heartbeat TTL before a node counts as down. Default 1s.
    pub down_grace: Dur,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            lease_ttl: Dur(Duration::from_secs(5)),
            heartbeat_interval: Dur(Duration::from_secs(1)),
            heartbeat_ttl: Dur(Duration::from_secs(4)),
            down_grace: Dur(Duration::from_secs(1)),
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Lifetime of registry tokens. Default 5m.
    pub token_ttl: Dur,
    /// Lifetime of refresh tokens (`docker login`, `slipway login`). Default 2160h (90 days).
    pub refresh_ttl: Dur,
    /// Serve `/metrics` without a token. Default false.
    pub metrics_public: bool,
    /// The token endpoint URL put in challenges. Default: derived from the
    /// request's Host (`http[s]://HOST/auth/token`).
    pub realm: Option<String>,
    /// The `service` of challenges and tokens. Default "slipway".
    pub service: String,
    /// Where the key that seals secrets lives. Default `<data>/keys/secrets.key`;
    /// put it on another disk to keep it apart from backups of the data directory.
    pub secrets_key: Option<PathBuf>,
    /// Failed logins allowed per source address and per user in `login_window`. Default 10.
    pub login_failures: usize,
    /// Default 1m.
    pub login_window: Dur,
    /// What callers without credentials may do.
    pub anonymous: Vec<AnonymousGrant>,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            token_ttl: Dur(Duration::from_secs(300)),
            refresh_ttl: Dur(Duration::from_secs(90 * 24 * 3600)),
            metrics_public: false,
            realm: None,
            service: "slipway".into(),
            secrets_key: None,
            login_failures: 10,
            login_window: Dur(Duration::from_secs(60)),
            anonymous: Vec::new(),
        }
    }
}

/// `[[auth.anonymous]]`: a role for callers without credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymousGrant {
    /// A repository glob.
    pub repository: Option<String>,
    /// A service glob.
    pub service: Option<String>,
    /// The role (`reader` is the usual one).
    pub role: String,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Rotate the audit log past this many bytes. Default 16 MiB.
    pub max_bytes: u64,
    /// Rotated files kept. Default 5.
    pub files: usize,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            files: 5,
        }
    }
}

/// `[services]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesSection {
    /// Ports handed to service instances, `FIRST-LAST`; must lie outside the
    /// kernel's ephemeral range (`net.ipv4.ip_local_port_range`). Default
    /// 20000-29999; `SLIPWAY_PORT_RANGE` overrides it.
    pub port_range: String,
}

impl Default for ServicesSection {
    fn default() -> Self {
        Self {
            port_range: "20000-29999".into(),
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// The OCI runtime binary: `runc` (default) or `crun`.
    pub binary: String,
    /// SIGTERM to SIGKILL grace of `slipway stop`. Default 10s.
    pub stop_grace: Dur,
    /// Rotate a container's log past this many bytes. Default 10 MiB.
    pub log_max_bytes: u64,
    /// Rotated log files kept per container. Default 3.
    pub log_files: usize,
    /// How often running containers' logs are checked against
    /// `log_max_bytes` (one check for all of them). Default 10s.
    pub log_check_interval: Dur,
    /// A layer snapshot no container uses is removed after this long. Default 1h.
    pub snapshot_grace: Dur,
    /// Past this percentage of the data disk in use, unused snapshots go at once,
    /// oldest first… Default 85 (kubelet's image GC high threshold).
    pub disk_high_percent: u8,
    /// …until usage is under this one. Default 80.
    pub disk_low_percent: u8,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            binary: "runc".into(),
            stop_grace: Dur(Duration::from_secs(10)),
            log_max_bytes: 10 << 20,
            log_files: 3,
            log_check_interval: Dur(Duration::from_secs(10)),
            snapshot_grace: Dur(Duration::from_secs(3600)),
            disk_high_percent: 85,
            disk_low_percent: 80,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[registry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// Largest manifest accepted (bytes). Default 4 MiB.
    pub max_manifest_bytes: usize,
    /// Upload sessions idle longer than this are purged. Default 24h.
    pub upload_purge_after: Dur,
    /// How often to look for abandoned uploads. Default 10m.
    pub upload_purge_interval: Dur,
    /// `[[registry.immutable]]`: tags that are pushed once, then never moved or
    /// deleted.
    pub immutable: Vec<slipway_store::ImmutableRule>,
    /// `[[registry.retention]]`: which tags garbage collection keeps.
    pub retention: Vec<slipway_store::RetentionRule>,
    /// `[[registry.mirror]]`: pull-through mirrors of other registries.
    pub mirror: Vec<crate::mirror::MirrorConfig>,
}

impl Default for RegistrySection {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 4 << 20,
            upload_purge_after: Dur(Duration::from_secs(24 * 3600)),
            upload_purge_interval: Dur(Duration::from_secs(600)),
            immutable: Vec::new(),
            retention: Vec::new(),
            mirror: Vec::new(),
        }
    }
}

/// `[gc]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcSection {
    /// Run GC periodically at this interval. Default: only on demand.
    pub interval: Option<Dur>,
    /// Anything pushed or looked up more recently than this is kept. Default 1h.
    pub grace_period: Dur,
    /// Also delete manifests no tag or index references. Default false.
    pub delete_untagged: bool,
}

impl Default for GcSection {
    fn default() -> Self {
        Self {
            interval: None,
            grace_period: Dur(Duration::from_secs(3600)),
            delete_untagged: false,
        }
    }
}

/// `[[webhooks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host:port/path` to POST each event to.
    pub url: String,
    /// Per-attempt timeout. Default 5s.
    #[serde(default = "default_webhook_timeout")]
    pub timeout: Dur,
    /// Attempts before an event is dropped. Default 5.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

fn default_attempts() -> u32 {
    5
}

/// Values given on the command line or through `SLIPWAY_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--data`
    pub data_dir: Option<PathBuf>,
    /// `--tls-cert`
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`
    pub tls_key: Option<PathBuf>,
    /// `--insecure-no-auth`
    pub insecure_no_auth: bool,
    /// `--state etcd://HOST:PORT[,HOST:PORT…]`
    pub state: Option<String>,
    /// `--node-name` (default: the host name)
    pub node_name: Option<String>,
    /// `--node-labels k=v,…`
    pub node_labels: Option<String>,
    /// `--join-token`
    pub join_token: Option<String>,
    /// `--no-instances`
    pub no_instances: bool,
    /// `--advertise`
    pub advertise: Option<std::net::IpAddr>,
}

/// The resolved, validated settings `slipway serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// TLS, if enabled.
    pub tls: Option<TlsConfig>,
    /// Registry limits.
    pub registry: RegistrySection,
    /// GC.
    pub gc: GcSection,
    /// Webhooks.
    pub webhooks: Vec<WebhookConfig>,
    /// Containers.
    pub runtime: RuntimeSection,
    /// Ports handed to service instances.
    pub port_range: (u16, u16),
    /// Authentication.
    pub auth: slipway_auth::AuthConfig,
    /// `/metrics` without a token.
    pub metrics_public: bool,
    /// The realm of challenges, if fixed.
    pub realm: Option<String>,
    /// `--insecure-no-auth`.
    pub insecure_no_auth: bool,
    /// The audit log.
    pub audit: AuditSection,
    /// etcd endpoints (`http://host:port`) holding the control-plane state;
    /// empty: the embedded store under the data directory.
    pub state_endpoints: Vec<String>,
    /// This node's name.
    pub node_name: String,
    /// This node's labels.
    pub node_labels: std::collections::BTreeMap<String, String>,
    /// Control-plane and node timings.
    pub cluster: ClusterSection,
    /// Where committed registry blobs live.
    pub blob_storage: BlobStorage,
    /// The PostgreSQL URL of shared registry metadata, if any.
    pub registry_database: Option<String>,
    /// The cluster's join token (agents' heartbeats and the agent API carry it).
    pub join_token: Option<String>,
    /// Whether this control plane's node runs instances.
    pub run_instances: bool,
    /// The address other machines reach this node's instances at.
    pub advertise: Option<std::net::IpAddr>,
}

/// Parses a port range `FIRST-LAST`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    crate::services::parse_range(s)
}

/// Parses `key=value[,key=value…]` node labels.
pub fn parse_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut labels = std::collections::BTreeMap::new();
    for kv in s.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some((k, v))
                if slipway_core::placement::valid_label(k.trim())
                    && slipway_core::placement::valid_label(v.trim()) =>
            {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            _ => {
                return Err(format!(
                    "{kv:?} is not a label: write key=value[,key=value...], e.g. zone=a,disk=ssd"
                ));
            }
        }
    }
    Ok(labels)
}

/// A configuration problem, naming the field and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax or schema error (the message carries line and column).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with position.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("config field `{field}`: {message}")]
    Invalid {
        /// Dotted field path.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

// === impl FileConfig ===

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

// === impl Settings ===

impl Settings {
    /// Merges overrides over the file over defaults, and validates the result.
    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Self, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_owned(),
            message,
        };
        let listen = o.listen.or(file.listen).unwrap_or_else(|| {
            DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| ([127, 0, 0, 1], 5000).into())
        });
        let data_dir = o
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let tls = match (o.tls_cert, o.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
            (None, None) => file.tls,
            (Some(_), None) => {
                return Err(invalid("tls.key", "--tls-cert needs --tls-key too".into()));
            }
            (None, Some(_)) => {
                return Err(invalid("tls.cert", "--tls-key needs --tls-cert too".into()));
            }
        };
        if let Some(t) = &tls {
            for (field, p) in [("tls.cert", &t.cert), ("tls.key", &t.key)] {
                if !p.is_file() {
                    return Err(invalid(
                        field,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        for (i, rule) in file.registry.immutable.iter().enumerate() {
            for (field, glob) in [("repository", &rule.repository), ("tags", &rule.tags)] {
                slipway_core::glob::validate(glob)
                    .map_err(|e| invalid(&format!("registry.immutable[{i}].{field}"), e))?;
            }
        }
        for (i, rule) in file.registry.retention.iter().enumerate() {
            let globs = std::iter::once(("repository", &rule.repository))
                .chain(rule.keep_tags.as_ref().map(|g| ("keep_tags", g)));
            for (field, glob) in globs {
                slipway_core::glob::validate(glob)
                    .map_err(|e| invalid(&format!("registry.retention[{i}].{field}"), e))?;
            }
        }
        for (i, m) in file.registry.mirror.iter().enumerate() {
            if m.prefix
                .trim_end_matches('/')
                .parse::<slipway_core::RepoName>()
                .is_err()
            {
                return Err(invalid(
                    &format!("registry.mirror[{i}].prefix"),
                    format!("{:?} must be a repository name, e.g. \"hub\"", m.prefix),
                ));
            }
            if m.upstream.trim().is_empty() || m.upstream.starts_with("https://") {
                return Err(invalid(
                    &format!("registry.mirror[{i}].upstream"),
                    "must be an upstream registry's HOST:PORT or http://HOST:PORT (https upstreams are not supported yet)".into(),
                ));
            }
        }
        if file.registry.max_manifest_bytes < 1024 {
            return Err(invalid(
                "registry.max_manifest_bytes",
                format!(
                    "{} is too small: use at least 1024",
                    file.registry.max_manifest_bytes
                ),
            ));
        }
        if file.registry.upload_purge_interval.0.is_zero() {
            return Err(invalid(
                "registry.upload_purge_interval",
                "must be greater than zero".into(),
            ));
        }
        if file.gc.interval.is_some_and(|i| i.0.is_zero()) {
            return Err(invalid(
                "gc.interval",
                "must be greater than zero, or omitted for on-demand GC".into(),
            ));
        }
        if file.runtime.binary.is_empty() || file.runtime.binary.contains(char::is_whitespace) {
            return Err(invalid(
                "runtime.binary",
                format!(
                    "{:?} must name a runtime such as runc or crun",
                    file.runtime.binary
                ),
            ));
        }
        let (high, low) = (
            file.runtime.disk_high_percent,
            file.runtime.disk_low_percent,
        );
        if !(1..=100).contains(&high) || low >= high {
            return Err(invalid(
                "runtime.disk_low_percent",
                format!(
                    "{low} must be below runtime.disk_high_percent ({high}), which must be 1-100"
                ),
            ));
        }
        if file.runtime.log_check_interval.0 < Duration::from_millis(100) {
            return Err(invalid(
                "runtime.log_check_interval",
                "must be at least 100ms".into(),
            ));
        }
        if file.runtime.log_max_bytes < 4096 {
            return Err(invalid(
                "runtime.log_max_bytes",
                "must be at least 4096".into(),
            ));
        }
        for (i, w) in file.webhooks.iter().enumerate() {
            if !w.url.starts_with("http://") || w.url.len() <= "http://".len() {
                return Err(invalid(
                    &format!("webhooks[{i}].url"),
                    format!(
                        "{:?} must be an http:// URL (https webhooks are not supported yet)",
                        w.url
                    ),
                ));
            }
            if w.url.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    &format!("webhooks[{i}].url"),
                    format!("{:?} is not a valid URL", w.url),
                ));
            }
            if w.max_attempts == 0 {
                return Err(invalid(
                    &format!("webhooks[{i}].max_attempts"),
                    "must be at least 1".into(),
                ));
            }
        }
        let range_text = std::env::var("SLIPWAY_PORT_RANGE")
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or(file.services.port_range);
        let port_range = crate::services::parse_range(&range_text)
            .map_err(|e| invalid("services.port_range", e))?;
        if let Some((lo, hi)) = crate::services::ephemeral_range()
            && port_range.0 <= hi
            && lo <= port_range.1
        {
            return Err(invalid(
                "services.port_range",
                format!(
                    "{range_text} overlaps the kernel's ephemeral range {lo}-{hi} (net.ipv4.ip_local_port_range), where outgoing connections take their ports: pick a range outside it"
                ),
            ));
        }
        let mut anonymous = slipway_auth::Permissions::default();
        for (i, a) in file.auth.anonymous.iter().enumerate() {
            let field = format!("auth.anonymous[{i}]");
            let (kind, glob) = match (&a.repository, &a.service) {
                (Some(g), None) => (slipway_auth::Kind::Repository, g),
                (None, Some(g)) => (slipway_auth::Kind::Service, g),
                _ => {
                    return Err(invalid(
                        &field,
                        "set exactly one of repository or service".into(),
                    ));
                }
            };
            let grant = slipway_auth::Grant::parse(kind, &format!("{glob}={}", a.role))
                .map_err(|e| invalid(&field, e))?;
            if grant.role == slipway_auth::Role::Admin {
                return Err(invalid(&field, "anonymous callers cannot be admins".into()));
            }
            anonymous.grants.push(grant);
        }
        if let Some(r) = &file.auth.realm
            && !(r.starts_with("http://") || r.starts_with("https://"))
        {
            return Err(invalid(
                "auth.realm",
                format!("{r:?} must be an http:// or https:// URL of /auth/token"),
            ));
        }
        if file.auth.login_failures == 0 {
            return Err(invalid("auth.login_failures", "must be at least 1".into()));
        }
        let auth = slipway_auth::AuthConfig {
            service: file.auth.service.clone(),
            token_ttl: file.auth.token_ttl.0,
            refresh_ttl: file.auth.refresh_ttl.0,
            anonymous,
            limit_failures: file.auth.login_failures,
            limit_window: file.auth.login_window.0,
            secrets_key: file.auth.secrets_key.clone(),
        };
        let state_endpoints = match &o.state {
            Some(url) => slipway_etcd::parse_endpoints(url).map_err(|e| invalid("--state", e))?,
            None => Vec::new(),
        };
        let node_name = match &o.node_name {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_ascii_lowercase())
                .unwrap_or_else(|_| "local".to_owned()),
        };
        if !slipway_core::placement::valid_label(&node_name) {
            return Err(invalid(
                "--node-name",
                format!(
                    "{node_name:?} must be 1-63 characters of letters, digits, '.', '_', '-' or '/'"
                ),
            ));
        }
        let node_labels = parse_labels(o.node_labels.as_deref().unwrap_or(""))
            .map_err(|e| invalid("--node-labels", e))?;
        let join_token = match o.join_token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.len() < 16 => {
                return Err(invalid(
                    "--join-token",
                    "must be at least 16 characters: make one with `head -c 24 /dev/urandom | base64`".into(),
                ));
            }
            Some(t) => Some(t.to_owned()),
        };
        let c = file.cluster;
        if c.lease_ttl.0 < Duration::from_secs(2) {
            return Err(invalid(
                "cluster.lease_ttl",
                "must be at least 2s (etcd leases are whole seconds, renewed every third)".into(),
            ));
        }
        if c.heartbeat_interval.0.is_zero() || c.heartbeat_ttl.0 <= c.heartbeat_interval.0 {
            return Err(invalid(
                "cluster.heartbeat_ttl",
                format!(
                    "must be longer than cluster.heartbeat_interval ({:?}), or one late heartbeat marks a node down",
                    c.heartbeat_interval.0
                ),
            ));
        }
        let blob_storage = file.storage.resolve()?;
        let registry_database = file.storage.database()?;
        Ok(Self {
            blob_storage,
            registry_database,
            cluster: c,
            join_token,
            run_instances: !o.no_instances,
            advertise: o.advertise,
            node_name,
            node_labels,
            state_endpoints,
            auth,
            metrics_public: file.auth.metrics_public,
            realm: file.auth.realm.clone(),
            insecure_no_auth: o.insecure_no_auth,
            audit: file.audit,
            listen,
            data_dir,
            port_range,
            shutdown_grace: file.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            tls,
            registry: file.registry,
            gc: file.gc,
            webhooks: file.webhooks,
            runtime: file.runtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses_and_flags_override_the_file() {
        let file = FileConfig::parse(
            r#"
listen = "127.0.0.1:6000"
data_dir = "/tmp/x"
shutdown_grace = "5s"
[registry]
max_manifest_bytes = 2048
upload_purge_after = "2h"
[gc]
interval = "30m"
grace_period = "10m"
delete_untagged = true
[[webhooks]]
url = "http://127.0.0.1:9/hook"
max_attempts = 3
"#,
        )
        .expect("parses");
        let s = Settings::resolve(
            file,
            Overrides {
                listen: Some("127.0.0.1:7000".parse().expect("addr")),
                ..Overrides::default()
            },
        )
        .expect("valid");
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.gc.interval, Some(Dur(Duration::from_secs(1800))));
        assert_eq!(s.webhooks[0].timeout, Dur(Duration::from_secs(5)));
        assert_eq!(s.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field_and_position() {
        let e = FileConfig::parse("[gc]\ngrace = \"1h\"\n").expect_err("unknown field");
        assert!(
            e.contains("unknown field `grace`") && e.contains("line 2"),
            "{e}"
        );
        let e = FileConfig::parse("[gc]\ngrace_period = \"soon\"\n").expect_err("bad duration");
        assert!(e.contains("line 2") && e.contains("\"soon\""), "{e}");
        let e = FileConfig::parse("listen = \"nowhere\"").expect_err("bad addr");
        assert!(e.contains("listen") || e.contains("line 1"), "{e}");
        let bad = FileConfig::parse("[[webhooks]]\nurl = \"ftp://x\"\n").expect("parses");
        let e = Settings::resolve(bad, Overrides::default()).expect_err("bad url");
        assert!(e.to_string().contains("webhooks[0].url"), "{e}");
    }

    #[test]
    fn cluster_timings_default_and_are_checked_against_each_other() {
        let s = Settings::resolve(FileConfig::default(), Overrides::default()).expect("valid");
        assert_eq!(s.cluster.lease_ttl, Dur(Duration::from_secs(5)));
        assert_eq!(s.cluster.heartbeat_ttl, Dur(Duration::from_secs(4)));
        for (text, field) in [
            ("[cluster]\nlease_ttl = \"1s\"\n", "cluster.lease_ttl"),
            (
                "[cluster]\nheartbeat_interval = \"5s\"\nheartbeat_ttl = \"4s\"\n",
                "cluster.heartbeat_ttl",
            ),
        ] {
            let file = FileConfig::parse(text).expect("parses");
            let e = Settings::resolve(file, Overrides::default()).expect_err("refused");
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = Settings::resolve(
            FileConfig::default(),
            Overrides {
                node_labels: Some("zone=a,bad".into()),
                ..Overrides::default()
            },
        )
        .expect_err("bad label");
        assert!(e.to_string().contains("--node-labels"), "{e}");
    }
}
