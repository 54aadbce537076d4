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
//! Only cgroup v1 has the per-thread `tasks` file that lets one thread move alone.
//! On a host without it the warmer does nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Warms the cgroup migration lock ahead of a container start.
#[derive(Debug)]
pub struct MigrationWarmer {
    /// The `tasks` file of this process's cgroup in one v1 hierarchy.
    tasks: Option<PathBuf>,
    /// A warm-up already waiting covers every start that begins meanwhile.
    in_flight: Arc<AtomicBool>,
}

impl MigrationWarmer {
    /// Finds this process's cgroup in a mounted v1 hierarchy under `mount_root`
    /// (normally `/sys/fs/cgroup`), from `/proc/self/cgroup`.
    pub fn detect(mount_root: &Path) -> Self {
        let tasks = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|s| tasks_file(&s, mount_root));
        tracing::debug!(?tasks, "cgroup migration warm-up");
        Self {
            tasks,
            in_flight: Arc::default(),
        }
    }

    /// The `tasks` file warm-ups write to, if any.
    #[cfg(test)]
    fn tasks_file(&self) -> Option<&Path> {
        self.tasks.as_deref()
    }

    /// Starts a warm-up on the blocking pool and returns at once. Returns the
    /// handle of the warm-up it started (none when one is already waiting, or
    /// there is no v1 hierarchy).
    pub fn kick(&self) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        let tasks = self.tasks.clone()?;
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return None;
        }
        let in_flight = self.in_flight.clone();
        Some(tokio::task::spawn_blocking(move || {
            let r = migrate_self(&tasks);
            in_flight.store(false, Ordering::Release);
            if let Err(e) = &r {
                tracing::debug!(path = %tasks.display(), "cgroup warm-up failed: {e}");
            }
            r
        }))
    }
}

/// Moves the calling thread into the cgroup whose `tasks` file is `tasks` (its
/// own). The tid must be written explicitly: "0" would skip the global lock.
fn migrate_self(tasks: &Path) -> std::io::Result<()> {
    let tid = nix::unistd::gettid();
    let mut f = std::fs::OpenOptions::new().write(true).open(tasks)?;
    f.write_all(tid.to_string().as_bytes())
}

/// The `tasks` file for the first v1 hierarchy listed in `proc_cgroup` (the text of
/// `/proc/self/cgroup`) that is mounted under `mount_root`.
fn tasks_file(proc_cgroup: &str, mount_root: &Path) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        // The v2 line has no controllers; named v1 hierarchies mount under their name.
        if controllers.is_empty() || !path.starts_with('/') || path.contains("/..") {
            return None;
        }
        let dir = controllers.strip_prefix("name=").unwrap_or(controllers);
        let file = mount_root
            .join(dir)
            .join(path.trim_start_matches('/'))
            .join("tasks");
        file.is_file().then_some(file)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tasks_file_of_the_first_mounted_v1_hierarchy() {
        let root = tempfile::tempdir().expect("test setup");
        std::fs::create_dir_all(root.path().join("pids/svc")).expect("test setup");
        std::fs::write(root.path().join("pids/svc/tasks"), "").expect("test setup");
        std::fs::create_dir_all(root.path().join("systemd")).expect("test setup");
        std::fs::write(root.path().join("systemd/tasks"), "").expect("test setup");
        let text = "0::/\n9:cpuset:/\n8:pids:/svc\n7:name=systemd:/\n";
        // cpuset is listed first but not mounted here, so pids is chosen.
        assert_eq!(
            tasks_file(text, root.path()),
            Some(root.path().join("pids/svc/tasks"))
        );
        let named = "0::/\n7:name=systemd:/\n";
        assert_eq!(
            tasks_file(named, root.path()),
            Some(root.path().join("systemd/tasks"))
        );
    }

    #[test]
    fn a_v2_only_host_gets_no_tasks_file() {
        let root = tempfile::tempdir().expect("test setup");
        assert_eq!(tasks_file("0::/user.slice\n", root.path()), None);
        assert_eq!(tasks_file("", root.path()), None);
    }

    #[test]
    fn a_path_climbing_out_of_the_hierarchy_is_ignored() {
        let root = tempfile::tempdir().expect("test setup");
        std::fs::create_dir_all(root.path().join("pids")).expect("test setup");
        std::fs::write(root.path().join("tasks"), "").expect("test setup");
        assert_eq!(tasks_file("8:pids:/../\n", root.path()), None);
    }

    /// The warm-up is a real migration on this host, and it must leave the
    /// process exactly where it was.
    #[tokio::test]
    async fn a_warm_up_leaves_every_thread_in_its_cgroups() {
        let warmer = MigrationWarmer::detect(Path::new("/sys/fs/cgroup"));
        let Some(file) = warmer.tasks_file() else {
            // Only a host without cgroup v1 gets here; the warmer is then inert.
            assert!(warmer.kick().is_none());
            return;
        };
        assert!(file.is_file());
        let before = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        let first = warmer.kick().expect("a warm-up starts");
        first
            .await
            .expect("join")
            .expect("the no-op migration is allowed");
        // The thread that moved is still alive (the blocking pool keeps it), and it,
        // like every other thread, is in the process's cgroups.
        for task in std::fs::read_dir("/proc/self/task").expect("own threads") {
            let task = task.expect("thread entry").path();
            assert_eq!(
                std::fs::read_to_string(task.join("cgroup")).expect("thread cgroups"),
                before,
                "{} moved",
                task.display()
            );
        }
        // The flag is cleared, so the next start gets a warm-up of its own.
        let second = warmer.kick().expect("a second warm-up starts");
        second.await.expect("join").expect("second warm-up");
    }
}
