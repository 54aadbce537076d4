//! Collecting layer snapshots no container uses: after a grace period, and
//! sooner, oldest unused first, while the data disk is past its high-water mark
//! (kubelet's image GC: 85% high, 80% low). Snapshots of images the caller asks
//! to keep (a service's recent revisions, for rollback) are never collected.
//!
//! A snapshot's modification time is its last use: unpacking sets it, and every
//! container start and removal touches the snapshots of its image.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use slipway_core::Digest;

use crate::RuntimeError;
use crate::runtime::*;

/// What a collection may remove.
#[derive(Debug, Clone)]
pub struct SnapshotGcOptions {
    /// A snapshot unused this long is removed.
    pub grace: Duration,
    /// Past this percentage of the data disk in use, unused snapshots are
    /// removed regardless of the grace period, oldest first…
    pub high_percent: u8,
    /// …until usage is back under this one.
    pub low_percent: u8,
    /// Images (manifest digests) whose snapshots stay.
    pub keep_images: Vec<Digest>,
    /// Report what would go, remove nothing.
    pub dry_run: bool,
}

impl Default for SnapshotGcOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            high_percent: 85,
            low_percent: 80,
            keep_images: Vec::new(),
            dry_run: false,
        }
    }
}

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotGcReport {
    /// Layer digests removed, with their size on disk.
    pub removed: Vec<(String, u64)>,
    /// Bytes freed in all.
    pub bytes_freed: u64,
    /// Snapshots kept because a container or a kept image uses them.
    pub in_use: usize,
    /// Whether the disk was past the high-water mark.
    pub pressure: bool,
}

/// Percentage of the filesystem holding `path` in use.
pub fn disk_used_percent(path: &Path) -> Option<f64> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let total = s.blocks() as f64;
    if total == 0.0 {
        return None;
    }
    // As df: used over what non-root users could have (used + available).
    let used = (s.blocks() - s.blocks_free()) as f64;
    let avail = s.blocks_available() as f64;
    Some(used / (used + avail) * 100.0)
}

/// Bytes a directory tree takes on disk.
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        total += m.blocks() * 512;
        if m.is_dir() {
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Sets a snapshot's last use to now.
pub(crate) fn touch(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Marks an image as being started while it is alive, so a collection running
/// meanwhile keeps its snapshots.
pub(crate) struct Creating<'a> {
    rt: &'a Runtime,
    digest: String,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        let mut c = lock(&self.rt.creating);
        if let Some(n) = c.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.digest);
            }
        }
    }
}

impl Runtime {
    fn image_index(&self, manifest: &Digest) -> PathBuf {
        self.cfg
            .root
            .join("images")
            .join(manifest.algorithm().as_str())
            .join(manifest.hex())
    }

    /// Records which layers an image has (one digest per line), so collections
    /// know what a container uses without asking a registry.
    pub(crate) fn record_image(&self, manifest: &Digest, layers: &[Digest]) {
        let path = self.image_index(manifest);
        if path.exists() {
            return;
        }
        let text: String = layers.iter().map(|l| format!("{l}\n")).collect();
        let written = path
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| crate::durable::write(&path, text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(image = %manifest, "cannot record the image's layers: {e}");
        }
    }

    /// The layers of an image recorded here.
    fn layers_of(&self, manifest: &str) -> Option<Vec<Digest>> {
        let d: Digest = manifest.parse().ok()?;
        let text = fs::read_to_string(self.image_index(&d)).ok()?;
        text.lines().map(|l| l.parse().ok()).collect()
    }

    /// Marks `manifest` as being started until the guard drops.
    pub(crate) fn creating(&self, manifest: &Digest) -> Creating<'_> {
        let digest = manifest.to_string();
        *lock(&self.creating).entry(digest.clone()).or_default() += 1;
        Creating { rt: self, digest }
    }

    /// Sets the last use of an image's snapshots to now.
    pub(crate) fn touch_image(&self, manifest: &str) {
        for l in self.layers_of(manifest).unwrap_or_default() {
            touch(&self.snapshot_dir(&l));
        }
    }

    /// Removes the snapshots no container uses, as `opts` says. A container whose
    /// image's layers are not recorded (made by an older release) has them looked
    /// up once; if that fails, nothing is collected rather than a guess.
    pub async fn collect_snapshots(
        &self,
        opts: &SnapshotGcOptions,
    ) -> Result<SnapshotGcReport, RuntimeError> {
        let _guard = self.unpack_lock.lock().await;
        let mut images: Vec<(String, Option<String>)> = lock(&self.containers)
            .values()
            .map(|c| {
                let i = lock(&c.info);
                (i.image_digest.clone(), Some(i.spec.image.clone()))
            })
            .collect();
        images.extend(lock(&self.creating).keys().map(|d| (d.clone(), None)));
        images.extend(opts.keep_images.iter().map(|d| (d.to_string(), None)));
        let mut in_use: HashSet<String> = HashSet::new();
        for (digest, reference) in images {
            let layers = match (self.layers_of(&digest), reference) {
                (Some(l), _) => l,
                // A container of an older release: look its image up once.
                (None, Some(reference)) => match self.resolve(&reference).await {
                    Ok(img) => {
                        let layers: Vec<Digest> =
                            img.layers.iter().map(|l| l.digest.clone()).collect();
                        if img.digest.to_string() == digest {
                            self.record_image(&img.digest, &layers);
                        }
                        layers
                    }
                    Err(e) => {
                        return Err(RuntimeError::InvalidSpec(format!(
                            "snapshot collection skipped: the layers of {reference} (in use) cannot be told: {e}"
                        )));
                    }
                },
                // A kept image never unpacked here has nothing to keep.
                (None, None) => Vec::new(),
            };
            in_use.extend(layers.iter().map(|l| l.hex().to_owned()));
        }
        let root = self.cfg.root.clone();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || collect(&root, &in_use, &opts, SystemTime::now()))
            .await
            .map_err(|e| RuntimeError::Io("snapshot collection".into(), std::io::Error::other(e)))
    }
}

/// The blocking part: list, pick, remove.
fn collect(
    root: &Path,
    in_use: &HashSet<String>,
    opts: &SnapshotGcOptions,
    now: SystemTime,
) -> SnapshotGcReport {
    let mut report = SnapshotGcReport::default();
    let dir = root.join("snapshots/sha256");
    // Unused snapshots, oldest last use first.
    let mut unused: Vec<(SystemTime, String, PathBuf)> = Vec::new();
    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        if in_use.contains(&name) {
            report.in_use += 1;
            continue;
        }
        let used = e.metadata().and_then(|m| m.modified()).unwrap_or(now);
        unused.push((used, name, e.path()));
    }
    unused.sort();
    let used_percent = || disk_used_percent(root).unwrap_or(0.0);
    report.pressure = used_percent() >= f64::from(opts.high_percent);
    for (used, name, path) in unused {
        let idle = now.duration_since(used).unwrap_or_default();
        let expired = idle >= opts.grace;
        let pressed = report.pressure && used_percent() > f64::from(opts.low_percent);
        if !expired && !pressed {
            continue;
        }
        let size = du(&path);
        if !opts.dry_run {
            // Renamed away first, so a half-removed snapshot is never mistaken
            // for a whole one (the leftover sweep removes `tmp-*` at startup).
            let doomed = root.join("snapshots").join(format!("tmp-gc-{name}"));
            if let Err(e) = fs::rename(&path, &doomed).and_then(|()| fs::remove_dir_all(&doomed)) {
                tracing::warn!(layer = %name, "cannot remove an unused snapshot: {e}");
                continue;
            }
        }
        tracing::info!(layer = %name, bytes = size, idle = ?idle, pressure = pressed && !expired, dry_run = opts.dry_run, "removed an unused layer snapshot");
        report.bytes_freed += size;
        report.removed.push((format!("sha256:{name}"), size));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(root: &Path, hex: &str, bytes: usize, age: Duration) {
        let d = root.join("snapshots/sha256").join(hex);
        fs::create_dir_all(d.join("etc")).expect("mkdir");
        fs::write(d.join("etc/data"), vec![7u8; bytes]).expect("write");
        let f = fs::File::open(&d).expect("open");
        f.set_modified(SystemTime::now() - age).expect("mtime");
    }

    fn hex(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    #[test]
    fn unused_snapshots_go_after_their_grace_and_used_ones_stay() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        snapshot(root, &hex('a'), 10, Duration::from_secs(7200));
        snapshot(root, &hex('b'), 10, Duration::from_secs(60));
        snapshot(root, &hex('c'), 10, Duration::from_secs(7200));
        fs::create_dir_all(root.join("snapshots/sha256/not-a-digest")).expect("mkdir");
        let in_use: HashSet<String> = [hex('c')].into();
        let opts = SnapshotGcOptions {
            high_percent: 100,
            low_percent: 99,
            ..SnapshotGcOptions::default()
        };
        let dry = collect(
            root,
            &in_use,
            &SnapshotGcOptions {
                dry_run: true,
                ..opts.clone()
            },
            SystemTime::now(),
        );
        assert_eq!(dry.removed.len(), 1);
        assert!(root.join("snapshots/sha256").join(hex('a')).exists());
        let r = collect(root, &in_use, &opts, SystemTime::now());
        assert_eq!(
            r.removed.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            [format!("sha256:{}", hex('a'))],
            "only the unused one past its grace"
        );
        assert!(r.bytes_freed > 0);
        assert_eq!(r.in_use, 1);
        assert!(!root.join("snapshots/sha256").join(hex('a')).exists());
        assert!(root.join("snapshots/sha256").join(hex('b')).exists());
        assert!(root.join("snapshots/sha256").join(hex('c')).exists());
        assert!(root.join("snapshots/sha256/not-a-digest").exists());
    }

    /// A tmpfs of `mib` MiB mounted on a temp dir, unmounted on drop.
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn new(mib: u32) -> Self {
            let dir = tempfile::tempdir().expect("tmp");
            nix::mount::mount(
                Some("tmpfs"),
                dir.path(),
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={mib}m").as_str()),
            )
            .expect("mount a tmpfs (the tests run as root)");
            Self(dir)
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn past_the_high_water_mark_the_oldest_unused_snapshots_go_until_under_the_low_one() {
        let disk = SmallDisk::new(20);
        let root = disk.0.path();
        let mib = 1 << 20;
        // Four snapshots of 2 MiB, all within their grace period; `c` in use.
        snapshot(root, &hex('a'), 2 * mib, Duration::from_secs(400));
        snapshot(root, &hex('b'), 2 * mib, Duration::from_secs(300));
        snapshot(root, &hex('c'), 2 * mib, Duration::from_secs(500));
        snapshot(root, &hex('d'), 2 * mib, Duration::from_secs(100));
        let in_use: HashSet<String> = [hex('c')].into();
        let opts = SnapshotGcOptions::default();
        let r = collect(root, &in_use, &opts, SystemTime::now());
        assert!(!r.pressure, "8 of 20 MiB used");
        assert!(r.removed.is_empty(), "nothing is past its grace");
        // Fill the disk to 87.5%: past 85%.
        fs::write(root.join("filler"), vec![0u8; 19 * mib / 2]).expect("fill");
        let used = disk_used_percent(root).expect("statvfs");
        assert!((85.0..90.0).contains(&used), "{used}% used");
        let r = collect(root, &in_use, &opts, SystemTime::now());
        assert!(r.pressure);
        assert_eq!(
            r.removed.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            [format!("sha256:{}", hex('a'))],
            "the oldest unused one goes, and that is enough to be under 80%"
        );
        assert!(disk_used_percent(root).expect("statvfs") <= 80.0);
        for kept in ['b', 'c', 'd'] {
            assert!(
                root.join("snapshots/sha256").join(hex(kept)).exists(),
                "{kept}"
            );
        }
        // More filling: now everything unused goes, and the used one stays.
        fs::write(root.join("filler2"), vec![0u8; 3 * mib]).expect("fill");
        let r = collect(root, &in_use, &opts, SystemTime::now());
        assert_eq!(r.removed.len(), 2, "{r:?}");
        assert!(root.join("snapshots/sha256").join(hex('c')).exists());
    }
}
