//! Applying image layers to snapshot directories, safely.
//!
//! Each layer is unpacked once into its own directory in overlayfs "lower dir"
//! format: OCI whiteouts (`.wh.<name>`) become 0:0 character devices and opaque
//! markers (`.wh..wh..opq`) become the `trusted.overlay.opaque` xattr. Stacking the
//! snapshots as overlay lower dirs then yields exactly the image's root filesystem.
//!
//! Security: an entry may never write outside its layer directory: absolute paths
//! and `..` components are rejected, and so is any entry whose parent path passes
//! through a symlink (which only this same layer can have created). Hardlink
//! targets obey the same rules. Such a layer is refused whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use sha2::Digest as _;
use slipway_core::{Algorithm, Digest};

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// gzip
    Gzip,
    /// zstd
    Zstd,
    /// plain tar
    None,
}

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer's media type is not a tar layer we can read.
    #[error("layer media type {0:?} is not supported (tar, tar+gzip or tar+zstd)")]
    MediaType(String),
    /// The bytes do not hash to the layer's digest.
    #[error("layer {expected} is corrupt: its content hashes to {computed}")]
    DigestMismatch {
        /// The manifest's digest.
        expected: Digest,
        /// What the bytes hash to.
        computed: Digest,
    },
    /// A tar entry tries to escape the layer directory.
    #[error("layer {layer} is rejected: entry {entry:?} {reason}")]
    Escape {
        /// The layer digest.
        layer: Digest,
        /// The entry path.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The tar stream or the decompression failed.
    #[error("layer {layer} is corrupt: {source}")]
    Corrupt {
        /// The layer digest.
        layer: Digest,
        /// The cause.
        source: io::Error,
    },
    /// Writing the snapshot failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// What was written.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl LayerCompression {
    /// The compression for a layer media type.
    pub fn from_media_type(mt: &str) -> Result<Self, UnpackError> {
        let base = mt.trim_end_matches("+encrypted");
        Ok(match base {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Self::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Self::Zstd,
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Self::None,
            other => return Err(UnpackError::MediaType(other.to_owned())),
        })
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A relative, normalised path inside the layer, or the reason it is refused.
fn clean(raw: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path"),
        }
    }
    Ok(out)
}

/// Creates missing parents of `rel` under `root`, refusing to pass through a symlink.
fn prepare_parents(root: &Path, rel: &Path) -> Result<(), &'static str> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err("would be written through a symlink");
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err("has a parent that is not a directory"),
                Err(_) => {
                    fs::create_dir(&cur).map_err(|_| "has a parent that cannot be created")?;
                    let _ = fs::set_permissions(&cur, fs::Permissions::from_mode(0o755));
                }
            }
        }
    }
    Ok(())
}

/// Whether a path inside a lower snapshot resolves through a symlink (then it is
/// not a plain file of that layer and must not be followed).
fn lower_path_has_symlink(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    rel.parent().is_some_and(|parent| {
        parent.components().any(|c| {
            cur.push(c);
            fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink())
        })
    })
}

fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    layer: &Digest,
) -> Result<Option<PathBuf>, UnpackError> {
    entry
        .link_name()
        .map(|t| t.map(std::borrow::Cow::into_owned))
        .map_err(|source| UnpackError::Corrupt {
            layer: layer.clone(),
            source,
        })
}

/// A writer that remembers whether a write failed, so that an error from `io::copy`
/// can be blamed on the right side.
struct WriteSide<W> {
    inner: W,
    failed: bool,
}

impl<W: io::Write> io::Write for WriteSide<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
}

/// Unpacks the layer blob at `blob` into `dest` (created; must not exist), verifying
/// that the blob hashes to `digest`. On error `dest` may hold partial content; the
/// caller removes it.
///
/// `lowers` are the snapshots below this layer, top first: a hardlink to a file
/// that only a lower layer has becomes a copy of it (what overlayfs' copy-up would
/// give).
pub fn unpack_layer(
    file: File,
    digest: &Digest,
    compression: LayerCompression,
    dest: &Path,
    lowers: &[PathBuf],
) -> Result<(), UnpackError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Write { path, source }
    };
    let corrupt = |source| UnpackError::Corrupt {
        layer: digest.clone(),
        source,
    };
    fs::create_dir_all(dest).map_err(write_err(dest))?;
    let mut hashing = HashingReader {
        inner: io::BufReader::with_capacity(1 << 20, file),
        hasher: sha2::Sha256::new(),
    };
    {
        let reader: Box<dyn Read + '_> = match compression {
            // Multi-member: parallel gzip writers (pgzip, used by umoci) emit several.
            LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut hashing)),
            LayerCompression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(&mut hashing).map_err(corrupt)?)
            }
            LayerCompression::None => Box::new(&mut hashing),
        };
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = match entry {
                Ok(e) => e,
                // Some writers (umoci's, for one) end the stream right after the last
                // file's data, without padding or end blocks. Every entry so far was
                // read whole, and the digest check below still guards the bytes.
                Err(e)
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        || e.to_string().contains("unexpected EOF") =>
                {
                    tracing::debug!(layer = %digest, "layer ends without tar end blocks");
                    break;
                }
                Err(e) => return Err(corrupt(e)),
            };
            apply_entry(&mut entry, dest, digest, lowers)?;
        }
        // Read whatever follows the tar end marker so the whole blob is hashed.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
    }
    // Any bytes after the compressed stream still count toward the digest.
    io::copy(&mut hashing.inner, &mut io::sink()).map_err(corrupt)?;
    if digest.algorithm() != Algorithm::Sha256 {
        return Err(UnpackError::MediaType(format!(
            "digest algorithm {}",
            digest.algorithm().as_str()
        )));
    }
    let computed: Digest = format!("sha256:{}", hex::encode(hashing.hasher.finalize()))
        .parse()
        .map_err(|_| UnpackError::DigestMismatch {
            expected: digest.clone(),
            computed: digest.clone(),
        })?;
    if &computed != digest {
        return Err(UnpackError::DigestMismatch {
            expected: digest.clone(),
            computed,
        });
    }
    Ok(())
}

fn apply_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    layer: &Digest,
    lowers: &[PathBuf],
) -> Result<(), UnpackError> {
    let raw = entry
        .path()
        .map_err(|source| UnpackError::Corrupt {
            layer: layer.clone(),
            source,
        })?
        .into_owned();
    let escape = |reason| UnpackError::Escape {
        layer: layer.clone(),
        entry: raw.display().to_string(),
        reason,
    };
    let rel = clean(&raw).map_err(escape)?;
    if rel.as_os_str().is_empty() {
        return Ok(()); // the layer root itself
    }
    prepare_parents(dest, &rel).map_err(escape)?;
    let path = dest.join(&rel);
    let write_err = |source| UnpackError::Write {
        path: path.clone(),
        source,
    };
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or_default();

    // Whiteouts, converted to overlayfs format.
    if name == ".wh..wh..opq" {
        let dir = path.parent().unwrap_or(dest);
        xattr::set(dir, "trusted.overlay.opaque", b"y").map_err(write_err)?;
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(".wh.") {
        let target = path.with_file_name(hidden);
        remove_existing(&target).map_err(write_err)?;
        nix::sys::stat::mknod(
            &target,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| write_err(io::Error::from(e)))?;
        return Ok(());
    }

    let header = entry.header();
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
    let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
    let kind = header.entry_type();
    match kind {
        tar::EntryType::Directory => match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                remove_existing(&path).map_err(write_err)?;
                fs::create_dir(&path).map_err(write_err)?;
            }
            Err(_) => fs::create_dir(&path).map_err(write_err)?,
        },
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            remove_existing(&path).map_err(write_err)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(write_err)?;
            // A failed read is the layer's fault; a failed write (a full disk) is not.
            let mut out = WriteSide {
                inner: &mut f,
                failed: false,
            };
            if let Err(source) = io::copy(entry, &mut out) {
                return Err(if out.failed {
                    write_err(source)
                } else {
                    UnpackError::Corrupt {
                        layer: layer.clone(),
                        source,
                    }
                });
            }
        }
        tar::EntryType::Symlink => {
            let target = link_target(entry, layer)?
                .ok_or_else(|| escape("is a symlink without a target"))?;
            remove_existing(&path).map_err(write_err)?;
            symlink(target, &path).map_err(write_err)?;
        }
        tar::EntryType::Link => {
            let target = link_target(entry, layer)?
                .ok_or_else(|| escape("is a hardlink without a target"))?;
            let target_rel = clean(&target).map_err(escape)?;
            prepare_parents(dest, &target_rel).map_err(escape)?;
            let source = dest.join(&target_rel);
            remove_existing(&path).map_err(write_err)?;
            if fs::symlink_metadata(&source).is_ok() {
                fs::hard_link(&source, &path).map_err(write_err)?;
                return Ok(()); // shares the target's inode, owner and mode
            }
            // The target is in a lower layer: copy it up.
            let lower = lowers
                .iter()
                .filter(|l| !lower_path_has_symlink(l, &target_rel))
                .map(|l| l.join(&target_rel))
                .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
                .ok_or_else(|| escape("is a hardlink to a file no layer has"))?;
            let meta = fs::metadata(&lower).map_err(write_err)?;
            fs::copy(&lower, &path).map_err(write_err)?;
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::lchown(&path, Some(meta.uid()), Some(meta.gid()))
                .map_err(write_err)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(write_err)?;
            return Ok(());
        }
        tar::EntryType::Fifo => {
            remove_existing(&path).map_err(write_err)?;
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(mode))
                .map_err(|e| write_err(io::Error::from(e)))?;
        }
        // Device nodes are skipped: /dev comes from the runtime.
        tar::EntryType::Char | tar::EntryType::Block => return Ok(()),
        // PAX and GNU metadata entries are consumed by the tar reader.
        _ => return Ok(()),
    }
    std::os::unix::fs::lchown(&path, uid, gid).map_err(write_err)?;
    if kind != tar::EntryType::Symlink {
        // After chown, which clears set-id bits.
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(write_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> (tempfile::NamedTempFile, Digest) {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let data = b.into_inner().expect("tar");
        let f = tempfile::NamedTempFile::new().expect("tmp");
        fs::write(f.path(), &data).expect("write");
        (f, Digest::sha256_of(&data))
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        // `append_data` would refuse hostile names; write the raw header instead.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, body).expect("append");
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o777);
        h.set_size(0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, io::empty()).expect("append");
    }

    fn unpack(
        f: &tempfile::NamedTempFile,
        d: &Digest,
    ) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let out = tempfile::tempdir().expect("tmp");
        let r = unpack_layer(
            File::open(f.path()).expect("open"),
            d,
            LayerCompression::None,
            &out.path().join("l"),
            &[],
        );
        (out, r)
    }

    #[test]
    fn hostile_entries_are_rejected() {
        type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let cases: Vec<Build> = vec![
            Box::new(|b| file(b, "../escape", b"x")),
            Box::new(|b| file(b, "a/../../escape", b"x")),
            Box::new(|b| file(b, "/etc/passwd", b"x")),
            Box::new(|b| {
                link(b, tar::EntryType::Symlink, "evil", "/tmp");
                file(b, "evil/owned", b"x");
            }),
            Box::new(|b| link(b, tar::EntryType::Link, "hard", "../../etc/passwd")),
            Box::new(|b| {
                link(b, tar::EntryType::Symlink, "evil", "/etc");
                link(b, tar::EntryType::Link, "hard", "evil/passwd");
            }),
        ];
        for (i, build) in cases.iter().enumerate() {
            let (f, d) = layer(|b| build(b));
            let (_out, r) = unpack(&f, &d);
            assert!(
                matches!(r, Err(UnpackError::Escape { .. })),
                "case {i}: {r:?}"
            );
        }
    }

    #[test]
    fn whiteouts_become_overlay_markers_and_links_are_kept() {
        let (f, d) = layer(|b| {
            file(b, "dir/keep", b"k");
            file(b, "dir/.wh.gone", b"");
            file(b, "opaque/.wh..wh..opq", b"");
            file(b, "data", b"payload");
            link(b, tar::EntryType::Link, "data-link", "data");
            link(b, tar::EntryType::Symlink, "sym", "data");
        });
        let (out, r) = unpack(&f, &d);
        r.expect("unpacks");
        let root = out.path().join("l");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let wh = fs::symlink_metadata(root.join("dir/gone")).expect("whiteout");
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        assert_eq!(
            xattr::get(root.join("opaque"), "trusted.overlay.opaque").expect("xattr"),
            Some(b"y".to_vec())
        );
        assert_eq!(
            fs::metadata(root.join("data")).expect("m").ino(),
            fs::metadata(root.join("data-link")).expect("m").ino()
        );
        assert_eq!(
            fs::read_link(root.join("sym")).expect("link"),
            Path::new("data")
        );
    }

    #[test]
    fn a_corrupt_or_mismatched_layer_is_refused() {
        let (f, _) = layer(|b| file(b, "x", b"1"));
        let wrong = Digest::sha256_of(b"other");
        let (_out, r) = unpack(&f, &wrong);
        assert!(
            matches!(r, Err(UnpackError::DigestMismatch { .. })),
            "{r:?}"
        );
        let out = tempfile::tempdir().expect("tmp");
        let garbage = tempfile::NamedTempFile::new().expect("tmp");
        fs::write(garbage.path(), b"definitely not gzip").expect("write");
        let r = unpack_layer(
            File::open(garbage.path()).expect("open"),
            &Digest::sha256_of(b"definitely not gzip"),
            LayerCompression::Gzip,
            &out.path().join("l"),
            &[],
        );
        assert!(matches!(r, Err(UnpackError::Corrupt { .. })), "{r:?}");
    }
}
