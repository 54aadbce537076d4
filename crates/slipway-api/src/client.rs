//! A typed async client of the admin API, over http or https.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use slipway_core::ErrorKind;

use crate::containers::{ContainerInfo, RunRequest};
use crate::error::ErrorBody;
use crate::services::{
    CommandAccepted, DeployRequest, Event, RollbackRequest, ScaleRequest, ServiceSpec,
    ServiceStatus,
};
use crate::{GcReport, ServerStatus};

/// The default server URL when neither `--server` nor `SLIPWAY_SERVER` is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:5000";

/// The system's CA bundle (Debian's `ca-certificates`), trusted when no CA file is
/// given.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub server: String,
    /// PEM CA certificates to trust for https (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// A bearer token sent with every request.
    pub token: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// Its kind.
        kind: ErrorKind,
        /// What the server said.
        message: String,
        /// The request field it is about.
        field: Option<String>,
    },
    /// The server could not be reached.
    #[error(
        "cannot reach slipway at {server}: {message}; is `slipway serve` running? (set --server or SLIPWAY_SERVER)"
    )]
    Connect {
        /// The server URL.
        server: String,
        /// Why.
        message: String,
    },
    /// The client is configured wrongly (URL, CA file).
    #[error("{0}")]
    Config(String),
    /// The server's answer is not what this client understands.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

impl ClientError {
    /// How the error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Api { kind, .. } => *kind,
            Self::Connect { .. } => ErrorKind::Unavailable,
            Self::Config(_) => ErrorKind::InvalidArgument,
            Self::Decode(_) => ErrorKind::Internal,
        }
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Talks to a running `slipway serve`.
#[derive(Clone)]
pub struct Client {
    base: String,
    host: String,
    token: Option<String>,
    client: HyperClient<Connector, Full<Bytes>>,
}

fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, ClientError> {
    let path = ca_file.cloned().unwrap_or_else(|| PathBuf::from(SYSTEM_CA));
    let mut roots = rustls::RootCertStore::empty();
    match std::fs::File::open(&path) {
        Ok(f) => {
            for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(f)) {
                let cert = cert.map_err(|e| {
                    ClientError::Config(format!("--ca-file {}: {e}", path.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    ClientError::Config(format!("--ca-file {}: {e}", path.display()))
                })?;
            }
        }
        // Without a system bundle, plain http still works; https then fails to verify.
        Err(e) if ca_file.is_some() => {
            return Err(ClientError::Config(format!(
                "--ca-file {}: {e}",
                path.display()
            )));
        }
        Err(_) => {}
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A TLS configuration that trusts nothing, for a client of an http:// server.
fn plain_config() -> Result<rustls::ClientConfig, ClientError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

impl Client {
    /// A client for `config.server`.
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let base = config.server.trim_end_matches('/').to_owned();
        let host = match base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
        {
            Some(h) if !h.is_empty() && !h.contains('/') => h.to_owned(),
            _ => {
                return Err(ClientError::Config(format!(
                    "server URL {base:?} must be http://HOST:PORT or https://HOST:PORT (set --server or SLIPWAY_SERVER)"
                )));
            }
        };
        // Reading and parsing the system's CA bundle costs milliseconds: only an
        // https server needs it.
        let tls = if base.starts_with("https://") {
            tls_config(config.ca_file.as_ref())?
        } else {
            plain_config()?
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base,
            host,
            token: config.token.clone(),
            client: HyperClient::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The server's `host:port`, as image references name it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same client with another bearer token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The bearer token sent, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                req = req.header(http::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Config(format!("bad request: {e}")))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ClientError::Connect {
                server: self.base.clone(),
                message: error_chain(&e),
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status,
                kind: ErrorKind::from_name(&b.error.kind),
                message: b.error.message,
                field: b.error.field,
            },
            Err(_) => ClientError::Api {
                status,
                kind: match status {
                    401 | 429 => ErrorKind::Unauthenticated,
                    403 => ErrorKind::PermissionDenied,
                    404 => ErrorKind::NotFound,
                    400..500 => ErrorKind::InvalidArgument,
                    503 => ErrorKind::Unavailable,
                    _ => ErrorKind::Internal,
                },
                message: format!(
                    "the server answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
                field: None,
            },
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(|v| ("application/json", v)))
            .transpose()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        decode(self.send(method, path, body).await?).await
    }

    async fn call_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        let resp = self.send(method, path, None).await?;
        let _ = resp.into_body().collect().await;
        Ok(())
    }

    async fn stream(&self, path: &str) -> Result<ByteStream, ClientError> {
        Ok(ByteStream(
            self.send(Method::GET, path, None).await?.into_body(),
        ))
    }

    // === services ===

    /// Creates or updates a service.
    pub async fn deploy(&self, spec: &ServiceSpec) -> Result<CommandAccepted, ClientError> {
        let req = DeployRequest { spec: spec.clone() };
        self.call(Method::POST, "/api/v1/services", Some(&req))
            .await
    }

    /// Every service.
    pub async fn services(&self) -> Result<Vec<ServiceStatus>, ClientError> {
        self.call(Method::GET, "/api/v1/services", None::<&()>)
            .await
    }

    /// One service.
    pub async fn service(&self, name: &str) -> Result<ServiceStatus, ClientError> {
        self.call(Method::GET, &service_path(name, ""), None::<&()>)
            .await
    }

    /// Rolls back to `to` (default: the revision before the active one).
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<u64>,
    ) -> Result<CommandAccepted, ClientError> {
        self.call(
            Method::POST,
            &service_path(name, "/rollback"),
            Some(&RollbackRequest { to }),
        )
        .await
    }

    /// Changes the number of instances.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<CommandAccepted, ClientError> {
        self.call(
            Method::POST,
            &service_path(name, "/scale"),
            Some(&ScaleRequest { replicas }),
        )
        .await
    }

    /// `pause`, `resume`, `promote` or `abort`.
    pub async fn control(&self, name: &str, verb: &str) -> Result<CommandAccepted, ClientError> {
        self.call(
            Method::POST,
            &service_path(name, &format!("/{verb}")),
            None::<&()>,
        )
        .await
    }

    /// Removes a service: aborts what runs and stops every instance.
    pub async fn remove_service(&self, name: &str) -> Result<CommandAccepted, ClientError> {
        self.call(Method::DELETE, &service_path(name, ""), None::<&()>)
            .await
    }

    /// Events: the recent ones, then (with `follow`) new ones as they happen.
    pub async fn events(
        &self,
        service: Option<&str>,
        follow: bool,
    ) -> Result<EventStream, ClientError> {
        let mut path = format!("/api/v1/events?follow={follow}");
        if let Some(s) = service {
            path.push_str(&format!("&service={}", encode(s)));
        }
        Ok(EventStream {
            body: self.stream(&path).await?,
            buf: Vec::new(),
        })
    }

    /// Follows a command until its outcome, calling `on_event` for each of its
    /// events. `None` if the stream ended first (the server went away).
    pub async fn follow(
        &self,
        accepted: &CommandAccepted,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Option<crate::services::Outcome>, ClientError> {
        let mut events = self.events(Some(&accepted.service), true).await?;
        while let Some(e) = events.next().await {
            let e = e?;
            if e.command.as_deref() != Some(accepted.command.as_str()) {
                continue;
            }
            on_event(&e);
            if let Some(o) = e.outcome {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// A service's logs: every instance's output, each line prefixed with it.
    pub async fn service_logs(
        &self,
        name: &str,
        query: &LogQuery,
    ) -> Result<ByteStream, ClientError> {
        let mut q = vec![format!("follow={}", query.follow)];
        if let Some(r) = query.revision {
            q.push(format!("revision={r}"));
        }
        if let Some(t) = query.tail {
            q.push(format!("tail={t}"));
        }
        if let Some(s) = query.since {
            q.push(format!("since={}", slipway_core::format_duration(s)));
        }
        self.stream(&format!("{}?{}", service_path(name, "/logs"), q.join("&")))
            .await
    }

    // === containers ===

    /// Runs a container.
    pub async fn run(&self, req: &RunRequest) -> Result<ContainerInfo, ClientError> {
        self.call(Method::POST, "/api/v1/containers", Some(req))
            .await
    }

    /// Every container.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>, ClientError> {
        self.call(Method::GET, "/api/v1/containers", None::<&()>)
            .await
    }

    /// One container.
    pub async fn container(&self, name: &str) -> Result<ContainerInfo, ClientError> {
        self.call(Method::GET, &container_path(name, ""), None::<&()>)
            .await
    }

    /// Stops a container: its stop signal, then SIGKILL after `grace`.
    pub async fn stop(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<ContainerInfo, ClientError> {
        let q = grace
            .map(|g| format!("?grace={}", slipway_core::format_duration(g)))
            .unwrap_or_default();
        self.call(
            Method::POST,
            &container_path(name, &format!("/stop{q}")),
            None::<&()>,
        )
        .await
    }

    /// Removes a container (`force`: stop it first).
    pub async fn remove_container(&self, name: &str, force: bool) -> Result<(), ClientError> {
        self.call_empty(
            Method::DELETE,
            &container_path(name, &format!("?force={force}")),
        )
        .await
    }

    /// A container's output.
    pub async fn logs(&self, name: &str, follow: bool) -> Result<ByteStream, ClientError> {
        self.stream(&container_path(name, &format!("/logs?follow={follow}")))
            .await
    }

    // === server ===

    /// Runs garbage collection (or, with `dry_run`, reports what it would free).
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport, ClientError> {
        let path = if dry_run {
            "/api/v1/gc?dry_run=true"
        } else {
            "/api/v1/gc"
        };
        self.call(Method::POST, path, None::<&()>).await
    }

    /// The server's version and storage.
    pub async fn status(&self) -> Result<ServerStatus, ClientError> {
        self.call(Method::GET, "/api/v1/status", None::<&()>).await
    }

    // === auth ===

    /// Logs in with a password at the token endpoint; the answer carries a
    /// refresh token to store.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<crate::auth::TokenResponse, ClientError> {
        use slipway_core::form::encode;
        let form = format!(
            "grant_type=password&username={}&password={}&access_type=offline&client_id=slipway-cli",
            encode(user),
            encode(password)
        );
        let resp = self
            .send(
                Method::POST,
                "/auth/token",
                Some(("application/x-www-form-urlencoded", form.into_bytes())),
            )
            .await?;
        decode(resp).await
    }

    /// Who the server takes this client for.
    pub async fn whoami(&self) -> Result<crate::auth::WhoAmI, ClientError> {
        self.call(Method::GET, "/api/v1/whoami", None::<&()>).await
    }

    /// Every user.
    pub async fn users(&self) -> Result<Vec<crate::auth::UserInfo>, ClientError> {
        self.call(Method::GET, "/api/v1/users", None::<&()>).await
    }

    /// Adds a user.
    pub async fn add_user(&self, req: &crate::auth::CreateUser) -> Result<(), ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = self
            .send(
                Method::POST,
                "/api/v1/users",
                Some(("application/json", body)),
            )
            .await?;
        let _ = resp.into_body().collect().await;
        Ok(())
    }

    /// Removes a user.
    pub async fn remove_user(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("/api/v1/users/{}", seg(name)))
            .await
    }

    /// Sets a user's password.
    pub async fn set_password(&self, name: &str, password: &str) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&crate::auth::SetPassword {
            password: password.to_owned(),
        })
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let resp = self
            .send(
                Method::PUT,
                &format!("/api/v1/users/{}/password", seg(name)),
                Some(("application/json", body)),
            )
            .await?;
        let _ = resp.into_body().collect().await;
        Ok(())
    }

    /// API tokens.
    pub async fn tokens(&self) -> Result<Vec<crate::auth::TokenInfo>, ClientError> {
        self.call(Method::GET, "/api/v1/tokens", None::<&()>).await
    }

    /// Creates an API token.
    pub async fn create_token(
        &self,
        req: &crate::auth::CreateToken,
    ) -> Result<crate::auth::CreatedToken, ClientError> {
        self.call(Method::POST, "/api/v1/tokens", Some(req)).await
    }

    /// Revokes an API token by name or id.
    pub async fn revoke_token(&self, name: &str) -> Result<crate::auth::TokenInfo, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/api/v1/tokens/{}", seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Secrets (never their values).
    pub async fn secrets(&self) -> Result<Vec<crate::auth::SecretInfo>, ClientError> {
        self.call(Method::GET, "/api/v1/secrets", None::<&()>).await
    }

    /// Sets a secret's value.
    pub async fn set_secret(
        &self,
        name: &str,
        req: &crate::auth::SetSecret,
    ) -> Result<crate::auth::SecretInfo, ClientError> {
        self.call(
            Method::PUT,
            &format!("/api/v1/secrets/{}", seg(name)),
            Some(req),
        )
        .await
    }

    /// Removes a secret.
    pub async fn remove_secret(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("/api/v1/secrets/{}", seg(name)))
            .await
    }

    /// The nodes.
    pub async fn nodes(&self) -> Result<Vec<crate::nodes::NodeInfo>, ClientError> {
        self.call(Method::GET, "/api/v1/nodes", None::<&()>).await
    }

    /// Cordons (`cordon = true`) or uncordons a node.
    pub async fn cordon(
        &self,
        name: &str,
        cordon: bool,
    ) -> Result<crate::nodes::NodeInfo, ClientError> {
        self.node_action(name, if cordon { "cordon" } else { "uncordon" })
            .await
    }

    /// Cordons a node and moves its instances elsewhere; answers at once (the
    /// node's instance count falls to 0 as they move).
    pub async fn drain(&self, name: &str) -> Result<crate::nodes::NodeInfo, ClientError> {
        self.node_action(name, "drain").await
    }

    async fn node_action(
        &self,
        name: &str,
        verb: &str,
    ) -> Result<crate::nodes::NodeInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/api/v1/nodes/{}/{verb}", seg(name)),
            None::<&()>,
        )
        .await
    }

    /// Forgets a node that is down.
    pub async fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty(Method::DELETE, &format!("/api/v1/nodes/{}", seg(name)))
            .await
    }

    /// Audit log entries; `query` is a query string (`since_ms=…&principal=…`).
    pub async fn audit(&self, query: &str) -> Result<Vec<crate::AuditEntry>, ClientError> {
        self.call(Method::GET, &format!("/api/v1/audit?{query}"), None::<&()>)
            .await
    }
}

/// A JSON response body.
async fn decode<T: DeserializeOwned>(resp: http::Response<Incoming>) -> Result<T, ClientError> {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Decode(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

/// A path segment, percent-encoded.
fn seg(s: &str) -> String {
    slipway_core::form::encode(s)
}

/// What `service_logs` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogQuery {
    /// Keep following as instances come and go.
    pub follow: bool,
    /// Only this revision's instances.
    pub revision: Option<u64>,
    /// Only the last N lines of each instance.
    pub tail: Option<usize>,
    /// Only instances running within this long.
    pub since: Option<Duration>,
}

/// A streamed response body.
pub struct ByteStream(Incoming);

impl ByteStream {
    /// The next chunk, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            match self.0.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(ClientError::Decode(e.to_string()))),
            }
        }
    }
}

/// The NDJSON event stream.
pub struct EventStream {
    body: ByteStream,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next event, `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(
                    serde_json::from_slice(&line).map_err(|e| ClientError::Decode(e.to_string())),
                );
            }
            match self.body.next().await? {
                Ok(chunk) => self.buf.extend_from_slice(&chunk),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn service_path(name: &str, rest: &str) -> String {
    format!("/api/v1/services/{}{rest}", encode(name))
}

fn container_path(name: &str, rest: &str) -> String {
    format!("/api/v1/containers/{}{rest}", encode(name))
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
