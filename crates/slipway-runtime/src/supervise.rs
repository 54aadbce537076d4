//! The container manager: creating, supervising, stopping and removing containers,
//! and re-adopting them after a daemon restart.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use slipway_image::ImageRef;
use tokio::sync::watch;

use crate::RuntimeError;
use crate::bundle::{self, BundleConfig};
use crate::cgroupwarm::MigrationWarmer;
use crate::image::{self, ImageSource, RemoteSource, ResolvedImage};
use crate::pidwatch::DirWatch;
use crate::rootfs::{self, RootfsKind};
use crate::runc::Runc;
use crate::spec::{self, RestartPolicy, RunRequest};
use crate::unpack::{self, LayerCompression};

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Root of the runtime's files (snapshots, containers, volumes).
    pub root: PathBuf,
    /// The OCI runtime binary: `runc` (default) or `crun`.
    pub binary: String,
    /// Rotate a container log past this size.
    pub log_max_bytes: u64,
    /// Rotated log files kept.
    pub log_files: usize,
    /// Default SIGTERM→SIGKILL grace for stop.
    pub stop_grace: Duration,
    /// RLIMIT_NOFILE for containers (never above the host's hard limit).
    pub nofile: u64,
    /// `host:port` names under which the embedded registry is reachable; image
    /// references with these hosts (or none) are read straight from the store.
    pub local_hosts: Vec<String>,
}

impl RuntimeConfig {
    /// Defaults under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            binary: "runc".into(),
            log_max_bytes: 10 << 20,
            log_files: 3,
            stop_grace: Duration::from_secs(10),
            nofile: 1024,
            local_hosts: Vec::new(),
        }
    }
}

pub use slipway_api::containers::{ContainerInfo, Status};

struct Ctr {
    info: Mutex<ContainerInfo>,
    /// Set when the user asked it to stop.
    stop: watch::Sender<bool>,
    /// The latest status, for waiters.
    status: watch::Sender<Status>,
    /// Whether its supervisor task has finished.
    done: watch::Sender<bool>,
}

/// The container manager.
pub struct Runtime {
    cfg: RuntimeConfig,
    /// Images of the embedded registry (anything without a host, or naming it).
    local: Arc<dyn ImageSource>,
    containers: Mutex<BTreeMap<String, Arc<Ctr>>>,
    unpack_lock: tokio::sync::Mutex<()>,
    warmer: MigrationWarmer,
}

/// Removes what a daemon killed mid-unpack or mid-download left: temporary snapshot
/// directories (`snapshots/tmp-*`, never renamed into place) and partial downloads.
/// Nothing refers to either, and only one daemon opens a data directory.
fn sweep_leftovers(root: &Path) {
    let stale = |dir: PathBuf, keep: fn(&str) -> bool| {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            if keep(&name.to_string_lossy()) {
                continue;
            }
            let path = entry.path();
            let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match r {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a leftover of an interrupted start")
                }
                Err(e) => tracing::warn!(path = %path.display(), "cannot remove a leftover: {e}"),
            }
        }
    };
    stale(root.join("snapshots"), |n| !n.starts_with("tmp-"));
    stale(root.join("downloads"), |_| false);
}

use slipway_core::now_ms;

fn io(ctx: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Io(ctx.to_owned(), e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === impl Ctr ===

impl Ctr {
    fn new(info: ContainerInfo) -> Arc<Self> {
        let status = info.status;
        Arc::new(Self {
            info: Mutex::new(info),
            stop: watch::channel(false).0,
            status: watch::channel(status).0,
            done: watch::channel(false).0,
        })
    }

    fn update(&self, dir: &Path, f: impl FnOnce(&mut ContainerInfo)) {
        let snapshot = {
            let mut i = lock(&self.info);
            f(&mut i);
            i.clone()
        };
        self.status.send_replace(snapshot.status);
        // Persist durably: temp file, fsync, rename over state.json, fsync the dir.
        let written = serde_json::to_vec_pretty(&snapshot)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::durable::write(&dir.join("state.json"), &b));
        if let Err(e) = written {
            tracing::error!(container = %snapshot.name, "cannot persist container state: {e}");
        }
    }
}

// === impl Runtime ===

impl Runtime {
    /// Opens the runtime rooted at `cfg.root`. Does not require runc yet: a missing
    /// runtime is reported when a container is run.
    pub fn open(
        cfg: RuntimeConfig,
        local: Arc<dyn ImageSource>,
    ) -> Result<Arc<Self>, RuntimeError> {
        for d in [
            "snapshots/sha256",
            "containers",
            "volumes",
            "runc",
            "downloads",
        ] {
            fs::create_dir_all(cfg.root.join(d)).map_err(io("create runtime directories"))?;
        }
        sweep_leftovers(&cfg.root);
        Ok(Arc::new(Self {
            cfg,
            local,
            containers: Mutex::default(),
            unpack_lock: tokio::sync::Mutex::new(()),
            warmer: MigrationWarmer::detect(Path::new("/sys/fs/cgroup")),
        }))
    }

    fn runc(&self) -> Result<Runc, RuntimeError> {
        Ok(Runc::new(&self.cfg.binary, self.cfg.root.join("runc"))?)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.cfg.root.join("containers").join(name)
    }

    fn new_id(name: &str) -> String {
        format!(
            "{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
    }

    /// The snapshot directory of a layer.
    pub fn snapshot_dir(&self, digest: &slipway_core::Digest) -> PathBuf {
        self.cfg
            .root
            .join("snapshots")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// Resolves an image reference, locally when it names the embedded registry.
    pub async fn resolve(&self, reference: &str) -> Result<ResolvedImage, RuntimeError> {
        let r = ImageRef::parse(reference)
            .map_err(|e| RuntimeError::InvalidSpec(format!("image: {e}")))?;
        let source: Arc<dyn ImageSource> = match &r.host {
            Some(h) if !self.cfg.local_hosts.iter().any(|l| l == h) => {
                Arc::new(RemoteSource::new(h))
            }
            _ => self.local.clone(),
        };
        image::resolve(source, &r).await
    }

    /// Unpacks every layer not yet unpacked; returns snapshot dirs, bottom first.
    pub async fn ensure_snapshots(
        &self,
        img: &ResolvedImage,
    ) -> Result<Vec<PathBuf>, RuntimeError> {
        let _guard = self.unpack_lock.lock().await;
        let mut dirs = Vec::new();
        for layer in &img.layers {
            let dir = self.snapshot_dir(&layer.digest);
            if !dir.is_dir() {
                let compression = LayerCompression::from_media_type(&layer.media_type)?;
                let blob = img
                    .source
                    .layer(&img.repo, &layer.digest, &self.cfg.root.join("downloads"))
                    .await
                    .map_err(|e| match e {
                        image::SourceError::NotFound(m) => {
                            RuntimeError::ImageNotFound(format!("layer {}: {m}", layer.digest))
                        }
                        image::SourceError::Io(ctx, e) => RuntimeError::Io(ctx, e),
                    })?;
                let tmp = self
                    .cfg
                    .root
                    .join("snapshots")
                    .join(format!("tmp-{}", uuid::Uuid::new_v4()));
                let (digest, tmp2) = (layer.digest.clone(), tmp.clone());
                let lowers: Vec<PathBuf> = dirs.iter().rev().cloned().collect();
                let image::LayerBlob { file, temp } = blob;
                let res = tokio::task::spawn_blocking(move || {
                    unpack::unpack_layer(file, &digest, compression, &tmp2, &lowers)
                })
                .await
                .map_err(|e| RuntimeError::Io("unpack task".into(), std::io::Error::other(e)))?;
                if let Some(temp) = temp {
                    let _ = fs::remove_file(&temp);
                }
                if let Err(e) = res {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e.into());
                }
                fs::rename(&tmp, &dir).map_err(io("move snapshot into place"))?;
                tracing::debug!(layer = %layer.digest, "unpacked layer");
            }
            dirs.push(dir);
        }
        Ok(dirs)
    }

    /// Creates and starts a container. Returns once its process has started (or
    /// already exited).
    pub async fn run(self: &Arc<Self>, req: RunRequest) -> Result<ContainerInfo, RuntimeError> {
        spec::validate(&req)?;
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
        match self.prepare(&name, &id, &dir, &req, &img, &lowers) {
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
                Err(e)
            }
        }
    }

    fn prepare(
        &self,
        name: &str,
        id: &str,
        dir: &Path,
        req: &RunRequest,
        img: &ResolvedImage,
        lowers: &[PathBuf],
    ) -> Result<RootfsKind, RuntimeError> {
        let bundle_dir = dir.join("bundle");
        let rootfs_dir = bundle_dir.join("rootfs");
        let mut top_first: Vec<PathBuf> = lowers.to_vec();
        top_first.reverse();
        let kind = rootfs::prepare(
            &top_first,
            &dir.join("upper"),
            &dir.join("work"),
            &rootfs_dir,
        )
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
        let user = bundle::resolve_user(cfg["User"].as_str().unwrap_or(""), &rootfs_dir)?;
        let mut binds = Vec::new();
        for v in &req.volumes {
            let (vname, path) = v.split_once(':').unwrap_or((v, "/data"));
            let host = self.cfg.root.join("volumes").join(vname);
            fs::create_dir_all(&host).map_err(io("create volume"))?;
            binds.push((host, path.to_owned()));
        }
        let bc = BundleConfig {
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
        };
        bundle::write(&bundle_dir, &bc).inspect_err(|_| {
            let _ = rootfs::release(&rootfs_dir, kind);
        })?;
        Ok(kind)
    }

    fn open_log(dir: &Path) -> Result<fs::File, RuntimeError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("container.log"))
            .map_err(io("open container log"))
    }

    fn rotate_log(&self, dir: &Path) {
        let log = dir.join("container.log");
        if fs::metadata(&log).map(|m| m.len()).unwrap_or(0) <= self.cfg.log_max_bytes {
            return;
        }
        for i in (1..self.cfg.log_files).rev() {
            let _ = fs::rename(
                dir.join(format!("container.log.{i}")),
                dir.join(format!("container.log.{}", i + 1)),
            );
        }
        // Copy then truncate: the container holds the file open with O_APPEND, so
        // it keeps writing at the (new) end.
        if fs::copy(&log, dir.join("container.log.1")).is_ok() {
            let _ = OpenOptions::new()
                .write(true)
                .open(&log)
                .and_then(|f| f.set_len(0));
        }
    }

    /// Whether the container's last run hit its memory limit's OOM killer.
    fn oom_killed(id: &str) -> bool {
        let p = format!("/sys/fs/cgroup/memory/slipway/{id}/memory.oom_control");
        fs::read_to_string(p).ok().is_some_and(|s| {
            s.lines()
                .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
        })
    }

    async fn supervise(self: Arc<Self>, ctr: Arc<Ctr>, runc: Runc, adopt: Option<u32>) {
        let (name, id) = {
            let i = lock(&ctr.info);
            (i.name.clone(), i.id.clone())
        };
        let dir = self.dir(&name);
        let mut stop = ctr.stop.subscribe();
        let mut adopt = adopt;
        let mut attempt: u32 = 0;
        loop {
            let started = now_ms();
            let (code, message) = if let Some(pid) = adopt.take() {
                ctr.update(&dir, |i| {
                    i.status = Status::Running;
                    i.pid = Some(pid);
                });
                self.wait_adopted(pid, &dir).await;
                (
                    None,
                    Some(
                        "exited while adopted after a daemon restart; exit code unknown".to_owned(),
                    ),
                )
            } else {
                let log = match Self::open_log(&dir) {
                    Ok(l) => l,
                    Err(e) => {
                        ctr.update(&dir, |i| {
                            i.status = Status::Exited;
                            i.message = Some(e.to_string());
                        });
                        break;
                    }
                };
                let pid_file = dir.join("container.pid");
                let _ = fs::remove_file(&pid_file);
                // Watch before runc starts, so the pid file's arrival cannot be missed.
                let mut watch = Some(DirWatch::new(&dir));
                // runc's move into the container's cgroup finds the lock warm.
                self.warmer.kick();
                let spawned = std::time::Instant::now();
                let mut child = match runc.run(&id, &dir.join("bundle"), &pid_file, &log) {
                    Ok(c) => c,
                    Err(e) => {
                        ctr.update(&dir, |i| {
                            i.status = Status::Exited;
                            i.message = Some(e.to_string());
                        });
                        break;
                    }
                };
                // "Running" once runc has written the container's pid (woken by the
                // watch: start latency matters), then a slow tick for log rotation.
                let mut pid_known = false;
                let mut polls = 0u32;
                let status = loop {
                    let tick = Duration::from_millis(200);
                    let next = async {
                        match &mut watch {
                            Some(w) => w.changed(tick).await,
                            None => tokio::time::sleep(tick).await,
                        }
                    };
                    tokio::select! {
                        s = child.wait() => break s,
                        () = next => {
                            polls += 1;
                            if !pid_known {
                                if let Some(pid) = fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                                    pid_known = true;
                                    ctr.update(&dir, |i| {
                                        i.status = Status::Running;
                                        i.started_at_ms = Some(started);
                                        i.pid = Some(pid);
                                        i.backoff_ms = None;
                                    });
                                    tracing::debug!(container = %name, since_spawn = ?spawned.elapsed(), "runc started the process");
                                    watch = None;
                                }
                            } else if polls.is_multiple_of(10) {
                                self.rotate_log(&dir);
                            }
                        }
                    }
                };
                drop(watch);
                let code = status.ok().and_then(|s| {
                    use std::os::unix::process::ExitStatusExt;
                    s.code().or_else(|| s.signal().map(|sig| 128 + sig))
                });
                (code, None)
            };
            let oom = Self::oom_killed(&id);
            let _ = runc.delete(&id).await;
            let finished = now_ms();
            let stopping = *stop.borrow();
            ctr.update(&dir, |i| {
                i.status = if stopping {
                    Status::Stopped
                } else {
                    Status::Exited
                };
                i.pid = None;
                i.exit_code = code;
                i.oom_killed = oom;
                i.finished_at_ms = Some(finished);
                i.message = message
                    .clone()
                    .or_else(|| oom.then(|| "killed by the OOM killer: raise --memory".to_owned()));
            });
            tracing::info!(container = %name, ?code, oom, "container exited");
            if stopping {
                break;
            }
            let policy = lock(&ctr.info).spec.restart;
            let restart = match policy {
                RestartPolicy::No => false,
                RestartPolicy::OnFailure => code != Some(0),
                RestartPolicy::Always => true,
            };
            if !restart {
                break;
            }
            // A run that stayed up 10 s resets the backoff.
            if finished.saturating_sub(started) > 10_000 {
                attempt = 0;
            }
            let backoff = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10)))
                .min(Duration::from_secs(30));
            attempt += 1;
            ctr.update(&dir, |i| {
                i.status = Status::Restarting;
                i.restart_count += 1;
                i.backoff_ms = Some(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
            });
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {
                    ctr.update(&dir, |i| i.status = Status::Stopped);
                    break;
                }
            }
        }
        ctr.done.send_replace(true);
    }

    async fn wait_adopted(&self, pid: u32, dir: &Path) {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while proc.exists() {
            tick.tick().await;
            self.rotate_log(dir);
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Ctr>, RuntimeError> {
        lock(&self.containers)
            .get(name)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(name.to_owned()))
    }

    /// One container's state.
    pub fn inspect(&self, name: &str) -> Result<ContainerInfo, RuntimeError> {
        Ok(lock(&self.get(name)?.info).clone())
    }

    /// Every container, by name.
    pub fn list(&self) -> Vec<ContainerInfo> {
        lock(&self.containers)
            .values()
            .map(|c| lock(&c.info).clone())
            .collect()
    }

    /// Stops a container: SIGTERM, then SIGKILL after `grace`. Its restart policy no
    /// longer applies until it is started again.
    pub async fn stop(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> Result<ContainerInfo, RuntimeError> {
        let ctr = self.get(name)?;
        let grace = grace.unwrap_or(self.cfg.stop_grace);
        ctr.stop.send_replace(true);
        let mut done = ctr.done.subscribe();
        if !*done.borrow() {
            let runc = self.runc()?;
            let id = lock(&ctr.info).id.clone();
            let signal = lock(&ctr.info).stop_signal.unwrap_or(15).to_string();
            if *ctr.status.borrow() == Status::Running {
                let _ = runc.kill(&id, &signal).await;
            }
            if tokio::time::timeout(grace, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!(container = %name, "did not stop within {grace:?}; sending SIGKILL");
                let _ = runc.kill(&id, "KILL").await;
                let _ = tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await;
            }
        }
        let dir = self.dir(name);
        ctr.update(&dir, |i| i.status = Status::Stopped);
        Ok(lock(&ctr.info).clone())
    }

    /// Removes a container and everything it left: process, cgroup, mount, bundle.
    /// Named volumes stay.
    pub async fn remove(&self, name: &str, force: bool) -> Result<(), RuntimeError> {
        let ctr = self.get(name)?;
        let running = matches!(
            *ctr.status.borrow(),
            Status::Running | Status::Restarting | Status::Created
        );
        if running && !*ctr.done.borrow() {
            if !force {
                return Err(RuntimeError::Running(name.to_owned()));
            }
            self.stop(name, Some(Duration::from_secs(2))).await?;
        }
        let runc = self.runc()?;
        let id = lock(&ctr.info).id.clone();
        runc.delete(&id).await?;
        let dir = self.dir(name);
        let kind = lock(&ctr.info).rootfs;
        rootfs::release(&dir.join("bundle/rootfs"), kind).map_err(io("unmount root filesystem"))?;
        fs::remove_dir_all(&dir).map_err(io("remove container directory"))?;
        lock(&self.containers).remove(name);
        Ok(())
    }

    /// Runs a command inside a running container; returns its exit status.
    pub async fn exec(&self, name: &str, argv: &[String]) -> Result<i32, RuntimeError> {
        let id = lock(&self.get(name)?.info).id.clone();
        Ok(self.runc()?.exec(&id, argv).await?)
    }

    /// The container's log file.
    pub fn log_path(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        self.get(name)?;
        Ok(self.dir(name).join("container.log"))
    }

    /// Whether the container's supervisor has finished (it will not run again).
    pub fn is_done(&self, name: &str) -> bool {
        self.get(name).map_or(true, |c| *c.done.borrow())
    }

    /// Loads persisted containers after a daemon restart: running ones are
    /// re-adopted, the others restarted per their policy or left exited.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, RuntimeError> {
        let runc = self.runc().ok();
        let mut n = 0;
        let entries =
            fs::read_dir(self.cfg.root.join("containers")).map_err(io("list containers"))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(bytes) = fs::read(dir.join("state.json")) else {
                // A container that never finished being created: undo it.
                let _ = rootfs::release(&dir.join("bundle/rootfs"), RootfsKind::Overlay);
                let _ = fs::remove_dir_all(&dir);
                continue;
            };
            let Ok(mut info) = serde_json::from_slice::<ContainerInfo>(&bytes) else {
                tracing::error!(dir = %dir.display(), "unreadable container state; leaving it alone");
                continue;
            };
            let name = info.name.clone();
            if spec::validate_name(&name).is_err()
                || dir.file_name().and_then(|f| f.to_str()) != Some(name.as_str())
            {
                continue;
            }
            let Some(runc) = runc.clone() else {
                tracing::error!(container = %name, "the OCI runtime is missing; container left as it is");
                continue;
            };
            // Remount the rootfs if a host reboot took the mount away.
            let rootfs_dir = dir.join("bundle/rootfs");
            if info.rootfs == RootfsKind::Overlay && !rootfs::is_mounted(&rootfs_dir) {
                let img = self.resolve(&info.spec.image).await;
                let lowers = match &img {
                    Ok(img) => self.ensure_snapshots(img).await,
                    Err(_) => Err(RuntimeError::ImageNotFound(info.spec.image.clone())),
                };
                match lowers {
                    Ok(mut l) => {
                        l.reverse();
                        if let Err(e) =
                            rootfs::prepare(&l, &dir.join("upper"), &dir.join("work"), &rootfs_dir)
                        {
                            tracing::error!(container = %name, "cannot remount rootfs: {e}");
                        }
                    }
                    Err(e) => tracing::error!(container = %name, "cannot remount rootfs: {e}"),
                }
            }
            let id = info.id.clone();
            let state = runc.state(&id).await;
            let was_active = matches!(
                info.status,
                Status::Running | Status::Restarting | Status::Created
            );
            let ctr;
            match state {
                Some((s, pid)) if s == "running" && pid > 0 => {
                    info.status = Status::Running;
                    ctr = Ctr::new(info);
                    lock(&self.containers).insert(name.clone(), ctr.clone());
                    tokio::spawn(self.clone().supervise(ctr, runc, Some(pid)));
                    tracing::info!(container = %name, pid, "re-adopted running container");
                }
                _ => {
                    let _ = runc.delete(&id).await;
                    let restart = was_active && info.spec.restart != RestartPolicy::No;
                    if was_active && !restart {
                        info.status = Status::Exited;
                        info.pid = None;
                        info.message = Some("exited while the daemon was down".into());
                    }
                    ctr = Ctr::new(info);
                    ctr.update(&dir, |_| {});
                    lock(&self.containers).insert(name.clone(), ctr.clone());
                    if restart {
                        tokio::spawn(self.clone().supervise(ctr, runc, None));
                    } else {
                        ctr.done.send_replace(true);
                    }
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// Stops supervising (daemon shutdown): containers keep running and are
    /// re-adopted by the next daemon.
    pub fn detach(&self) {
        lock(&self.containers).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_an_interrupted_start_are_swept_and_snapshots_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        let snapshot = root.join("snapshots/sha256/ab12");
        let half = root.join("snapshots/tmp-1234/usr/bin");
        fs::create_dir_all(&snapshot).expect("snapshot");
        fs::write(snapshot.join("kept"), b"x").expect("snapshot file");
        fs::create_dir_all(&half).expect("half-unpacked layer");
        fs::write(half.join("tool"), b"half").expect("half-unpacked file");
        fs::create_dir_all(root.join("downloads")).expect("downloads");
        fs::write(root.join("downloads/ab12.partial"), b"part").expect("partial download");

        sweep_leftovers(root);

        assert!(
            snapshot.join("kept").is_file(),
            "a finished snapshot is kept"
        );
        let names = |d: &str| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(root.join(d))
                .expect("list")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names("snapshots"), ["sha256"]);
        assert!(names("downloads").is_empty());
    }
}
