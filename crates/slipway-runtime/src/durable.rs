//! Durable replacement of a small state file: a crash leaves either the old
//! contents or the new, never a torn or missing file, and a reported write survives
//! power loss.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` durably: a temp file beside it, fsync'd, renamed over
/// `path`, and the directory fsync'd so the rename itself is on disk.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no directory", path.display())))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_durable_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        super::write(&p, b"one").expect("write");
        super::write(&p, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
        let missing = dir.path().join("gone/state.json");
        assert!(
            super::write(&missing, b"x").is_err(),
            "a missing directory is an error"
        );
    }
}
