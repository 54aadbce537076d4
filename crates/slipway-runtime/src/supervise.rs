//! The supervisor of one container: runs runc in the foreground, records exits and
//! OOM kills, applies the restart policy with backoff, and watches re-adopted ones.

use std::fs::{self};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::pidwatch::{DirWatch, ProcessWatch};
use crate::runc::Runc;
use crate::spec::RestartPolicy;

use crate::runtime::*;

/// Whether the cgroup `/slipway/<id>` under the hierarchy mounted at `root`
/// counted an OOM kill: `memory.oom_control` on cgroup v1, `memory.events` on
/// v2 (a v2-only host, or a hybrid one with memory on the unified tree). Both
/// name the count `oom_kill`.
fn oom_killed_in(root: &Path, id: &str) -> bool {
    let candidates = [
        root.join("memory/slipway")
            .join(id)
            .join("memory.oom_control"),
        root.join("slipway").join(id).join("memory.events"),
        root.join("unified/slipway").join(id).join("memory.events"),
    ];
    candidates.iter().any(|p| {
        fs::read_to_string(p).is_ok_and(|s| {
            s.lines()
                .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
        })
    })
}

impl Runtime {
    /// Whether the container's last run hit its memory limit's OOM killer.
    pub(crate) fn oom_killed(id: &str) -> bool {
        oom_killed_in(Path::new("/sys/fs/cgroup"), id)
    }

    pub(crate) async fn supervise(self: Arc<Self>, ctr: Arc<Ctr>, runc: Runc, adopt: Option<u32>) {
        let (name, id) = {
            let i = lock(&ctr.info);
            (i.name.clone(), i.id.clone())
        };
        let dir = self.dir(&name);
        self.start_log_rotation();
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
                Self::wait_adopted(pid, &id).await;
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
                // watch: start latency matters); then only the exit wakes this task.
                let status = loop {
                    let Some(w) = watch.as_mut() else {
                        break child.wait().await;
                    };
                    tokio::select! {
                        s = child.wait() => break s,
                        () = w.changed(Duration::from_millis(200)) => {
                            if let Some(pid) = fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
                                ctr.update(&dir, |i| {
                                    i.status = Status::Running;
                                    i.started_at_ms = Some(started);
                                    i.pid = Some(pid);
                                    i.backoff_ms = None;
                                });
                                tracing::debug!(container = %name, since_spawn = ?spawned.elapsed(), "runc started the process");
                                watch = None;
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
            self.exits.send_modify(|n| *n += 1);
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

    /// Waits until an adopted container's process (not our child) exits,
    /// through a pidfd, which a reused pid cannot fool. Where pidfds are missing
    /// (Linux before 5.3) it polls `/proc/<pid>` once a second.
    pub(crate) async fn wait_adopted(pid: u32, id: &str) {
        if let Some(watch) = ProcessWatch::open(pid, id) {
            watch.exited().await;
            return;
        }
        if !ProcessWatch::unsupported() {
            return; // already gone, or the pid is another process's now
        }
        let proc = PathBuf::from(format!("/proc/{pid}"));
        while proc.exists() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod oom_tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_v1_and_v2_hierarchies() {
        let root = tempfile::tempdir().expect("tmp");
        let write = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(p, text).expect("write");
        };
        write(
            "memory/slipway/a/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        );
        write(
            "slipway/b/memory.events",
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        write(
            "unified/slipway/c/memory.events",
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 2\n",
        );
        write(
            "slipway/d/memory.events",
            "low 0\nhigh 0\nmax 9\noom 0\noom_kill 0\n",
        );
        assert!(oom_killed_in(root.path(), "a"), "v1");
        assert!(oom_killed_in(root.path(), "b"), "v2");
        assert!(oom_killed_in(root.path(), "c"), "v2 on a hybrid host");
        assert!(
            !oom_killed_in(root.path(), "d"),
            "hitting max without a kill is no OOM kill"
        );
        assert!(!oom_killed_in(root.path(), "missing"));
    }
}
