//! The audit log: one JSON line per mutation and per failed login, appended and
//! fsync'd before the response leaves, rotated by size
//! (`<data>/audit/audit.log`, `audit.log.1`, …).

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub(crate) use slipway_api::AuditEntry;

/// The log's owner.
pub(crate) struct AuditLog {
    dir: PathBuf,
    max_bytes: u64,
    files: usize,
    file: Mutex<Option<std::fs::File>>,
}

/// Filters of `slipway audit`.
#[derive(Debug, Default, Deserialize, Serialize)]
pub(crate) struct AuditQuery {
    /// Only entries at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only entries whose target is this service.
    pub service: Option<String>,
    /// At most this many, newest kept.
    pub limit: Option<usize>,
}

impl AuditLog {
    pub(crate) fn open(data_dir: &Path, max_bytes: u64, files: usize) -> std::io::Result<Self> {
        let dir = data_dir.join("audit");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            max_bytes: max_bytes.max(4096),
            files: files.max(1),
            file: Mutex::new(None),
        })
    }

    fn path(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.dir.join("audit.log")
        } else {
            self.dir.join(format!("audit.log.{i}"))
        }
    }

    /// Appends one entry durably (blocking: call off the async workers).
    pub(crate) fn append(&self, entry: &AuditEntry) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let size = match slot.as_ref() {
            Some(f) => f.metadata()?.len(),
            None => std::fs::metadata(self.path(0)).map_or(0, |m| m.len()),
        };
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            *slot = None;
            for i in (0..self.files).rev() {
                let from = self.path(i);
                if from.exists() {
                    std::fs::rename(&from, self.path(i + 1))?;
                }
            }
            let _ = std::fs::remove_file(self.path(self.files + 1));
        }
        if slot.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(self.path(0))?;
            std::fs::File::open(&self.dir)?.sync_all()?;
            *slot = Some(f);
        }
        let f = slot
            .as_mut()
            .ok_or_else(|| std::io::Error::other("audit log closed"))?;
        f.write_all(&line)?;
        f.sync_data()
    }

    /// Reads entries matching `q`, oldest first.
    pub(crate) fn read(&self, q: &AuditQuery) -> std::io::Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for i in (0..=self.files).rev() {
            let f = match std::fs::File::open(self.path(i)) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in std::io::BufReader::new(f).lines() {
                let Ok(e) = serde_json::from_str::<AuditEntry>(&line?) else {
                    continue;
                };
                let keep = q.since_ms.is_none_or(|s| e.at_ms >= s)
                    && q.principal.as_ref().is_none_or(|p| *p == e.principal)
                    && q.service
                        .as_ref()
                        .is_none_or(|s| e.target == format!("service:{s}"));
                if keep {
                    out.push(e);
                }
            }
        }
        if let Some(n) = q.limit
            && out.len() > n
        {
            out.drain(..out.len() - n);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64, principal: &str, target: &str) -> AuditEntry {
        AuditEntry {
            at_ms: i,
            principal: principal.into(),
            source: "127.0.0.1".into(),
            action: "deploy".into(),
            target: target.into(),
            result: "ok".into(),
            status: 202,
        }
    }

    #[test]
    fn entries_append_rotate_by_size_and_filter() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = AuditLog::open(dir.path(), 4096, 2).expect("open");
        for i in 0..100 {
            let who = if i % 2 == 0 { "alice" } else { "token:ci" };
            log.append(&entry(i, who, &format!("service:s{}", i % 3)))
                .expect("append");
        }
        assert!(dir.path().join("audit/audit.log.1").exists(), "rotated");
        assert!(!dir.path().join("audit/audit.log.4").exists(), "bounded");
        let all = log.read(&AuditQuery::default()).expect("read");
        assert!(
            all.windows(2).all(|w| w[0].at_ms < w[1].at_ms),
            "oldest first"
        );
        assert_eq!(all.last().map(|e| e.at_ms), Some(99));
        let alice = log
            .read(&AuditQuery {
                principal: Some("alice".into()),
                service: Some("s0".into()),
                since_ms: Some(50),
                limit: None,
            })
            .expect("read");
        assert!(!alice.is_empty());
        assert!(
            alice
                .iter()
                .all(|e| e.principal == "alice" && e.target == "service:s0" && e.at_ms >= 50)
        );
    }
}
