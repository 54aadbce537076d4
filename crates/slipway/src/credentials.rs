//! Stored logins: `$XDG_CONFIG_HOME/slipway/credentials.json` (or
//! `~/.config/slipway/…`), mode 0600, one token per server URL.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One server's login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    /// Who logged in.
    pub user: String,
    /// The refresh or API token.
    pub token: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    servers: BTreeMap<String, Login>,
}

fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("slipway").join("credentials.json"))
}

fn key(server: &str) -> String {
    server.trim_end_matches('/').to_owned()
}

fn read() -> File {
    path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write(f: &File) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let path = path().context("neither XDG_CONFIG_HOME nor HOME is set: cannot store the login")?;
    let dir = path.parent().context("no parent directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(".credentials.json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(&serde_json::to_vec_pretty(f)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// The stored token for `server`.
pub fn token_for(server: &str) -> Option<String> {
    read().servers.get(&key(server)).map(|l| l.token.clone())
}

/// Stores a login; returns the file.
pub fn store(server: &str, login: Login) -> anyhow::Result<PathBuf> {
    let mut f = read();
    f.servers.insert(key(server), login);
    write(&f)
}

/// Forgets the login of `server`; `false` if there was none.
pub fn forget(server: &str) -> anyhow::Result<bool> {
    let mut f = read();
    let had = f.servers.remove(&key(server)).is_some();
    if had {
        write(&f)?;
    }
    Ok(had)
}
