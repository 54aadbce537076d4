//! Authentication and authorisation at the listener: one middleware in front of
//! every route, the registry token endpoint, and the admin routes for users,
//! tokens and the audit log.
//!
//! Each request is classified ([`classify`]) into what it needs, the caller is
//! authenticated (Basic, bearer JWT, API or refresh token), and the need checked
//! against the principal. Unauthenticated callers get 401 with a
//! `WWW-Authenticate` challenge, others that are not allowed 403; on `/v2` in
//! the OCI error shape, elsewhere in the admin API's. Handlers whose target is
//! in the body (deploy, run) check it themselves through the [`Principal`]
//! extension. Mutations and failed logins are appended to the audit log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use slipway_api::auth as wire;
use slipway_auth::{Action, Auth, AuthError, Credentials, Kind, Permissions, Principal, Via};
use slipway_core::ErrorKind;
use slipway_registry::route::{self, Route};
use slipway_registry::{Code, RegistryError};

use crate::api_error::ApiError;
use crate::audit::{AuditEntry, AuditLog, AuditQuery};

/// The listener's gatekeeper.
pub(crate) struct Gate {
    pub auth: Arc<Auth>,
    /// On whatever the database holds (a non-loopback listener).
    forced: bool,
    /// `--insecure-no-auth`.
    disabled: bool,
    /// Whether authentication is on now.
    enabled: AtomicBool,
    metrics_public: bool,
    realm: Option<String>,
    tls: bool,
    listen: SocketAddr,
    pub audit: Arc<AuditLog>,
    /// The cluster's join token: node agents pull images with it.
    join_token: Option<Arc<str>>,
}

/// Marks requests of a connection from inside a Slipway container.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FromContainer;

/// The target an audit line names, when the handler knows it better than the
/// path (a deploy's service is in its body).
#[derive(Debug, Clone)]
pub(crate) struct AuditTarget(pub String);

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: the token endpoint and the public keys.
    Open,
    /// Any authenticated principal; the handler may filter or check more.
    Authenticated,
    /// An action on a repository.
    Repo(String, Action),
    /// The registry catalog.
    Catalog,
    /// An action on a service, or on a container by name.
    Service(String, Action),
    /// An administrator.
    Admin,
    /// `/metrics`.
    Metrics,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Op {
    pub need: Need,
    /// The audit action, for mutations.
    pub audit: Option<&'static str>,
    /// The audit target.
    pub target: String,
}

fn op(need: Need, audit: Option<&'static str>, target: String) -> Op {
    Op {
        need,
        audit,
        target,
    }
}

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    slipway_core::form::pairs(query.unwrap_or(""))
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Maps a request to what it needs.
pub(crate) fn classify(
    method: &Method,
    path: &str,
    query: Option<&str>,
    metrics_public: bool,
) -> Op {
    let read = matches!(*method, Method::GET | Method::HEAD);
    if path == "/auth/token" || path == "/auth/jwks.json" {
        return op(Need::Open, None, String::new());
    }
    // The agent API, on a control plane's own node, checks the join token itself.
    if path.starts_with("/agent/") {
        return op(Need::Open, None, String::new());
    }
    if path == "/metrics" {
        let need = if metrics_public {
            Need::Open
        } else {
            Need::Metrics
        };
        return op(need, None, String::new());
    }
    if let Some(rest) = path.strip_prefix("/v2/").or((path == "/v2").then_some("")) {
        return match route::parse(rest) {
            Ok(Route::Base) | Err(_) => op(Need::Authenticated, None, String::new()),
            Ok(Route::Catalog) => op(Need::Catalog, None, String::new()),
            Ok(Route::Tags(r) | Route::Referrers(r, _)) => {
                op(Need::Repo(r.to_string(), Action::Pull), None, String::new())
            }
            Ok(Route::Manifest(r, reference)) => {
                let target = format!("repository:{r}:{reference}");
                match *method {
                    Method::PUT => op(
                        Need::Repo(r.to_string(), Action::Push),
                        Some("push"),
                        target,
                    ),
                    Method::DELETE => op(
                        Need::Repo(r.to_string(), Action::Delete),
                        Some("delete"),
                        target,
                    ),
                    _ => op(Need::Repo(r.to_string(), Action::Pull), None, target),
                }
            }
            Ok(Route::Blob(r, d)) => {
                if *method == Method::DELETE {
                    op(
                        Need::Repo(r.to_string(), Action::Delete),
                        Some("delete"),
                        format!("repository:{r}:{d}"),
                    )
                } else {
                    op(Need::Repo(r.to_string(), Action::Pull), None, String::new())
                }
            }
            Ok(Route::UploadStart(r) | Route::Upload(r, _)) => {
                op(Need::Repo(r.to_string(), Action::Push), None, String::new())
            }
        };
    }
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return op(Need::Open, None, String::new());
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let svc = |name: &str, action: Action| Need::Service(name.to_owned(), action);
    match (segs.as_slice(), method.clone()) {
        (["status" | "whoami"], _) => op(Need::Authenticated, None, String::new()),
        (["gc"], _) => op(Need::Admin, Some("gc"), "registry".into()),
        (["services"], m) if m == Method::POST => {
            op(Need::Authenticated, Some("deploy"), "service:?".into())
        }
        (["services"], _) => op(Need::Authenticated, None, String::new()),
        (["services", name], m) if m == Method::DELETE => op(
            svc(name, Action::Remove),
            Some("remove"),
            format!("service:{name}"),
        ),
        (["services", name], _) => op(svc(name, Action::Read), None, String::new()),
        (["services", name, "logs"], _) => op(svc(name, Action::Logs), None, String::new()),
        (["services", name, "rollback"], _) => op(
            svc(name, Action::Rollback),
            Some("rollback"),
            format!("service:{name}"),
        ),
        (["services", name, "scale"], _) => op(
            svc(name, Action::Scale),
            Some("scale"),
            format!("service:{name}"),
        ),
        (["services", name, verb], _) => {
            let action = match *verb {
                "pause" => "pause",
                "resume" => "resume",
                "promote" => "promote",
                "abort" => "abort",
                _ => "control",
            };
            op(
                svc(name, Action::Control),
                Some(action),
                format!("service:{name}"),
            )
        }
        (["events"], _) => match query_value(query, "service") {
            Some(s) => op(svc(&s, Action::Read), None, String::new()),
            None => op(Need::Authenticated, None, String::new()),
        },
        (["containers"], m) if m == Method::POST => {
            op(Need::Authenticated, Some("run"), "container:?".into())
        }
        (["containers"], _) => op(Need::Authenticated, None, String::new()),
        (["containers", name], m) if m == Method::DELETE => op(
            svc(name, Action::Run),
            Some("rm"),
            format!("container:{name}"),
        ),
        (["containers", name], _) => op(svc(name, Action::Read), None, String::new()),
        (["containers", name, "logs"], _) => op(svc(name, Action::Logs), None, String::new()),
        (["containers", name, "stop"], _) => op(
            svc(name, Action::Run),
            Some("stop"),
            format!("container:{name}"),
        ),
        (["users" | "tokens" | "secrets", ..], m) if m == Method::GET => {
            op(Need::Admin, None, String::new())
        }
        (["users", rest @ ..], m) => op(
            Need::Admin,
            Some(mutation("user", &m)),
            format!("user:{}", rest.first().copied().unwrap_or("?")),
        ),
        (["tokens", rest @ ..], m) => op(
            Need::Admin,
            Some(mutation("token", &m)),
            format!("token:{}", rest.first().copied().unwrap_or("?")),
        ),
        (["secrets", rest @ ..], m) => op(
            Need::Admin,
            Some(mutation("secret", &m)),
            format!("secret:{}", rest.first().copied().unwrap_or("?")),
        ),
        (["audit"], _) => op(Need::Admin, None, String::new()),
        (["nodes"], _) => op(Need::Authenticated, None, String::new()),
        // An agent's heartbeat carries the join token, which its handler checks.
        (["nodes", _, "heartbeat"], m) if m == Method::POST => op(Need::Open, None, String::new()),
        (["nodes", name], m) if m == Method::DELETE => {
            op(Need::Admin, Some("node.rm"), format!("node:{name}"))
        }
        (["nodes", _], _) => op(Need::Admin, None, String::new()),
        (["nodes", name, verb], _) => op(
            Need::Admin,
            Some(match *verb {
                "uncordon" => "node.uncordon",
                "drain" => "node.drain",
                _ => "node.cordon",
            }),
            format!("node:{name}"),
        ),
        _ if read => op(Need::Authenticated, None, String::new()),
        _ => op(Need::Authenticated, None, String::new()),
    }
}

fn mutation(noun: &str, m: &Method) -> &'static str {
    match (noun, m.as_str()) {
        ("user", "POST") => "user.add",
        ("user", "DELETE") => "user.rm",
        ("user", _) => "user.change",
        ("token", "POST") => "token.create",
        ("token", _) => "token.revoke",
        ("secret", "DELETE") => "secret.rm",
        _ => "secret.set",
    }
}

fn allowed(p: &Principal, need: &Need) -> bool {
    match need {
        Need::Open => true,
        Need::Authenticated => !p.is_anonymous() || p.via == Via::Unrestricted,
        Need::Repo(name, action) => p.allows(Kind::Repository, name, *action),
        // Anyone known may list the catalog: it is filtered to what they may pull.
        Need::Catalog => p.allows_catalog() || !p.is_anonymous(),
        Need::Service(name, action) => p.allows(Kind::Service, name, *action),
        Need::Admin => p.is_admin(),
        Need::Metrics => p.allows_metrics(),
    }
}

impl Gate {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        auth: Arc<Auth>,
        audit: Arc<AuditLog>,
        listen: SocketAddr,
        disabled: bool,
        metrics_public: bool,
        realm: Option<String>,
        tls: bool,
    ) -> anyhow::Result<Self> {
        let forced = !listen.ip().is_loopback() && !disabled;
        let g = Self {
            enabled: AtomicBool::new(false),
            auth,
            forced,
            disabled,
            metrics_public,
            realm,
            tls,
            listen,
            audit,
            join_token: None,
        };
        g.refresh()?;
        Ok(g)
    }

    /// Lets node agents that present the cluster's join token pull any image.
    pub(crate) fn with_join_token(mut self, token: Option<Arc<str>>) -> Self {
        self.join_token = token;
        self
    }

    /// The principal of a node agent, if `creds` is the join token.
    fn node_agent(&self, creds: &Credentials) -> Option<Principal> {
        let (Credentials::Bearer(t), Some(join)) = (creds, &self.join_token) else {
            return None;
        };
        slipway_auth::opaque::same_secret(t, join).then(|| {
            Principal::with_permissions(
                "node-agent",
                Via::ApiToken,
                slipway_auth::policy::Permissions {
                    admin: false,
                    metrics: false,
                    grants: vec![slipway_auth::policy::Grant {
                        kind: Kind::Repository,
                        glob: "*".into(),
                        role: slipway_auth::policy::Role::Reader,
                    }],
                },
            )
        })
    }

    /// Re-derives whether authentication is on (after users change).
    pub(crate) fn refresh(&self) -> anyhow::Result<()> {
        let on = !self.disabled && (self.forced || self.auth.has_users()?);
        self.enabled.store(on, Ordering::Release);
        Ok(())
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn realm(&self, headers: &HeaderMap) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let scheme = if self.tls { "https" } else { "http" };
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map_or_else(|| self.listen.to_string(), str::to_owned);
        format!("{scheme}://{host}/auth/token")
    }

    fn challenge(&self, headers: &HeaderMap, need: &Need, insufficient: bool) -> String {
        let scope = match need {
            Need::Repo(name, Action::Pull) => format!("repository:{name}:pull"),
            Need::Repo(name, Action::Delete) => format!("repository:{name}:delete"),
            Need::Repo(name, _) => format!("repository:{name}:pull,push"),
            Need::Catalog => "registry:catalog:*".into(),
            _ => String::new(),
        };
        let mut c = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(headers),
            self.auth.config().service
        );
        if !scope.is_empty() {
            c.push_str(&format!(",scope=\"{scope}\""));
        }
        if insufficient {
            c.push_str(",error=\"insufficient_scope\"");
        }
        c
    }

    async fn authenticate(&self, creds: Credentials, peer: IpAddr) -> Result<Principal, AuthError> {
        if let Credentials::Bearer(t) = &creds
            && slipway_auth::jwt::looks_like_jwt(t)
        {
            // A signature check: cheap, no I/O.
            return self.auth.authenticate(&creds, peer);
        }
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || auth.authenticate(&creds, peer))
            .await
            .map_err(|e| AuthError::Db(slipway_auth::DbError::Other(e.to_string())))?
    }

    async fn record(&self, entry: AuditEntry) {
        let audit = self.audit.clone();
        let r = tokio::task::spawn_blocking(move || audit.append(&entry)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::error!("cannot append to the audit log: {r:?}");
        }
    }
}

impl crate::services::PushPolicy for Gate {
    fn admit(&self, principal: Option<&str>, service: &str, repo: &str) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(name) = principal else {
            return Err("the push carried no principal".into());
        };
        let p = self
            .auth
            .principal_named(name)
            .map_err(|e| format!("cannot check {name}'s rights: {e}"))?
            .ok_or_else(|| format!("{name} no longer exists"))?;
        if !p.allows(Kind::Service, service, Action::Deploy) {
            return Err(format!("{name} may not deploy service {service:?}"));
        }
        if !p.allows(Kind::Repository, repo, Action::Pull) {
            return Err(format!("{name} may not pull repository {repo:?}"));
        }
        Ok(())
    }
}

fn peer_of(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |c| c.0.ip())
}

fn result_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=399 => "ok",
        401 | 403 => "denied",
        _ => "failed",
    }
}

enum Refusal {
    Unauthenticated(String, bool),
    Denied(String),
    Limited(std::time::Duration),
    Unavailable(String),
}

fn refuse(g: &Gate, headers: &HeaderMap, path: &str, need: &Need, why: Refusal) -> Response {
    let registry = path == "/v2" || path.starts_with("/v2/");
    match why {
        Refusal::Unauthenticated(msg, insufficient) => {
            let c = g.challenge(headers, need, insufficient);
            let mut resp = if registry {
                RegistryError::new(Code::Unauthorized, msg).into_response()
            } else {
                ApiError::new(
                    ErrorKind::Unauthenticated,
                    format!("{msg}: log in with `slipway login`, or pass a token in SLIPWAY_TOKEN"),
                )
                .into_response()
            };
            if let Ok(v) = HeaderValue::from_str(&c) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
        Refusal::Denied(msg) => {
            if registry {
                // The challenge lets clients that cached a narrower token (oras)
                // fetch one for this scope before giving up.
                let mut resp = RegistryError::new(Code::Denied, msg).into_response();
                if let Ok(v) = HeaderValue::from_str(&g.challenge(headers, need, true)) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                resp
            } else {
                ApiError::new(ErrorKind::PermissionDenied, msg).into_response()
            }
        }
        Refusal::Limited(wait) => {
            let msg = format!(
                "too many failed logins: retry in {} s",
                wait.as_secs().max(1)
            );
            let mut resp = if registry {
                RegistryError::new(Code::TooManyRequests, msg).into_response()
            } else {
                let mut r = ApiError::new(ErrorKind::Unauthenticated, msg).into_response();
                *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                r
            };
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(wait.as_secs().max(1)),
            );
            resp
        }
        Refusal::Unavailable(msg) => {
            if registry {
                RegistryError::new(Code::Unknown, msg)
                    .with_status(StatusCode::SERVICE_UNAVAILABLE)
                    .into_response()
            } else {
                ApiError::new(ErrorKind::Unavailable, msg).into_response()
            }
        }
    }
}

fn describe(need: &Need) -> String {
    match need {
        Need::Repo(name, a) => format!("{} on repository {name:?}", a.as_str()),
        Need::Service(name, a) => format!("{} on {name:?}", a.as_str()),
        Need::Catalog => "listing the catalog".into(),
        Need::Admin => "administration (users, tokens, secrets, audit, gc)".into(),
        Need::Metrics => "reading /metrics".into(),
        Need::Authenticated | Need::Open => "this".into(),
    }
}

/// The middleware.
pub(crate) async fn gate(State(g): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let peer = peer_of(&req);
    let path = req.uri().path().to_owned();
    let op = classify(req.method(), &path, req.uri().query(), g.metrics_public);
    let principal = if g.enabled() {
        let creds = match req.headers().get(header::AUTHORIZATION) {
            None => None,
            Some(v) => match slipway_auth::header::parse(v.as_bytes()) {
                Ok(c) => Some(c),
                Err(e) => {
                    return refuse(
                        &g,
                        req.headers(),
                        &path,
                        &op.need,
                        Refusal::Unauthenticated(e.to_string(), false),
                    );
                }
            },
        };
        let login = matches!(creds, Some(Credentials::Basic { .. }));
        let user = match &creds {
            Some(Credentials::Basic { user, .. }) => user.clone(),
            _ => "bearer".into(),
        };
        let agent = creds.as_ref().and_then(|c| g.node_agent(c));
        match (agent, creds) {
            (Some(p), _) => p,
            (None, None) => g.auth.anonymous(),
            (None, Some(c)) => match g.authenticate(c, peer).await {
                Ok(p) => p,
                Err(e) => {
                    let why = match e {
                        AuthError::Unauthenticated(m) => Refusal::Unauthenticated(m, false),
                        AuthError::RateLimited(d) => Refusal::Limited(d),
                        e => Refusal::Unavailable(e.to_string()),
                    };
                    let resp = refuse(&g, req.headers(), &path, &op.need, why);
                    if login || resp.status() == StatusCode::UNAUTHORIZED {
                        g.record(AuditEntry {
                            at_ms: slipway_core::now_ms(),
                            principal: user,
                            source: peer.to_string(),
                            action: "login".into(),
                            target: path.clone(),
                            result: "denied".into(),
                            status: resp.status().as_u16(),
                        })
                        .await;
                    }
                    return resp;
                }
            },
        }
    } else if req.extensions().get::<FromContainer>().is_some() && op.need != Need::Open {
        return refuse(
            &g,
            req.headers(),
            &path,
            &op.need,
            Refusal::Unauthenticated(
                "authentication is off (no user exists yet) and requests from containers are refused".into(),
                false,
            ),
        );
    } else {
        Principal::unrestricted()
    };
    if !allowed(&principal, &op.need) {
        let resp = if principal.is_anonymous() {
            refuse(
                &g,
                req.headers(),
                &path,
                &op.need,
                Refusal::Unauthenticated("authentication required".into(), false),
            )
        } else if principal.via == Via::RegistryToken
            && matches!(op.need, Need::Repo(..) | Need::Catalog)
            && principal.name == "anonymous"
        {
            // An anonymous registry token: log in for more.
            refuse(
                &g,
                req.headers(),
                &path,
                &op.need,
                Refusal::Unauthenticated("authentication required".into(), true),
            )
        } else {
            refuse(
                &g,
                req.headers(),
                &path,
                &op.need,
                Refusal::Denied(format!(
                    "{} may not do {}",
                    principal.name,
                    describe(&op.need)
                )),
            )
        };
        if let Some(action) = op.audit {
            g.record(AuditEntry {
                at_ms: slipway_core::now_ms(),
                principal: principal.name.clone(),
                source: peer.to_string(),
                action: action.into(),
                target: op.target.clone(),
                result: "denied".into(),
                status: resp.status().as_u16(),
            })
            .await;
        }
        return resp;
    }
    // A cross-repository mount reads the source: without pull there, fall back
    // to a plain upload, as the spec allows.
    if let Some(from) = query_value(req.uri().query(), "from")
        && req.method() == Method::POST
        && !principal.allows(Kind::Repository, &from, Action::Pull)
    {
        let kept: Vec<String> = slipway_core::form::pairs(req.uri().query().unwrap_or(""))
            .into_iter()
            .filter(|(k, _)| k != "mount" && k != "from")
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    slipway_core::form::encode(&k),
                    slipway_core::form::encode(&v)
                )
            })
            .collect();
        let pq = if kept.is_empty() {
            path.clone()
        } else {
            format!("{path}?{}", kept.join("&"))
        };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
    if op.need == Need::Catalog && !principal.allows_catalog() {
        let p = principal.clone();
        req.extensions_mut()
            .insert(slipway_registry::CatalogFilter(Arc::new(
                move |repo: &str| p.allows(Kind::Repository, repo, Action::Pull),
            )));
    }
    req.extensions_mut()
        .insert(slipway_registry::Caller(principal.name.clone()));
    req.extensions_mut().insert(principal.clone());
    let resp = next.run(req).await;
    if let Some(action) = op.audit {
        let target = resp
            .extensions()
            .get::<AuditTarget>()
            .map_or(op.target, |t| t.0.clone());
        g.record(AuditEntry {
            at_ms: slipway_core::now_ms(),
            principal: principal.name.clone(),
            source: peer.to_string(),
            action: action.into(),
            target,
            result: result_of(resp.status()).into(),
            status: resp.status().as_u16(),
        })
        .await;
    }
    resp
}

/// The caller a handler sees: the gate's principal, or unrestricted when the
/// router runs without the gate (unit tests).
pub(crate) type Caller = Option<axum::Extension<Principal>>;

/// The caller's principal.
pub(crate) fn principal(c: &Caller) -> Principal {
    c.as_ref()
        .map_or_else(Principal::unrestricted, |axum::Extension(p)| p.clone())
}

/// Checks a right a handler found in a request body.
pub(crate) fn require(
    p: &Principal,
    kind: Kind,
    name: &str,
    action: Action,
) -> Result<(), ApiError> {
    if p.allows(kind, name, action) {
        return Ok(());
    }
    let noun = match kind {
        Kind::Repository => "repository",
        Kind::Service => "",
    };
    Err(ApiError::new(
        if p.is_anonymous() {
            ErrorKind::Unauthenticated
        } else {
            ErrorKind::PermissionDenied
        },
        format!(
            "{} may not {} {noun}{}{name:?}",
            p.name,
            action.as_str(),
            if noun.is_empty() { "" } else { " " }
        ),
    ))
}

// === the token endpoint ===

fn oauth_error(status: StatusCode, code: Code, msg: String) -> Response {
    RegistryError::new(code, msg)
        .with_status(status)
        .into_response()
}

/// `GET|POST /auth/token`: Distribution's token endpoint and its OAuth2 form.
async fn token(State(g): State<Arc<Gate>>, req: Request) -> Response {
    let peer = peer_of(&req);
    let method = req.method().clone();
    let headers = req.headers().clone();
    let mut params = slipway_core::form::pairs(req.uri().query().unwrap_or(""));
    if method == Method::POST {
        match axum::body::to_bytes(req.into_body(), 64 * 1024).await {
            Ok(b) => params.extend(slipway_core::form::pairs(&String::from_utf8_lossy(&b))),
            Err(e) => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    Code::Unsupported,
                    format!("cannot read the form: {e}"),
                );
            }
        }
    } else if method != Method::GET {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "use GET or POST".into(),
        );
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(service) = get("service")
        && service != g.auth.config().service
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            Code::Unsupported,
            format!(
                "this server issues tokens for service {:?}, not {service:?}",
                g.auth.config().service
            ),
        );
    }
    let mut scopes = Vec::new();
    for (_, s) in params.iter().filter(|(k, _)| k == "scope") {
        match slipway_auth::scope::parse(s) {
            Ok(mut v) => scopes.append(&mut v),
            Err(e) => {
                return oauth_error(StatusCode::BAD_REQUEST, Code::Unsupported, e.to_string());
            }
        }
    }
    let creds = if method == Method::POST {
        match get("grant_type").as_deref() {
            Some("password") => match (get("username"), get("password")) {
                (Some(user), Some(password)) => Some(Credentials::Basic { user, password }),
                _ => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        Code::Unsupported,
                        "grant_type=password needs username and password".into(),
                    );
                }
            },
            Some("refresh_token") => match get("refresh_token") {
                Some(t) => Some(Credentials::Bearer(t)),
                None => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        Code::Unsupported,
                        "grant_type=refresh_token needs refresh_token".into(),
                    );
                }
            },
            other => {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    Code::Unsupported,
                    format!("unsupported grant_type {other:?}: use password or refresh_token"),
                );
            }
        }
    } else {
        match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(v) => match slipway_auth::header::parse(v.as_bytes()) {
                Ok(c) => Some(c),
                Err(e) => {
                    return oauth_error(
                        StatusCode::UNAUTHORIZED,
                        Code::Unauthorized,
                        e.to_string(),
                    );
                }
            },
        }
    };
    let user = match &creds {
        Some(Credentials::Basic { user, .. }) => user.clone(),
        _ => "token".into(),
    };
    let principal = match creds {
        None if g.enabled() => g.auth.anonymous(),
        None => Principal::unrestricted(),
        Some(Credentials::Bearer(t)) if slipway_auth::jwt::looks_like_jwt(&t) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                Code::Unauthorized,
                "present a password or a refresh token, not an access token".into(),
            );
        }
        Some(c) => match g.authenticate(c, peer).await {
            Ok(p) => p,
            Err(e) => {
                let (status, code) = match e {
                    AuthError::RateLimited(_) => {
                        (StatusCode::TOO_MANY_REQUESTS, Code::TooManyRequests)
                    }
                    AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, Code::Unauthorized),
                    _ => (StatusCode::SERVICE_UNAVAILABLE, Code::Unknown),
                };
                g.record(AuditEntry {
                    at_ms: slipway_core::now_ms(),
                    principal: user,
                    source: peer.to_string(),
                    action: "login".into(),
                    target: "/auth/token".into(),
                    result: "denied".into(),
                    status: status.as_u16(),
                })
                .await;
                return oauth_error(status, code, e.to_string());
            }
        },
    };
    let offline = get("offline_token").as_deref() == Some("true")
        || get("access_type").as_deref() == Some("offline");
    let refresh = if offline && matches!(principal.via, Via::Password) {
        let auth = g.auth.clone();
        let p = principal.clone();
        match tokio::task::spawn_blocking(move || auth.refresh_token(&p)).await {
            Ok(Ok(t)) => Some(t),
            _ => {
                return oauth_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unknown,
                    "cannot store the refresh token".into(),
                );
            }
        }
    } else if method == Method::POST && get("grant_type").as_deref() == Some("refresh_token") {
        get("refresh_token")
    } else {
        None
    };
    let issued = g.auth.issue(&principal, &scopes);
    axum::Json(wire::TokenResponse {
        access_token: issued.token.clone(),
        token: issued.token,
        expires_in: issued.expires_in.as_secs(),
        issued_at: slipway_core::form::rfc3339(slipway_core::now_ms()),
        refresh_token: refresh,
    })
    .into_response()
}

async fn jwks(State(g): State<Arc<Gate>>) -> Response {
    axum::Json(g.auth.jwks()).into_response()
}

// === users, tokens, audit ===

fn api_err(e: AuthError) -> ApiError {
    match e {
        AuthError::Invalid(field, m) => ApiError {
            kind: ErrorKind::InvalidArgument,
            message: m,
            field: Some(field.to_owned()),
        },
        AuthError::Exists(m) => ApiError::new(ErrorKind::AlreadyExists, m),
        AuthError::NotFound(m) => ApiError::new(ErrorKind::NotFound, m),
        AuthError::Refused(m) => ApiError::new(ErrorKind::FailedPrecondition, m),
        AuthError::Unauthenticated(m) => ApiError::new(ErrorKind::Unauthenticated, m),
        e @ AuthError::RateLimited(_) => ApiError::new(ErrorKind::Unauthenticated, e.to_string()),
        AuthError::Db(e) => ApiError::new(ErrorKind::Unavailable, e.to_string()),
    }
}

/// Wire rights to policy permissions, naming the bad field.
pub(crate) fn permissions_of(r: &wire::Rights) -> Result<Permissions, ApiError> {
    let mut grants = Vec::new();
    for g in &r.grants {
        let kind = match g.kind.as_str() {
            "repository" => Kind::Repository,
            "service" => Kind::Service,
            k => {
                return Err(ApiError::invalid(
                    "rights.grants",
                    format!("unknown kind {k:?}: use repository or service"),
                ));
            }
        };
        let grant = slipway_auth::Grant::parse(kind, &format!("{}={}", g.glob, g.role))
            .map_err(|e| ApiError::invalid("rights.grants", e))?;
        grants.push(grant);
    }
    Ok(Permissions {
        admin: r.admin,
        metrics: r.metrics,
        grants,
    })
}

pub(crate) fn rights_of(p: &Permissions) -> wire::Rights {
    wire::Rights {
        admin: p.admin,
        metrics: p.metrics,
        grants: p
            .grants
            .iter()
            .map(|g| wire::GrantSpec {
                kind: match g.kind {
                    Kind::Repository => "repository".into(),
                    Kind::Service => "service".into(),
                },
                glob: g.glob.clone(),
                role: g.role.to_string(),
            })
            .collect(),
    }
}

fn token_info(t: slipway_auth::TokenRecord) -> wire::TokenInfo {
    wire::TokenInfo {
        rights: rights_of(&t.permissions),
        id: t.id,
        name: t.name,
        created_by: t.created_by,
        created_ms: t.created_ms,
        expires_ms: t.expires_ms,
        revoked_ms: t.revoked_ms,
    }
}

async fn blocking<T: Send + 'static>(
    g: &Gate,
    f: impl FnOnce(&Auth) -> Result<T, AuthError> + Send + 'static,
) -> Result<T, ApiError> {
    let auth = g.auth.clone();
    tokio::task::spawn_blocking(move || f(&auth))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(api_err)
}

fn json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("request body is not a valid {what}: {e}"),
        )
    })
}

async fn users(State(g): State<Arc<Gate>>) -> Result<Response, ApiError> {
    let list = blocking(&g, |a| Ok(a.db().users()?)).await?;
    Ok(axum::Json(
        list.into_iter()
            .map(|u| wire::UserInfo {
                rights: rights_of(&u.permissions),
                name: u.name,
                created_ms: u.created_ms,
            })
            .collect::<Vec<_>>(),
    )
    .into_response())
}

async fn add_user(State(g): State<Arc<Gate>>, body: Bytes) -> Result<Response, ApiError> {
    let req: wire::CreateUser = json(&body, "user")?;
    let perms = permissions_of(&req.rights)?;
    let name = req.name.clone();
    blocking(&g, move |a| a.add_user(&req.name, &req.password, perms)).await?;
    g.refresh()
        .map_err(|e| ApiError::new(ErrorKind::Unavailable, e.to_string()))?;
    let mut resp = StatusCode::CREATED.into_response();
    resp.extensions_mut()
        .insert(AuditTarget(format!("user:{name}")));
    Ok(resp)
}

async fn remove_user(
    State(g): State<Arc<Gate>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&g, move |a| a.remove_user(&name)).await?;
    g.refresh()
        .map_err(|e| ApiError::new(ErrorKind::Unavailable, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn set_password(
    State(g): State<Arc<Gate>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: wire::SetPassword = json(&body, "password change")?;
    blocking(&g, move |a| a.set_password(&name, &req.password)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn tokens(State(g): State<Arc<Gate>>) -> Result<Response, ApiError> {
    let list = blocking(&g, |a| a.api_tokens()).await?;
    Ok(axum::Json(list.into_iter().map(token_info).collect::<Vec<_>>()).into_response())
}

async fn create_token(
    State(g): State<Arc<Gate>>,
    axum::Extension(caller): axum::Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: wire::CreateToken = json(&body, "token request")?;
    let permissions = permissions_of(&req.rights)?;
    let by = caller.name.clone();
    let (rec, token) = blocking(&g, move |a| {
        a.create_token(
            slipway_auth::TokenRequest {
                name: req.name,
                permissions,
                ttl: req.expires_in_s.map(std::time::Duration::from_secs),
            },
            &by,
        )
    })
    .await?;
    let target = format!("token:{}", rec.name);
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(wire::CreatedToken {
            token,
            info: token_info(rec),
        }),
    )
        .into_response();
    resp.extensions_mut().insert(AuditTarget(target));
    Ok(resp)
}

async fn revoke_token(
    State(g): State<Arc<Gate>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let rec = blocking(&g, move |a| a.revoke_token(&name)).await?;
    Ok(axum::Json(token_info(rec)).into_response())
}

async fn whoami(
    State(g): State<Arc<Gate>>,
    axum::Extension(p): axum::Extension<Principal>,
) -> Response {
    let via = match p.via {
        Via::Anonymous => "anonymous",
        Via::Password => "password",
        Via::ApiToken => "api-token",
        Via::RefreshToken => "login",
        Via::RegistryToken => "registry-token",
        Via::Unrestricted => "none",
    };
    axum::Json(wire::WhoAmI {
        name: p.name,
        via: via.into(),
        auth_enabled: g.enabled(),
    })
    .into_response()
}

async fn audit(
    State(g): State<Arc<Gate>>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let log = g.audit.clone();
    let entries = tokio::task::spawn_blocking(move || log.read(&q))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("cannot read the audit log: {e}"),
            )
        })?;
    Ok(axum::Json(entries).into_response())
}

/// Secrets for instances, from the auth database.
pub(crate) struct AuthSecrets(pub Arc<Auth>);

impl crate::services::SecretValues for AuthSecrets {
    fn version(&self, name: &str, service: &str) -> Result<u64, String> {
        self.0
            .secret_version(name, service)
            .map_err(|e| e.to_string())
    }

    fn value(&self, name: &str, service: &str) -> Result<Vec<u8>, String> {
        self.0
            .open_secret(name, service)
            .map(|(v, _)| v)
            .map_err(|e| e.to_string())
    }
}

#[derive(Clone)]
struct SecretsState {
    gate: Arc<Gate>,
    services: Arc<crate::services::Services>,
}

fn secret_info(s: slipway_auth::SecretRecord, rolled: Vec<String>) -> wire::SecretInfo {
    wire::SecretInfo {
        name: s.name,
        version: s.version,
        services: s.services,
        updated_ms: s.updated_ms,
        rolled,
    }
}

async fn secrets(State(st): State<SecretsState>) -> Result<Response, ApiError> {
    let list = blocking(&st.gate, |a| a.secrets()).await?;
    Ok(axum::Json(
        list.into_iter()
            .map(|s| secret_info(s, Vec::new()))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

async fn set_secret(
    State(st): State<SecretsState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: wire::SetSecret = json(&body, "secret")?;
    let n = name.clone();
    let rec = blocking(&st.gate, move |a| {
        a.set_secret(&n, req.value.as_bytes(), req.services)?;
        a.db()
            .secret(&n)?
            .ok_or_else(|| AuthError::NotFound(format!("no secret {n:?}")))
    })
    .await?;
    let rolled = st.services.roll_secret(&name).await;
    Ok(axum::Json(secret_info(rec, rolled)).into_response())
}

async fn remove_secret(
    State(st): State<SecretsState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let users = st.services.users_of_secret(&name);
    if !users.is_empty() {
        return Err(ApiError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "secret {name:?} is used by {}: deploy them without it first",
                users.join(", ")
            ),
        ));
    }
    blocking(&st.gate, move |a| a.remove_secret(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The secrets routes (they roll services, so they need them).
pub(crate) fn secrets_router(gate: Arc<Gate>, services: Arc<crate::services::Services>) -> Router {
    use axum::routing::{get, put};
    Router::new()
        .route("/api/v1/secrets", get(secrets))
        .route(
            "/api/v1/secrets/{name}",
            put(set_secret).delete(remove_secret),
        )
        .with_state(SecretsState { gate, services })
}

/// The routes this module serves.
pub(crate) fn router(g: Arc<Gate>) -> Router {
    use axum::routing::{delete, get, put};
    Router::new()
        .route("/auth/token", axum::routing::any(token))
        .route("/auth/jwks.json", get(jwks))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/users", get(users).post(add_user))
        .route("/api/v1/users/{name}", delete(remove_user))
        .route("/api/v1/users/{name}/password", put(set_password))
        .route("/api/v1/tokens", get(tokens).post(create_token))
        .route("/api/v1/tokens/{name}", delete(revoke_token))
        .route("/api/v1/audit", get(audit))
        .with_state(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_maps_to_its_need() {
        let c = |m: Method, p: &str, q: Option<&str>| classify(&m, p, q, false).need;
        let repo = |n: &str, a| Need::Repo(n.into(), a);
        let svc = |n: &str, a| Need::Service(n.into(), a);
        assert_eq!(c(Method::GET, "/v2/", None), Need::Authenticated);
        assert_eq!(c(Method::GET, "/v2/_catalog", None), Need::Catalog);
        assert_eq!(
            c(Method::GET, "/v2/a/b/tags/list", None),
            repo("a/b", Action::Pull)
        );
        assert_eq!(
            c(Method::HEAD, "/v2/a/manifests/v1", None),
            repo("a", Action::Pull)
        );
        assert_eq!(
            c(Method::PUT, "/v2/a/manifests/v1", None),
            repo("a", Action::Push)
        );
        assert_eq!(
            c(Method::DELETE, "/v2/a/manifests/v1", None),
            repo("a", Action::Delete)
        );
        assert_eq!(
            c(Method::POST, "/v2/a/blobs/uploads/", None),
            repo("a", Action::Push)
        );
        assert_eq!(
            c(Method::PATCH, "/v2/a/blobs/uploads/x", None),
            repo("a", Action::Push)
        );
        assert_eq!(
            c(Method::GET, "/v2/../x/manifests/v1", None),
            Need::Authenticated
        );
        assert_eq!(c(Method::GET, "/metrics", None), Need::Metrics);
        assert_eq!(
            classify(&Method::GET, "/metrics", None, true).need,
            Need::Open
        );
        assert_eq!(c(Method::POST, "/auth/token", None), Need::Open);
        assert_eq!(
            c(Method::GET, "/api/v1/services/web", None),
            svc("web", Action::Read)
        );
        assert_eq!(
            c(Method::DELETE, "/api/v1/services/web", None),
            svc("web", Action::Remove)
        );
        assert_eq!(
            c(Method::POST, "/api/v1/services/web/scale", None),
            svc("web", Action::Scale)
        );
        assert_eq!(
            c(Method::POST, "/api/v1/services/web/pause", None),
            svc("web", Action::Control)
        );
        assert_eq!(
            c(Method::GET, "/api/v1/services/web/logs", None),
            svc("web", Action::Logs)
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/events",
                Some("service=web&follow=true")
            ),
            svc("web", Action::Read)
        );
        assert_eq!(
            c(Method::POST, "/api/v1/containers/c1/stop", None),
            svc("c1", Action::Run)
        );
        assert_eq!(c(Method::POST, "/api/v1/gc", None), Need::Admin);
        assert_eq!(c(Method::POST, "/api/v1/users", None), Need::Admin);
        assert_eq!(c(Method::GET, "/api/v1/tokens", None), Need::Admin);
        assert_eq!(c(Method::GET, "/api/v1/audit", None), Need::Admin);
        assert_eq!(c(Method::PUT, "/api/v1/secrets/x", None), Need::Admin);
        assert_eq!(
            classify(&Method::PUT, "/v2/a/manifests/v1", None, false).audit,
            Some("push")
        );
        assert_eq!(
            classify(&Method::POST, "/api/v1/services/web/rollback", None, false).audit,
            Some("rollback")
        );
    }
}
