//! Container logs: one append-only file per container, rotated by size.

use std::fs::{self, OpenOptions};
use std::path::Path;

use crate::RuntimeError;

use crate::runtime::*;

impl Runtime {
    pub(crate) fn open_log(dir: &Path) -> Result<fs::File, RuntimeError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("container.log"))
            .map_err(io("open container log"))
    }

    /// Rotates the log once it passes `log_max_bytes`. The size check is one
    /// stat; the copy runs on the blocking pool.
    pub(crate) async fn rotate_log(&self, dir: &Path) {
        let log = dir.join("container.log");
        if fs::metadata(&log).map(|m| m.len()).unwrap_or(0) <= self.cfg.log_max_bytes {
            return;
        }
        let (dir, files) = (dir.to_owned(), self.cfg.log_files);
        let _ = tokio::task::spawn_blocking(move || rotate_now(&dir, files)).await;
    }
}

impl Runtime {
    /// Starts the one task that rotates every running container's log, once:
    /// every `log_check_interval` (10 s by default, as kubelet's
    /// `containerLogMonitorInterval`), for all containers together.
    pub(crate) fn start_log_rotation(self: &std::sync::Arc<Self>) {
        if self
            .rotating
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let runtime = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let every = runtime
                .upgrade()
                .map_or(std::time::Duration::from_secs(10), |r| {
                    r.cfg.log_check_interval
                });
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(rt) = runtime.upgrade() else { return };
                let running: Vec<_> = lock(&rt.containers)
                    .iter()
                    .filter(|(_, c)| *c.status.borrow() == Status::Running)
                    .map(|(name, _)| rt.dir(name))
                    .collect();
                for dir in running {
                    rt.rotate_log(&dir).await;
                }
            }
        });
    }
}

fn rotate_now(dir: &Path, files: usize) {
    let log = dir.join("container.log");
    for i in (1..files).rev() {
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
