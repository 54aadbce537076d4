//! Noticing the moment runc writes a container's pid file, and the moment an
//! adopted container's process exits.
//!
//! runc writes the pid file (via a temporary file and a rename) once the
//! container's process runs; that moment is when `run` returns. Polling the file
//! added a timer tick (2–3 ms) to every start; an inotify watch on the container
//! directory wakes the supervisor as soon as the rename lands. Where inotify is
//! unavailable it falls back to polling.
//!
//! Closing an inotify instance blocks until an RCU grace period passes (5-15 ms
//! measured here, and every start paid it), so dropping a [`DirWatch`] hands the
//! close to the blocking pool.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Wakes when a file in one directory is renamed into place or closed after
/// writing.
pub(crate) struct DirWatch {
    fd: Option<AsyncFd<Fd>>,
}

impl DirWatch {
    /// Watches `dir`; never fails (falls back to polling).
    #[expect(
        unsafe_code,
        reason = "AsyncFd::register is unsafe: the caller vouches for the fd's lifetime"
    )]
    pub(crate) fn new(dir: &Path) -> Self {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .ok()
            .and_then(|i| {
                i.add_watch(
                    dir,
                    AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
                )
                .ok()?;
                // SAFETY: `Fd` owns the inotify instance, so the descriptor it
                // returns is open and the same one for as long as the `AsyncFd`
                // holds it: nothing else can close it, `as_raw_fd` always returns
                // that one fd, and it is closed only when the `AsyncFd` (and with
                // it the `Fd`) is dropped, after deregistration.
                unsafe { AsyncFd::register(Fd(i)) }.ok()
            });
        Self { fd }
    }

    /// Resolves after something may have changed: an event, or at most `fallback`.
    pub(crate) async fn changed(&mut self, fallback: Duration) {
        let Some(fd) = &self.fd else {
            tokio::time::sleep(Duration::from_millis(2).min(fallback)).await;
            return;
        };
        let wait = async {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                match guard.try_io(|f| f.get_ref().0.read_events().map_err(std::io::Error::from)) {
                    Ok(_) => return,
                    Err(_would_block) => {}
                }
            }
        };
        let _ = tokio::time::timeout(fallback, wait).await;
    }
}

/// The exit of a process that is not our child (a container re-adopted after a
/// daemon restart), through a pidfd: it refers to one process for good, so a
/// reused pid cannot fool it, unlike polling `/proc/<pid>`.
pub(crate) struct ProcessWatch {
    fd: AsyncFd<std::os::fd::OwnedFd>,
}

/// Whether `/proc/<pid>/cgroup` places the process in container `id`'s cgroup
/// (`…/slipway/<id>` on any hierarchy).
fn in_container_cgroup(pid: u32, id: &str) -> bool {
    let suffix = format!("/slipway/{id}");
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|s| s.lines().any(|l| l.ends_with(&suffix)))
}

impl ProcessWatch {
    /// Watches `pid` if it is (still) a process of container `id`; `None` when
    /// it is gone or is another process that took the pid.
    pub(crate) fn open(pid: u32, id: &str) -> Option<Self> {
        let watch = Self::of_pid(pid)?;
        // The pidfd pins one process. If the cgroup check that follows read
        // another process that took the pid in between, ours has exited, and
        // that process is not in our container's cgroup: the check fails.
        in_container_cgroup(pid, id).then_some(watch)
    }

    /// Watches whichever process has `pid` now.
    #[expect(
        unsafe_code,
        reason = "AsyncFd::register is unsafe: the caller vouches for the fd's lifetime"
    )]
    fn of_pid(pid: u32) -> Option<Self> {
        let raw = i32::try_from(pid).ok()?;
        let fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(raw)?,
            rustix::process::PidfdFlags::empty(),
        )
        .ok()?;
        // SAFETY: the `OwnedFd` owns the pidfd, so the descriptor stays open and
        // the same for as long as the `AsyncFd` holds it; it is closed only when
        // the `AsyncFd` is dropped, after deregistration.
        let fd = unsafe { AsyncFd::register(fd) }.ok()?;
        Some(Self { fd })
    }

    /// Whether this kernel has no pidfds.
    pub(crate) fn unsupported() -> bool {
        matches!(
            rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty()
            ),
            Err(rustix::io::Errno::NOSYS)
        )
    }

    /// Resolves once the process has exited (a pidfd turns readable).
    pub(crate) async fn exited(&self) {
        let _ = self.fd.readable().await;
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn_blocking(move || drop(fd));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_watch_ends_with_its_process_whoever_takes_the_pid_next() {
        // This test's process is in no container's cgroup: refused.
        assert!(ProcessWatch::open(std::process::id(), "nope").is_none());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        assert!(ProcessWatch::open(pid, "not-its-container").is_none());
        let watch = ProcessWatch::of_pid(pid).expect("pidfd");
        let alive = tokio::time::timeout(Duration::from_millis(200), watch.exited()).await;
        assert!(alive.is_err(), "no exit while the process runs");
        child.kill().expect("kill");
        child.wait().expect("reap");
        // Whatever process gets the pid now, the pidfd names the one that ended.
        tokio::time::timeout(Duration::from_secs(20), watch.exited())
            .await
            .expect("the watch ended with its process");
    }

    #[tokio::test]
    async fn a_rename_into_the_directory_wakes_the_watch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut watch = DirWatch::new(dir.path());
        assert!(watch.fd.is_some(), "inotify is available here");
        let p = dir.path().to_owned();
        let writer = tokio::spawn(async move {
            std::fs::write(p.join(".tmp"), b"42").expect("write");
            std::fs::rename(p.join(".tmp"), p.join("container.pid")).expect("rename");
        });
        // Far longer than any test run may wait: only the event can end it in time.
        let woke = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                watch.changed(Duration::from_secs(60)).await;
                if dir.path().join("container.pid").exists() {
                    return;
                }
            }
        })
        .await;
        writer.await.expect("writer");
        assert!(woke.is_ok(), "the watch woke on the rename");
    }
}
