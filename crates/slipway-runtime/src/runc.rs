//! The OCI runtime CLI (runc by default, crun selectable), run through
//! `tokio::process`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Why the runtime binary could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// The binary is not installed.
    #[error(
        "the OCI runtime {0:?} is not installed or not on PATH: install it with `apt-get install -y runc` (or set [runtime] binary)"
    )]
    Missing(String),
    /// It ran and failed.
    #[error("{binary} {args}: {message}")]
    Failed {
        /// The binary.
        binary: String,
        /// Its arguments.
        args: String,
        /// Its stderr.
        message: String,
    },
    /// It could not be started.
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
}

/// A handle on the runtime binary.
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

/// Finds `name` on PATH (or accepts an existing absolute path).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_owned());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|c| c.is_file())
}

impl Runc {
    /// A runtime `name` (e.g. `runc`) keeping its state under `root`.
    pub fn new(name: &str, root: PathBuf) -> Result<Self, RuncError> {
        let binary = find_binary(name).ok_or_else(|| RuncError::Missing(name.to_owned()))?;
        Ok(Self { binary, root })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c
    }

    async fn output(&self, args: &[&str]) -> Result<String, RuncError> {
        let out = self
            .cmd()
            .args(args)
            .output()
            .await
            .map_err(|e| RuncError::Spawn(self.binary.display().to_string(), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RuncError::Failed {
                binary: self.binary.display().to_string(),
                args: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// Starts `runc run --keep` in the foreground as a child: it exits with the
    /// container's status, and keeps the container (and its cgroup) for inspection
    /// until [`Runc::delete`]. stdout and stderr go to `log`.
    pub fn run(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        log: &std::fs::File,
    ) -> Result<Child, RuncError> {
        let out = log
            .try_clone()
            .map_err(|e| RuncError::Spawn("log file".into(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| RuncError::Spawn("log file".into(), e))?;
        self.cmd()
            .arg("run")
            .arg("--keep")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .stdout(out)
            .stderr(err)
            // The container outlives the daemon: it must not die with it.
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RuncError::Spawn(self.binary.display().to_string(), e))
    }

    /// Sends a signal to the container's init process.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.output(&["kill", id, signal]).await.map(|_| ())
    }

    /// Deletes the container (forcefully), removing its cgroup and runtime state.
    /// A container that does not exist is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), RuncError> {
        match self.output(&["delete", "--force", id]).await {
            Err(RuncError::Failed { message, .. })
                if message.contains("does not exist") || message.contains("not exist") =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Runs `argv` inside the container; returns its exit status (for exec probes).
    pub async fn exec(&self, id: &str, argv: &[String]) -> Result<i32, RuncError> {
        let out = self
            .cmd()
            .arg("exec")
            .arg(id)
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map_err(|e| RuncError::Spawn(self.binary.display().to_string(), e))?;
        Ok(out.code().unwrap_or(-1))
    }

    /// The container's status (`running`, `stopped`, `created`, …), or `None` when
    /// the runtime does not know it.
    pub async fn state(&self, id: &str) -> Option<(String, u32)> {
        let out = self.output(&["state", id]).await.ok()?;
        let j: serde_json::Value = serde_json::from_str(&out).ok()?;
        let status = j["status"].as_str()?.to_owned();
        let pid = j["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        Some((status, pid))
    }
}
