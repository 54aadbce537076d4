//! Creating a container: name, stop signal, root filesystem, bundle, and its first
//! start under a supervisor.

use std::fs::{self};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::RuntimeError;
use crate::bundle::{self, BundleConfig};
use crate::image::ResolvedImage;
use crate::rootfs::{self, RootfsKind};
use crate::spec::{self, RunRequest};

use crate::runtime::*;

/// Secret values for one container.
#[derive(Clone, Default)]
pub struct Secrets {
    /// (name, value): mounted read-only at `/run/secrets/<name>`.
    pub files: Vec<(String, Vec<u8>)>,
    /// (variable, value): set in the environment.
    pub env: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secrets({} files, {} env, values redacted)",
            self.files.len(),
            self.env.len()
        )
    }
}

impl Secrets {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.env.is_empty()
    }
}

/// Where containers' secrets live: a tmpfs, never the data directory.
const SECRETS_ROOT: &str = "/run/slipway/secrets";

impl Runtime {
    pub(crate) fn secrets_dir(&self, id: &str) -> PathBuf {
        Path::new(SECRETS_ROOT).join(id)
    }

    /// Writes the secret files under the container's tmpfs directory (mode 0700,
    /// owned by the user namespace's root when there is one; the directories
    /// above it only let others pass through).
    fn write_secrets(
        &self,
        id: &str,
        secrets: &Secrets,
        owner: Option<u32>,
    ) -> Result<PathBuf, RuntimeError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let dir = self.secrets_dir(id);
        let io = |e| RuntimeError::Io("write secrets".into(), e);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(SECRETS_ROOT)
            .map_err(io)?;
        for d in [
            Path::new(SECRETS_ROOT),
            Path::new(SECRETS_ROOT)
                .parent()
                .unwrap_or(Path::new("/run")),
        ] {
            if d != Path::new("/run") {
                fs::set_permissions(d, fs::Permissions::from_mode(0o711)).map_err(io)?;
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("files"))
            .map_err(io)?;
        if let Some(uid) = owner {
            for d in [dir.clone(), dir.join("files")] {
                std::os::unix::fs::chown(&d, Some(uid), Some(uid)).map_err(io)?;
            }
        }
        for (name, value) in &secrets.files {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o444)
                .open(dir.join("files").join(name))
                .map_err(io)?;
            f.write_all(value).map_err(io)?;
        }
        Ok(dir)
    }

    /// Creates and starts a container. Returns once its process has started (or
    /// already exited).
    pub async fn run(self: &Arc<Self>, req: RunRequest) -> Result<ContainerInfo, RuntimeError> {
        self.run_with(req, Secrets::default()).await
    }

    /// [`run`](Self::run) with secret values: files under `/run/secrets/` and
    /// environment variables, kept on a tmpfs (never in the data directory nor
    /// in the container's recorded spec).
    pub async fn run_with(
        self: &Arc<Self>,
        req: RunRequest,
        secrets: Secrets,
    ) -> Result<ContainerInfo, RuntimeError> {
        spec::validate(&req)?;
        for (name, _) in &secrets.files {
            spec::validate_name(name).map_err(|_| {
                RuntimeError::InvalidSpec(format!("secrets: {name:?} is not a valid secret name"))
            })?;
        }
        let runc = self.runc()?;
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("c-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
        if lock(&self.containers).contains_key(&name) || self.dir(&name).exists() {
            return Err(RuntimeError::AlreadyExists(name));
        }
        if let Some(port) = req.port
            && std::net::TcpListener::bind(("0.0.0.0", port)).is_err()
        {
            return Err(RuntimeError::PortInUse(port));
        }
        let t0 = tokio::time::Instant::now();
        // Start the cgroup lock's grace period now, under the image and bundle work;
        // the kick before runc's spawn then finds this one still waiting.
        self.warmer.kick();
        let img = self.resolve(&req.image).await?;
        // A snapshot collection meanwhile keeps this image's layers.
        let _creating = self.creating(&img.digest);
        let lowers = self.ensure_snapshots(&img).await?;
        tracing::debug!(container = %name, elapsed = ?t0.elapsed(), "image resolved and unpacked");

        let dir = self.dir(&name);
        // Claim the name on disk; everything below is undone on failure.
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => RuntimeError::AlreadyExists(name.clone()),
            _ => RuntimeError::Io("create container directory".into(), e),
        })?;
        let id = Self::new_id(&name);
        // The request's stop signal, else the image's StopSignal, else SIGTERM.
        let stop_signal = match req
            .stop_signal
            .clone()
            .or_else(|| img.config["StopSignal"].as_str().map(str::to_owned))
        {
            Some(s) => slipway_core::service::parse_signal(&s).unwrap_or_else(|e| {
                tracing::warn!(container = %name, "image StopSignal ignored: {e}");
                15
            }),
            None => 15,
        };
        // Mounting or copying the rootfs and writing the bundle is file work:
        // off the async workers (a userns copy can take a second).
        let prepared = {
            let rt = self.clone();
            let (name, id, dir, req, img, lowers) = (
                name.clone(),
                id.clone(),
                dir.clone(),
                req.clone(),
                img.clone(),
                lowers.clone(),
            );
            tokio::task::spawn_blocking(move || {
                rt.prepare(&name, &id, &dir, &req, (&img, &lowers), &secrets)
            })
            .await
            .unwrap_or_else(|e| Err(RuntimeError::Bundle(format!("rootfs task failed: {e}"))))
        };
        match prepared {
            Ok(kind) => {
                let info = ContainerInfo {
                    name: name.clone(),
                    id,
                    spec: req,
                    image_digest: img.digest.to_string(),
                    status: Status::Created,
                    pid: None,
                    exit_code: None,
                    oom_killed: false,
                    restart_count: 0,
                    backoff_ms: None,
                    started_at_ms: None,
                    finished_at_ms: None,
                    rootfs: kind,
                    message: None,
                    stop_signal: Some(stop_signal),
                };
                let ctr = Ctr::new(info);
                ctr.update(&dir, |_| {});
                lock(&self.containers).insert(name.clone(), ctr.clone());
                let mut status = ctr.status.subscribe();
                tracing::debug!(container = %name, elapsed = ?t0.elapsed(), "bundle ready");
                tokio::spawn(self.clone().supervise(ctr.clone(), runc, None));
                // Wait for the first start to happen (or fail).
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    status.wait_for(|s| *s != Status::Created),
                )
                .await;
                tracing::debug!(container = %name, elapsed = ?t0.elapsed(), "container started");
                Ok(lock(&ctr.info).clone())
            }
            Err(e) => {
                let _ = rootfs::release(&dir.join("bundle/rootfs"), RootfsKind::Overlay);
                let _ = fs::remove_dir_all(&dir);
                let _ = fs::remove_dir_all(self.secrets_dir(&id));
                Err(e)
            }
        }
    }

    pub(crate) fn prepare(
        &self,
        name: &str,
        id: &str,
        dir: &Path,
        req: &RunRequest,
        (img, lowers): (&ResolvedImage, &[PathBuf]),
        secrets: &Secrets,
    ) -> Result<RootfsKind, RuntimeError> {
        let bundle_dir = dir.join("bundle");
        let rootfs_dir = bundle_dir.join("rootfs");
        let mut top_first: Vec<PathBuf> = lowers.to_vec();
        top_first.reverse();
        let userns = req.userns.then_some(self.cfg.userns_base);
        let kind = match userns {
            Some(base) => rootfs::prepare_shifted(&top_first, &rootfs_dir, base),
            None => rootfs::prepare(
                &top_first,
                &dir.join("upper"),
                &dir.join("work"),
                &rootfs_dir,
            ),
        }
        .map_err(io("prepare root filesystem"))?;

        let cfg = &img.config;
        let strings = |v: &Value| -> Option<Vec<String>> {
            v.as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
        };
        let entrypoint = req
            .entrypoint
            .clone()
            .or_else(|| strings(&cfg["Entrypoint"]))
            .unwrap_or_default();
        // An explicit entrypoint drops the image's CMD, as docker does.
        let cmd = req
            .command
            .clone()
            .or_else(|| {
                if req.entrypoint.is_some() {
                    None
                } else {
                    strings(&cfg["Cmd"])
                }
            })
            .unwrap_or_default();
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(RuntimeError::InvalidSpec(
                "command: the image has no entrypoint or command; give one".into(),
            ));
        }
        let mut env: Vec<String> = strings(&cfg["Env"]).unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let mut set = |kv: String| {
            let k = kv
                .split_once('=')
                .map_or(kv.as_str(), |(k, _)| k)
                .to_owned();
            env.retain(|e| e.split_once('=').is_none_or(|(ek, _)| ek != k));
            env.push(kv);
        };
        if let Some(p) = req.port {
            set(format!("PORT={p}"));
        }
        for kv in &req.env {
            set(kv.clone());
        }
        for (k, v) in &secrets.env {
            set(format!("{k}={}", String::from_utf8_lossy(v)));
        }
        let user = bundle::resolve_user(cfg["User"].as_str().unwrap_or(""), &rootfs_dir)?;
        let mut binds = Vec::new();
        for v in &req.volumes {
            let (vname, path) = v.split_once(':').unwrap_or((v, "/data"));
            let host = self.cfg.root.join("volumes").join(vname);
            fs::create_dir_all(&host).map_err(io("create volume"))?;
            if let Some(base) = userns {
                std::os::unix::fs::chown(&host, Some(base), Some(base))
                    .map_err(io("give the volume to the user namespace"))?;
            }
            binds.push((host, path.to_owned()));
        }
        let private = if secrets.is_empty() {
            None
        } else {
            Some(self.write_secrets(id, secrets, userns)?)
        };
        let ro_files = secrets
            .files
            .iter()
            .filter_map(|(n, _)| {
                private
                    .as_ref()
                    .map(|d| (d.join("files").join(n), format!("/run/secrets/{n}")))
            })
            .collect();
        let bc = BundleConfig {
            ro_files,
            userns,
            args,
            env,
            cwd: cfg["WorkingDir"]
                .as_str()
                .filter(|w| w.starts_with('/'))
                .unwrap_or("/")
                .to_owned(),
            user,
            hostname: name.to_owned(),
            memory: req.memory.as_deref().map(spec::parse_memory).transpose()?,
            cpus: req.cpus,
            pids: req.pids,
            read_only: req.read_only,
            binds,
            cgroup: format!("/slipway/{id}"),
            nofile: self.cfg.nofile,
            capabilities: crate::security::capabilities(&req.cap_add, &req.cap_drop)?,
        };
        bundle::write(&bundle_dir, &bc, private.as_deref()).inspect_err(|_| {
            let _ = rootfs::release(&rootfs_dir, kind);
        })?;
        Ok(kind)
    }
}
