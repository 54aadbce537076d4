//! The listener: plain or TLS, HTTP/1.1 and h2, with graceful shutdown.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use slipway_registry::{Registry, RegistryConfig, RegistryEvent};
use slipway_store::{GcOptions, Store};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::config::{Settings, TlsConfig};
use crate::http::{AppState, router};
use crate::metrics::AppMetrics;
use crate::tasks;

/// Resolves once `leadership` (if any) reports it was lost; never without one.
async fn lost(leadership: &mut Option<watch::Receiver<bool>>) {
    match leadership {
        Some(rx) => {
            if rx.wait_for(|l| *l).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Opens the registry's store: blobs on the local disk or in a bucket, indexes
/// in an embedded database or (shared by replicas) in PostgreSQL.
fn open_store(
    data_dir: &std::path::Path,
    storage: crate::config::BlobStorage,
    database: Option<&str>,
    handle: tokio::runtime::Handle,
) -> anyhow::Result<Store> {
    let blobs: Arc<dyn slipway_store::BlobBackend> = match storage {
        crate::config::BlobStorage::Filesystem => {
            Arc::new(slipway_store::blobs::FsBlobs::open(data_dir)?)
        }
        crate::config::BlobStorage::S3(cfg) => {
            tracing::info!(bucket = %cfg.bucket, endpoint = ?cfg.endpoint, "registry blobs in object storage");
            Arc::new(slipway_s3::S3Blobs::new(&cfg, handle.clone()).map_err(anyhow::Error::msg)?)
        }
    };
    let Some(url) = database else {
        return Ok(Store::open_with(data_dir, blobs)?);
    };
    let meta = slipway_postgres::PgMetadata::open(url, handle).with_context(|| {
        format!(
            "storage.database: cannot open {}",
            crate::config::redact_password(url)
        )
    })?;
    tracing::info!(database = %crate::config::redact_password(url), "registry metadata shared in PostgreSQL");
    Ok(Store::open_parts(data_dir, blobs, Arc::new(meta))?)
}

/// Runs `slipway serve` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish within the configured grace, and returns.
///
/// `on_ready` is called with the bound address once the listener is up.
pub async fn serve(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let tls = settings.tls.as_ref().map(load_tls).transpose()?;
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let data_dir = settings.data_dir.clone();
    let storage = settings.blob_storage.clone();
    let handle = tokio::runtime::Handle::current();
    let database = settings.registry_database.clone();
    let store = tokio::task::spawn_blocking(move || {
        open_store(&data_dir, storage, database.as_deref(), handle)
    })
    .await?
    .with_context(|| format!("cannot open the store in {}", settings.data_dir.display()))?;
    store.set_immutable(settings.registry.immutable.clone());
    let store = Arc::new(store);

    let (events, _) = broadcast::channel::<RegistryEvent>(1024);
    let registry = Registry::new(
        store.clone(),
        RegistryConfig {
            max_manifest_bytes: settings.registry.max_manifest_bytes,
        },
        events.clone(),
    );
    let listener = TcpListener::bind(settings.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another process using it? pick another with --listen",
            settings.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(AppMetrics::default());
    let port = addr.port();
    let mut rt_cfg = slipway_runtime::RuntimeConfig::new(settings.data_dir.join("runtime"));
    rt_cfg.binary = settings.runtime.binary.clone();
    rt_cfg.stop_grace = settings.runtime.stop_grace.0;
    rt_cfg.log_max_bytes = settings.runtime.log_max_bytes;
    rt_cfg.log_files = settings.runtime.log_files;
    rt_cfg.log_check_interval = settings.runtime.log_check_interval.0;
    rt_cfg.local_hosts = vec![
        addr.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
    ];
    let runtime = slipway_runtime::Runtime::open(
        rt_cfg,
        Arc::new(crate::services::StoreSource(store.clone())),
    )
    .context("cannot open the container runtime")?;
    match runtime.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(containers = n, "recovered containers"),
        Err(e) => tracing::error!("cannot recover containers: {e}"),
    }
    let auth_cfg = settings.auth.clone();
    let data_dir = settings.data_dir.clone();
    let auth = tokio::task::spawn_blocking(move || slipway_auth::Auth::open(&data_dir, auth_cfg))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open the auth database: {e}"))?;
    let auth = Arc::new(auth);
    let (state, etcd) =
        crate::services::Services::state_store(&settings.data_dir, &settings.state_endpoints)
            .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Where other machines reach this node: --advertise, else the listen address
    // (loopback when it listens on every interface).
    let advertise = settings.advertise.unwrap_or(match addr.ip() {
        ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    });
    let join_token: Option<Arc<str>> = settings.join_token.as_deref().map(Arc::from);
    // With etcd and a join token this node serves the agent API, so whichever
    // control plane leads can run instances on it.
    let agent_api = (etcd.is_some() && join_token.is_some() && settings.run_instances)
        .then(|| std::net::SocketAddr::new(advertise, port).to_string());
    let nodes = crate::nodes::Nodes::register(
        state.clone(),
        &settings.node_name,
        advertise.to_string(),
        agent_api.clone(),
        settings.node_labels.clone(),
        etcd.is_some(),
        settings.run_instances,
        settings.cluster,
        join_token.clone(),
        stop_rx.clone(),
    )
    .await?;
    let ports = Arc::new(crate::services::Ports::new(
        settings.port_range.0,
        settings.port_range.1,
    ));
    let services = crate::services::Services::open(
        state,
        runtime.clone(),
        store.clone(),
        vec![
            addr.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
        ],
        ports.clone(),
        Arc::new(crate::auth::AuthSecrets(auth.clone())),
        &settings.node_name,
        etcd.is_some().then(|| (nodes.clone(), join_token.clone())),
    )?;
    if let Some(cluster) = services.cluster() {
        cluster.monitor(stop_rx.clone());
    }
    let agent = match (&agent_api, &join_token) {
        (Some(_), Some(token)) => Some(crate::agent::AgentState {
            runtime: runtime.clone(),
            ports,
            token: token.clone(),
        }),
        _ => None,
    };
    // With etcd, only the leader of the control planes runs the services; the
    // others are standbys that take over within the lease TTL.
    let mut leadership_lost = match etcd {
        None => {
            services.recover(&settings.data_dir.join("services")).await;
            None
        }
        Some(etcd) => {
            let lost = services.lead_then_recover(
                etcd,
                settings.cluster.lease_ttl.0,
                format!("{addr} {}", std::process::id()),
                settings.data_dir.join("services"),
            );
            // Until it leads, this control plane serves the leader's route tables.
            services.follow_routes();
            Some(lost)
        }
    };
    let audit = Arc::new(
        crate::audit::AuditLog::open(
            &settings.data_dir,
            settings.audit.max_bytes,
            settings.audit.files,
        )
        .context("cannot open the audit log")?,
    );
    let gate = Arc::new(
        crate::auth::Gate::new(
            auth,
            audit,
            addr,
            settings.insecure_no_auth,
            settings.metrics_public,
            settings.realm.clone(),
            tls.is_some(),
        )?
        .with_join_token(join_token.clone()),
    );
    if settings.insecure_no_auth {
        tracing::warn!(
            "--insecure-no-auth: authentication is OFF; anyone who can reach {addr} can push, deploy and run containers as root"
        );
    } else if !gate.enabled() {
        tracing::warn!(
            "authentication is off until a user exists: processes on this host, containers included, can use the admin API; create one with `slipway user add NAME --role admin --data {}`",
            settings.data_dir.display()
        );
    }
    tokio::spawn(
        services
            .clone()
            .watch_registry(events.subscribe(), gate.clone()),
    );
    let prometheus =
        Arc::new(metrics.registry(registry.metrics(), store.clone(), services.clone()));
    let state = AppState {
        mirrors: crate::mirror::Mirrors::new(&settings.registry.mirror, store.clone()),
        agent,
        gate,
        nodes,
        services: services.clone(),
        runtime: runtime.clone(),
        registry,
        metrics: metrics.clone(),
        prometheus,
        gc: GcOptions {
            delete_untagged: settings.gc.delete_untagged,
            grace: settings.gc.grace_period.0,
            retention: settings.registry.retention.clone(),
            ..GcOptions::default()
        },
        snapshot_gc: slipway_runtime::SnapshotGcOptions {
            grace: settings.runtime.snapshot_grace.0,
            high_percent: settings.runtime.disk_high_percent,
            low_percent: settings.runtime.disk_low_percent,
            ..slipway_runtime::SnapshotGcOptions::default()
        },
    };

    let mut background = tokio::task::JoinSet::new();
    background.spawn(tasks::purge_loop(
        store.clone(),
        settings.registry.upload_purge_after.0,
        settings.registry.upload_purge_interval.0,
        stop_rx.clone(),
    ));
    background.spawn(tasks::snapshot_gc_loop(
        runtime.clone(),
        services.clone(),
        state.snapshot_gc.clone(),
        stop_rx.clone(),
    ));
    if let Some(every) = settings.gc.interval {
        background.spawn(tasks::gc_loop(
            store.clone(),
            metrics.clone(),
            services.clone(),
            state.gc.clone(),
            every.0,
            stop_rx.clone(),
        ));
    }
    if !settings.webhooks.is_empty() {
        background.spawn(tasks::webhook_loop(
            settings.webhooks.clone(),
            events.subscribe(),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }

    let state_gate = state.gate.clone();
    let app = router(state);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(data_dir = %settings.data_dir.display(), "listening on {scheme}://{addr}");
    on_ready(addr);

    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    let mut stopped_by = None;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            () = lost(&mut leadership_lost) => {
                tracing::error!("leadership of the control planes lost: stopping (another control plane runs the services)");
                stopped_by = Some(anyhow::anyhow!(
                    "leadership of the control planes was lost (etcd unreachable past the lease, or the lease expired); restart to stand by"
                ));
                break;
            }
        };
        let _ = stream.set_nodelay(true);
        let gate = state_gate.clone();
        let local = stream.local_addr().unwrap_or(addr);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // With authentication off, a container on this host must still not
            // reach the API: find out once per connection whether it is one.
            let from_container = !gate.enabled()
                && peer.ip().is_loopback()
                && tokio::task::spawn_blocking(move || crate::peer::from_container(local, peer))
                    .await
                    .unwrap_or(true);
            // A plain connection can send blobs by sendfile (see
            // slipway_registry::zerocopy); a TLS one must encrypt them.
            let slot = tls
                .is_none()
                .then(slipway_registry::zerocopy::SendfileSlot::default);
            let request_slot = slot.clone();
            let svc = TowerToHyperService::new(tower::ServiceExt::map_request(
                app,
                move |mut r: http::Request<hyper::body::Incoming>| {
                    r.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                    if let Some(slot) = &request_slot {
                        r.extensions_mut().insert(slot.clone());
                    }
                    if from_container {
                        r.extensions_mut().insert(crate::auth::FromContainer);
                    }
                    r
                },
            ));
            let res = match tls {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(s), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                },
                None => {
                    let io = slipway_registry::zerocopy::SendfileStream::new(
                        stream,
                        slot.unwrap_or_default(),
                    );
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, "connection ended with error: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the shutdown grace; closing them");
    }
    while background.join_next().await.is_some() {}
    // Containers keep running; the next daemon re-adopts them.
    services.shutdown();
    runtime.detach();
    tracing::info!("stopped");
    stopped_by.map_or(Ok(()), Err)
}

fn load_tls(cfg: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&cfg.cert)
            .with_context(|| format!("cannot open TLS certificate {}", cfg.cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("TLS certificate {} is not valid PEM", cfg.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "TLS certificate {} holds no certificate",
            cfg.cert.display()
        );
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&cfg.key)
            .with_context(|| format!("cannot open TLS key {}", cfg.key.display()))?,
    ))
    .with_context(|| format!("TLS key {} is not valid PEM", cfg.key.display()))?
    .with_context(|| format!("TLS key {} holds no private key", cfg.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol setup failed")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
