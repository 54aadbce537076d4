//! The container manager: `Runtime`, its settings, and the operations on one
//! container by name (inspect, list, stop, remove, exec). Creating is in
//! `container.rs`, images in `snapshots.rs`, supervision in `supervise.rs`, logs in
//! `logs.rs`, re-adoption in `recover.rs`.

use std::collections::BTreeMap;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::RuntimeError;
use crate::cgroupwarm::MigrationWarmer;
use crate::image::ImageSource;
use crate::rootfs::{self};
use crate::runc::Runc;

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
    /// How often running containers' logs are checked for rotation.
    pub log_check_interval: Duration,
    /// Default SIGTERM→SIGKILL grace for stop.
    pub stop_grace: Duration,
    /// RLIMIT_NOFILE for containers (never above the host's hard limit).
    pub nofile: u64,
    /// `host:port` names under which the embedded registry is reachable; image
    /// references with these hosts (or none) are read straight from the store.
    pub local_hosts: Vec<String>,
    /// First host uid/gid of the range user-namespaced containers map to
    /// (65536 ids). Default 1000000000, far above login users.
    pub userns_base: u32,
}

impl RuntimeConfig {
    /// Defaults under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            binary: "runc".into(),
            log_max_bytes: 10 << 20,
            log_files: 3,
            log_check_interval: Duration::from_secs(10),
            stop_grace: Duration::from_secs(10),
            nofile: 1024,
            local_hosts: Vec::new(),
            userns_base: 1_000_000_000,
        }
    }
}

pub use slipway_api::containers::{ContainerInfo, Status};

pub(crate) struct Ctr {
    pub(crate) info: Mutex<ContainerInfo>,
    /// Set when the user asked it to stop.
    pub(crate) stop: watch::Sender<bool>,
    /// The latest status, for waiters.
    pub(crate) status: watch::Sender<Status>,
    /// Whether its supervisor task has finished.
    pub(crate) done: watch::Sender<bool>,
}

/// The container manager.
pub struct Runtime {
    pub(crate) cfg: RuntimeConfig,
    /// Images of the embedded registry (anything without a host, or naming it).
    pub(crate) local: Arc<dyn ImageSource>,
    pub(crate) containers: Mutex<BTreeMap<String, Arc<Ctr>>>,
    pub(crate) unpack_lock: tokio::sync::Mutex<()>,
    pub(crate) warmer: MigrationWarmer,
    /// Bumped whenever a container's process exits.
    pub(crate) exits: watch::Sender<u64>,
    /// Whether the log rotation task runs.
    pub(crate) rotating: std::sync::atomic::AtomicBool,
    /// Images (manifest digests) being started, with how many starts.
    pub(crate) creating: Mutex<std::collections::HashMap<String, usize>>,
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

pub(crate) use slipway_core::now_ms;

pub(crate) fn io(ctx: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Io(ctx.to_owned(), e)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === impl Ctr ===

impl Ctr {
    pub(crate) fn new(info: ContainerInfo) -> Arc<Self> {
        let status = info.status;
        Arc::new(Self {
            info: Mutex::new(info),
            stop: watch::channel(false).0,
            status: watch::channel(status).0,
            done: watch::channel(false).0,
        })
    }

    pub(crate) fn update(&self, dir: &Path, f: impl FnOnce(&mut ContainerInfo)) {
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
            exits: watch::channel(0).0,
            rotating: std::sync::atomic::AtomicBool::new(false),
            creating: Mutex::default(),
        }))
    }

    pub(crate) fn runc(&self) -> Result<Runc, RuntimeError> {
        Ok(Runc::new(&self.cfg.binary, self.cfg.root.join("runc"))?)
    }

    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.cfg.root.join("containers").join(name)
    }

    pub(crate) fn new_id(name: &str) -> String {
        format!(
            "{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
    }

    pub(crate) fn get(&self, name: &str) -> Result<Arc<Ctr>, RuntimeError> {
        lock(&self.containers)
            .get(name)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(name.to_owned()))
    }

    /// Changes whenever a container's process exits (watchers then inspect).
    pub fn exits(&self) -> watch::Receiver<u64> {
        self.exits.subscribe()
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
        let _ = fs::remove_dir_all(self.secrets_dir(&id));
        lock(&self.containers).remove(name);
        // Its snapshots' grace period starts now.
        self.touch_image(&lock(&ctr.info).image_digest);
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
