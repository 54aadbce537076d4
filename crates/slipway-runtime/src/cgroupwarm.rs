//! Overlapping the cgroup migration lock's RCU grace period with runc's start-up.
//!
//! Moving a process into a cgroup (runc writes its init's pid to `cgroup.procs`)
//! takes the kernel's global `cgroup_threadgroup_rwsem` for writing. That lock is a
//! per-cpu rwsem: a writer that finds it idle first waits for a whole RCU grace
//! period, which is 8–15 ms on this kind of VM and was the largest single part of a
//! container start (strace: one 15 ms `write` in a 24 ms `runc run`). Once a writer
//! has waited, the lock stays in its slow-reader mode for about one more grace
//! period, and writers in that window do not wait again.
//!
//! So, as a start begins, a blocking-pool thread migrates *itself into the cgroup it
//! is already in* (a no-op move that still takes the lock). Its grace period runs
//! while runc is busy exec'ing and parsing the bundle, and runc's own migration a
//! few milliseconds later finds the lock warm. Nothing about any cgroup changes.
//! The kernel's `favordynmods` mount option gets the same effect for every writer,
//! but it is a host-wide setting that Slipway has no business changing.
//!
//! On cgroup v1 one thread moves alone (its tid into its hierarchy's `tasks` file).
//! On a v2-only host the whole process moves into its own cgroup (`cgroup.procs`),
//! also a no-op. With neither mounted the warmer does nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a warm-up moves what.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// v1: the calling thread, into this `tasks` file's cgroup.
    Thread(PathBuf),
    /// v2: the whole process, into this `cgroup.procs` file's cgroup.
    Process(PathBuf),
}

/// Warms the cgroup migration lock ahead of a container start.
#[derive(Debug)]
pub struct MigrationWarmer {
    /// This process's own cgroup, if one is mounted.
    target: Option<Target>,
    /// A warm-up already waiting covers every start that begins meanwhile.
    in_flight: Arc<AtomicBool>,
}

impl MigrationWarmer {
    /// Finds this process's cgroup under `mount_root` (normally `/sys/fs/cgroup`),
    /// from `/proc/self/cgroup`: a v1 hierarchy if any is mounted, else v2.
    pub fn detect(mount_root: &Path) -> Self {
        let target = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| own_cgroup(&s, mount_root));
        tracing::debug!(?target, "cgroup migration warm-up");
        Self {
            target,
            in_flight: Arc::default(),
        }
    }

    /// Starts a warm-up on the blocking pool and returns at once. Returns the
    /// handle of the warm-up it started (none when one is already waiting, or
    /// no cgroup is mounted).
    pub fn kick(&self) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        let target = self.target.clone()?;
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return None;
        }
        let in_flight = self.in_flight.clone();
        Some(tokio::task::spawn_blocking(move || {
            let r = migrate_self(&target);
            in_flight.store(false, Ordering::Release);
            if let Err(e) = &r {
                tracing::debug!(?target, "cgroup warm-up failed: {e}");
            }
            r
        }))
    }
}

/// Moves the calling thread (v1) or this process (v2) into the cgroup it is already
/// in. The id must be written explicitly: "0" would skip the global lock on v1.
fn migrate_self(target: &Target) -> std::io::Result<()> {
    let (file, id) = match target {
        Target::Thread(f) => (f, nix::unistd::gettid()),
        Target::Process(f) => (f, nix::unistd::getpid()),
    };
    let mut f = std::fs::OpenOptions::new().write(true).open(file)?;
    f.write_all(id.to_string().as_bytes())
}

/// This process's cgroup given `proc_cgroup` (the text of `/proc/self/cgroup`): the
/// first v1 hierarchy listed that is mounted under `mount_root`, else the v2
/// hierarchy mounted at `mount_root` (v2-only hosts) or `mount_root/unified`
/// (hybrid ones).
fn own_cgroup(proc_cgroup: &str, mount_root: &Path) -> Option<Target> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        // A path outside this cgroup namespace ("/../..") cannot be written to.
        if !path.starts_with('/') || path.contains("/..") {
            continue;
        }
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2 = [mount_root.to_owned(), mount_root.join("unified")]
                .into_iter()
                .find(|m| m.join("cgroup.controllers").is_file())
                .map(|m| m.join(rel).join("cgroup.procs"))
                .filter(|f| f.is_file());
            continue;
        }
        // Named v1 hierarchies ("name=systemd") mount under their name.
        let dir = controllers.strip_prefix("name=").unwrap_or(controllers);
        let tasks = mount_root.join(dir).join(rel).join("tasks");
        if tasks.is_file() {
            return Some(Target::Thread(tasks));
        }
    }
    v2.map(Target::Process)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) -> PathBuf {
        let f = root.join(rel);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, "").expect("touch");
        f
    }

    #[test]
    fn the_first_mounted_v1_hierarchy_wins() {
        let root = tempfile::tempdir().expect("tempdir");
        let pids = touch(root.path(), "pids/svc/tasks");
        let systemd = touch(root.path(), "systemd/tasks");
        touch(root.path(), "unified/cgroup.controllers");
        touch(root.path(), "unified/cgroup.procs");
        let text = "0::/\n9:cpuset:/\n8:pids:/svc\n7:name=systemd:/\n";
        // cpuset is listed first but not mounted here, so pids is chosen over v2.
        assert_eq!(own_cgroup(text, root.path()), Some(Target::Thread(pids)));
        let named = "0::/\n7:name=systemd:/\n";
        assert_eq!(
            own_cgroup(named, root.path()),
            Some(Target::Thread(systemd))
        );
    }

    #[test]
    fn a_v2_only_host_moves_the_process_in_its_own_cgroup() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(root.path(), "cgroup.controllers");
        let procs = touch(root.path(), "system.slice/slipway.service/cgroup.procs");
        assert_eq!(
            own_cgroup("0::/system.slice/slipway.service\n", root.path()),
            Some(Target::Process(procs))
        );
        // Not mounted, or no cgroups at all: nothing to warm.
        let bare = tempfile::tempdir().expect("tempdir");
        assert_eq!(own_cgroup("0::/user.slice\n", bare.path()), None);
        assert_eq!(own_cgroup("", root.path()), None);
    }

    #[test]
    fn a_path_outside_the_cgroup_namespace_is_ignored() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(root.path(), "tasks");
        touch(root.path(), "cgroup.controllers");
        touch(root.path(), "cgroup.procs");
        assert_eq!(own_cgroup("8:pids:/../\n0::/../..\n", root.path()), None);
    }

    /// Every thread's cgroups, as the kernel reports them.
    fn cgroups_of_every_thread() -> Vec<String> {
        let mut all: Vec<String> = std::fs::read_dir("/proc/self/task")
            .expect("own threads")
            .map(|t| {
                std::fs::read_to_string(t.expect("thread").path().join("cgroup"))
                    .expect("thread cgroups")
            })
            .collect();
        all.dedup();
        all
    }

    /// Warm-ups are real migrations on this host, and they must leave every thread
    /// exactly where it was.
    async fn assert_warm_ups_move_nothing(warmer: &MigrationWarmer) {
        let before = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        let first = warmer.kick().expect("a warm-up starts");
        first
            .await
            .expect("join")
            .expect("the no-op migration is allowed");
        // The thread that moved is still alive (the blocking pool keeps it).
        assert_eq!(cgroups_of_every_thread(), std::slice::from_ref(&before));
        // The flag is cleared, so the next start gets a warm-up of its own.
        let second = warmer.kick().expect("a second warm-up starts");
        second.await.expect("join").expect("second warm-up");
        assert_eq!(cgroups_of_every_thread(), [before]);
    }

    #[tokio::test]
    async fn a_warm_up_leaves_every_thread_in_its_cgroups() {
        let warmer = MigrationWarmer::detect(Path::new("/sys/fs/cgroup"));
        if warmer.target.is_none() {
            // Only a host without any cgroup mount gets here; the warmer is inert.
            assert!(warmer.kick().is_none());
            return;
        }
        assert_warm_ups_move_nothing(&warmer).await;
    }

    /// The v2 path, through this host's v2 hierarchy even where v1 is preferred.
    #[tokio::test]
    async fn a_v2_warm_up_leaves_the_process_in_its_cgroup() {
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        let v2_only: String = text.lines().filter(|l| l.starts_with("0::")).collect();
        let Some(target) = own_cgroup(&v2_only, Path::new("/sys/fs/cgroup")) else {
            // A host without cgroup v2 has nothing to test here.
            assert!(!Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists());
            return;
        };
        assert!(matches!(target, Target::Process(_)), "{target:?}");
        let warmer = MigrationWarmer {
            target: Some(target),
            in_flight: Arc::default(),
        };
        assert_warm_ups_move_nothing(&warmer).await;
    }
}
