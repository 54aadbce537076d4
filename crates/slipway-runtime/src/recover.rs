//! Re-adopting containers after a daemon restart.

use std::fs::{self};
use std::sync::Arc;

use crate::RuntimeError;
use crate::rootfs::{self, RootfsKind};
use crate::spec::{self, RestartPolicy};

use crate::runtime::*;

impl Runtime {
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
}
