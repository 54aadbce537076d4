//! Deterministic image building: files, directories and binaries into one layer, an
//! image config and a manifest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest as _;
use slipway_core::{Digest, media};

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// gzip (the default; every client reads it).
    #[default]
    Gzip,
    /// zstd (smaller and faster; needs a recent client).
    Zstd,
    /// No compression.
    None,
}

impl Compression {
    /// The layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Self::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }

    /// Parses `gzip`, `zstd` or `none`.
    pub fn parse(s: &str) -> Result<Self, PackError> {
        match s {
            "gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            "none" => Ok(Self::None),
            other => Err(PackError::Invalid(format!(
                "compression {other:?} is not gzip, zstd or none"
            ))),
        }
    }
}

/// One thing to put in the image: `src` on the host, `dest` inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Host path (file, directory or symlink).
    pub src: PathBuf,
    /// Absolute path in the image.
    pub dest: String,
}

impl Input {
    /// Parses `SRC[:DEST]`. Without DEST a file lands at `/<file name>` and a
    /// directory's contents at `/`.
    pub fn parse(s: &str) -> Result<Self, PackError> {
        let (src, dest) = match s.split_once(':') {
            Some((a, b)) => (a, b.to_owned()),
            None => {
                let p = Path::new(s);
                let dest = if p.is_dir() {
                    "/".to_owned()
                } else {
                    format!("/{}", p.file_name().and_then(|n| n.to_str()).unwrap_or(s))
                };
                (s, dest)
            }
        };
        if !dest.starts_with('/') || dest.split('/').any(|c| c == ".." || c == ".") {
            return Err(PackError::Invalid(format!(
                "destination {dest:?} must be an absolute path without '.' or '..'"
            )));
        }
        Ok(Self {
            src: PathBuf::from(src),
            dest,
        })
    }
}

/// Image config fields a pack may set; `None`/empty keeps the base image's.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    /// ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    /// CMD.
    pub cmd: Option<Vec<String>>,
    /// `K=V` pairs added to (or replacing in) the base env.
    pub env: Vec<String>,
    /// WORKDIR.
    pub workdir: Option<String>,
    /// USER.
    pub user: Option<String>,
    /// Exposed ports, e.g. `8080/tcp`.
    pub exposed_ports: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// STOPSIGNAL, e.g. `SIGQUIT`.
    pub stop_signal: Option<String>,
}

/// A built layer, stored in a temp file until pushed.
#[derive(Debug)]
pub struct Layer {
    /// Media type.
    pub media_type: &'static str,
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
    /// Compressed size.
    pub size: u64,
    /// The blob.
    pub file: tempfile::NamedTempFile,
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// An input could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The input.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Writing the layer failed.
    #[error("cannot write layer: {0}")]
    Write(io::Error),
    /// A flag value is invalid.
    #[error("{0}")]
    Invalid(String),
}

struct HashWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hash_writer<W: Write>(inner: W) -> HashWriter<W> {
    HashWriter {
        inner,
        hasher: sha2::Sha256::new(),
        count: 0,
    }
}

fn digest_of(h: sha2::Sha256) -> Digest {
    let hex = hex::encode(h.finalize());
    // A sha256 hex string is always a valid digest.
    format!("sha256:{hex}")
        .parse()
        .unwrap_or_else(|_| Digest::sha256_of(b""))
}

/// One tar entry to write, keyed by its path in the image (no leading `/`).
enum Entry {
    Dir(u32),
    File(PathBuf, u32),
    Symlink(PathBuf),
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Read {
        path: path.to_owned(),
        source,
    }
}

fn collect(src: &Path, dest: &str, out: &mut BTreeMap<String, Entry>) -> Result<(), PackError> {
    let meta = fs::symlink_metadata(src).map_err(read_err(src))?;
    let key = dest
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned();
    // Every parent directory exists in the layer, mode 0755.
    let mut parent = String::new();
    for comp in key
        .split('/')
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .iter()
        .rev()
        .skip(1)
        .rev()
    {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(comp);
        out.entry(parent.clone()).or_insert(Entry::Dir(0o755));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        out.insert(
            key,
            Entry::Symlink(fs::read_link(src).map_err(read_err(src))?),
        );
    } else if meta.is_dir() {
        if !key.is_empty() {
            out.insert(key.clone(), Entry::Dir(mode));
        }
        let mut children: Vec<_> = fs::read_dir(src)
            .map_err(read_err(src))?
            .collect::<Result<_, _>>()
            .map_err(read_err(src))?;
        children.sort_by_key(fs::DirEntry::file_name);
        for c in children {
            let name = c.file_name();
            let name = name.to_str().ok_or_else(|| {
                PackError::Invalid(format!("{} has a non-UTF-8 name", c.path().display()))
            })?;
            let child_dest = if key.is_empty() {
                name.to_owned()
            } else {
                format!("{key}/{name}")
            };
            collect(&c.path(), &child_dest, out)?;
        }
    } else if meta.is_file() {
        out.insert(key, Entry::File(src.to_owned(), mode));
    } else {
        return Err(PackError::Invalid(format!(
            "{} is not a file, directory or symlink",
            src.display()
        )));
    }
    Ok(())
}

fn epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(epoch());
    h.set_size(size);
    h
}

/// Builds one layer from `inputs`, deterministically.
pub fn build_layer(inputs: &[Input], compression: Compression) -> Result<Layer, PackError> {
    let mut entries = BTreeMap::new();
    for i in inputs {
        collect(&i.src, &i.dest, &mut entries)?;
    }
    let file = tempfile::NamedTempFile::new().map_err(PackError::Write)?;
    let out = hash_writer(BufWriter::new(file.reopen().map_err(PackError::Write)?));
    let (compressed, diff_id) = match compression {
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
            let (enc, diff) = write_tar(&entries, hash_writer(enc))?;
            (enc.finish().map_err(PackError::Write)?, diff)
        }
        Compression::Zstd => {
            let enc = zstd::stream::write::Encoder::new(out, 3).map_err(PackError::Write)?;
            let (enc, diff) = write_tar(&entries, hash_writer(enc))?;
            (enc.finish().map_err(PackError::Write)?, diff)
        }
        Compression::None => {
            let (out, diff) = write_tar(&entries, hash_writer(out))?;
            let d = out.hasher.clone();
            let count = out.count;
            let mut out = out;
            out.flush().map_err(PackError::Write)?;
            return Ok(Layer {
                media_type: compression.media_type(),
                digest: digest_of(d),
                diff_id: diff,
                size: count,
                file,
            });
        }
    };
    let mut compressed = compressed;
    compressed.flush().map_err(PackError::Write)?;
    Ok(Layer {
        media_type: compression.media_type(),
        digest: digest_of(compressed.hasher),
        diff_id,
        size: compressed.count,
        file,
    })
}

fn write_tar<W: Write>(
    entries: &BTreeMap<String, Entry>,
    w: HashWriter<W>,
) -> Result<(W, Digest), PackError> {
    let mut b = tar::Builder::new(w);
    b.mode(tar::HeaderMode::Deterministic);
    for (path, e) in entries {
        match e {
            Entry::Dir(mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, format!("{path}/"), io::empty())
                    .map_err(PackError::Write)?;
            }
            Entry::File(src, mode) => {
                let f = File::open(src).map_err(read_err(src))?;
                let len = f.metadata().map_err(read_err(src))?.size();
                let mut h = header(tar::EntryType::Regular, *mode, len);
                b.append_data(&mut h, path, f).map_err(PackError::Write)?;
            }
            Entry::Symlink(target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target)
                    .map_err(PackError::Write)?;
            }
        }
    }
    let w = b.into_inner().map_err(PackError::Write)?;
    let diff = digest_of(w.hasher);
    Ok((w.inner, diff))
}

/// The image config: the base config (if any) with `overrides` applied and the new
/// layer's diff_id appended.
pub fn image_config(
    base: Option<&Value>,
    diff_ids: &[Digest],
    o: &ConfigOverrides,
) -> Result<Vec<u8>, PackError> {
    let mut cfg = base.cloned().unwrap_or_else(|| {
        json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}})
    });
    cfg["architecture"] = json!("amd64");
    cfg["os"] = json!("linux");
    cfg["created"] = json!("1970-01-01T00:00:00Z");
    if !cfg["config"].is_object() {
        cfg["config"] = json!({});
    }
    let c = &mut cfg["config"];
    if let Some(e) = &o.entrypoint {
        c["Entrypoint"] = json!(e);
    }
    if let Some(cmd) = &o.cmd {
        c["Cmd"] = json!(cmd);
    }
    if !o.env.is_empty() {
        let mut env: Vec<String> = c["Env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for kv in &o.env {
            let Some((k, _)) = kv.split_once('=') else {
                return Err(PackError::Invalid(format!(
                    "--env {kv:?} must be KEY=VALUE"
                )));
            };
            env.retain(|e| e.split_once('=').is_none_or(|(ek, _)| ek != k));
            env.push(kv.clone());
        }
        c["Env"] = json!(env);
    }
    if let Some(w) = &o.workdir {
        c["WorkingDir"] = json!(w);
    }
    if let Some(u) = &o.user {
        c["User"] = json!(u);
    }
    if let Some(sig) = &o.stop_signal {
        slipway_core::service::parse_signal(sig)
            .map_err(|e| PackError::Invalid(format!("--stop-signal: {e}")))?;
        c["StopSignal"] = json!(sig);
    }
    for p in &o.exposed_ports {
        let p = if p.contains('/') {
            p.clone()
        } else {
            format!("{p}/tcp")
        };
        let port = p.split('/').next().unwrap_or("");
        if port.parse::<u16>().is_err() {
            return Err(PackError::Invalid(format!(
                "--expose {p:?} is not a port number"
            )));
        }
        if !c["ExposedPorts"].is_object() {
            c["ExposedPorts"] = json!({});
        }
        c["ExposedPorts"][p] = json!({});
    }
    for (k, v) in &o.labels {
        if !c["Labels"].is_object() {
            c["Labels"] = json!({});
        }
        c["Labels"][k] = json!(v);
    }
    let mut ids: Vec<Value> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ids.extend(diff_ids.iter().map(|d| json!(d.to_string())));
    cfg["rootfs"] = json!({"type": "layers", "diff_ids": ids});
    serde_json::to_vec(&cfg).map_err(|e| PackError::Invalid(e.to_string()))
}

/// An OCI image manifest for a config and layer descriptors.
pub fn image_manifest(config: &[u8], layers: &[(String, Digest, u64)]) -> Vec<u8> {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": Digest::sha256_of(config).to_string(),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(mt, d, s)| json!({"mediaType": mt, "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(d.path().join("www/sub")).expect("mkdir");
        fs::write(d.path().join("www/index.html"), "hi").expect("write");
        fs::write(d.path().join("www/sub/b.txt"), "b").expect("write");
        fs::write(d.path().join("bin"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(d.path().join("bin"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("index.html", d.path().join("www/link")).expect("symlink");
        d
    }

    #[test]
    fn same_inputs_give_the_same_digest_whatever_the_mtimes() {
        let d = tree();
        let inputs = vec![
            Input::parse(&format!("{}:/srv/www", d.path().join("www").display())).expect("input"),
            Input::parse(&format!(
                "{}:/usr/local/bin/app",
                d.path().join("bin").display()
            ))
            .expect("input"),
        ];
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let a = build_layer(&inputs, c).expect("layer");
            let f = d.path().join("www/index.html");
            fs::write(&f, "hi").expect("rewrite with a new mtime");
            let b = build_layer(&inputs, c).expect("layer");
            assert_eq!(a.digest, b.digest, "{c:?}");
            assert_eq!(a.diff_id, b.diff_id);
            assert_eq!(a.size, fs::metadata(a.file.path()).expect("meta").len());
        }
    }

    #[test]
    fn layer_holds_sorted_entries_with_parents_and_normalised_owners() {
        let d = tree();
        let inputs = vec![
            Input::parse(&format!("{}:/srv/www", d.path().join("www").display())).expect("input"),
        ];
        let layer = build_layer(&inputs, Compression::None).expect("layer");
        let mut ar = tar::Archive::new(File::open(layer.file.path()).expect("open"));
        let mut names = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            assert_eq!(
                (
                    e.header().uid().expect("uid"),
                    e.header().gid().expect("gid")
                ),
                (0, 0)
            );
            assert_eq!(e.header().mtime().expect("mtime"), 0);
            names.push(e.path().expect("path").to_string_lossy().into_owned());
        }
        assert_eq!(
            names,
            [
                "srv/",
                "srv/www/",
                "srv/www/index.html",
                "srv/www/link",
                "srv/www/sub/",
                "srv/www/sub/b.txt"
            ]
        );
    }

    #[test]
    fn config_applies_overrides_and_rejects_bad_values() {
        let o = ConfigOverrides {
            entrypoint: Some(vec!["/hello".into()]),
            env: vec!["A=1".into(), "PATH=/bin".into()],
            exposed_ports: vec!["8080".into()],
            ..ConfigOverrides::default()
        };
        let base = json!({"config": {"Env": ["PATH=/usr/bin", "B=2"]}, "rootfs": {"type": "layers", "diff_ids": ["sha256:00"]}});
        let d = Digest::sha256_of(b"x");
        let c: Value = serde_json::from_slice(
            &image_config(Some(&base), std::slice::from_ref(&d), &o).expect("config"),
        )
        .expect("json");
        assert_eq!(c["config"]["Env"], json!(["B=2", "A=1", "PATH=/bin"]));
        assert_eq!(c["config"]["Entrypoint"], json!(["/hello"]));
        assert!(c["config"]["ExposedPorts"]["8080/tcp"].is_object());
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:00", d.to_string()]));
        let bad = ConfigOverrides {
            env: vec!["NOEQUALS".into()],
            ..ConfigOverrides::default()
        };
        assert!(image_config(None, &[], &bad).is_err());
        assert!(Input::parse("/x:relative").is_err());
        assert!(Input::parse("/x:/a/../b").is_err());
    }
}
