//! Container root filesystems: an overlay of shared layer snapshots, or a private
//! copy where overlayfs is unavailable.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// How a rootfs was made, persisted so cleanup knows what to undo.
pub use slipway_api::containers::RootfsKind;

/// Where the runtime always mounts something (see the bundle's mounts).
const MOUNTPOINTS: [&str; 4] = ["proc", "dev", "sys", "tmp"];

/// Creates the standard mount points the image lacks in the (still empty) upper
/// dir, as docker's init layer does. Otherwise runc creates them through the
/// fresh overlay, in the start's critical path, which costs a few milliseconds of
/// every start. A name any layer has (even as a whiteout or a file) is left alone.
fn premake_mountpoints(lowers: &[PathBuf], upper: &Path) -> io::Result<()> {
    for name in MOUNTPOINTS {
        if lowers
            .iter()
            .any(|l| l.join(name).symlink_metadata().is_ok())
        {
            continue;
        }
        match fs::create_dir(upper.join(name)) {
            Ok(()) => fs::set_permissions(upper.join(name), fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Mounts `lowers` (top layer first) with a private upper and work dir at `target`.
/// Falls back to copying when the overlay cannot be mounted.
pub fn prepare(
    lowers_top_first: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> io::Result<RootfsKind> {
    fs::create_dir_all(target)?;
    if lowers_top_first.is_empty() {
        // An image without layers: an empty rootfs.
        return Ok(RootfsKind::Copy);
    }
    fs::create_dir_all(upper)?;
    fs::create_dir_all(work)?;
    premake_mountpoints(lowers_top_first, upper)?;
    let lower = lowers_top_first
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    // The kernel caps mount data at one page; deep images fall back to a copy.
    if data.len() < 4000 {
        match nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        ) {
            Ok(()) => return Ok(RootfsKind::Overlay),
            Err(e) => tracing::warn!("overlay mount failed ({e}); copying the image instead"),
        }
    }
    let mut bottom_first: Vec<&PathBuf> = lowers_top_first.iter().collect();
    bottom_first.reverse();
    for l in bottom_first {
        merge_layer(l, target)?;
    }
    Ok(RootfsKind::Copy)
}

/// A private copy of the layers at `target` whose owners are shifted by `shift`,
/// for a container in a user namespace that maps its root to host uid `shift`
/// (runc 1.1 has no idmapped mounts, so shared snapshots cannot be shifted).
pub fn prepare_shifted(
    lowers_top_first: &[PathBuf],
    target: &Path,
    shift: u32,
) -> io::Result<RootfsKind> {
    fs::create_dir_all(target)?;
    for l in lowers_top_first.iter().rev() {
        merge_layer(l, target)?;
    }
    for name in MOUNTPOINTS {
        if fs::symlink_metadata(target.join(name)).is_err() {
            fs::create_dir(target.join(name))?;
            fs::set_permissions(target.join(name), fs::Permissions::from_mode(0o755))?;
        }
    }
    shift_owners(target, shift)?;
    Ok(RootfsKind::Copy)
}

/// Adds `shift` to the owner and group of everything under `p` (keeping
/// set-id bits, which chown clears).
fn shift_owners(p: &Path, shift: u32) -> io::Result<()> {
    let md = fs::symlink_metadata(p)?;
    std::os::unix::fs::lchown(
        p,
        Some(md.uid().saturating_add(shift)),
        Some(md.gid().saturating_add(shift)),
    )?;
    if !md.file_type().is_symlink() && md.mode() & 0o6000 != 0 {
        fs::set_permissions(p, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    if md.is_dir() {
        for e in fs::read_dir(p)? {
            shift_owners(&e?.path(), shift)?;
        }
    }
    Ok(())
}

/// Undoes [`prepare`]: unmounts an overlay. A missing mount is not an error.
pub fn release(target: &Path, kind: RootfsKind) -> io::Result<()> {
    if kind == RootfsKind::Overlay && is_mounted(target) {
        nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    Ok(())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

/// Applies one overlay-format snapshot onto `target` by copying: whiteouts delete,
/// opaque directories replace.
fn merge_layer(src: &Path, target: &Path) -> io::Result<()> {
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = target.join(entry.file_name());
        let meta = fs::symlink_metadata(&from)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            remove_any(&to)?;
            continue;
        }
        if ft.is_dir() {
            let opaque = xattr::get(&from, "trusted.overlay.opaque")
                .ok()
                .flatten()
                .is_some_and(|v| v == b"y");
            if opaque || fs::symlink_metadata(&to).is_ok_and(|m| !m.is_dir()) {
                remove_any(&to)?;
            }
            if fs::symlink_metadata(&to).is_err() {
                fs::create_dir(&to)?;
            }
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            merge_layer(&from, &to)?;
        } else {
            remove_any(&to)?;
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            } else if ft.is_file() {
                fs::copy(&from, &to)?;
            } else {
                continue; // fifos and sockets are not carried into a copy
            }
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))?;
            if !ft.is_symlink() {
                fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mountpoints_no_layer_has_are_premade_in_the_upper_dir() {
        let t = tempfile::tempdir().expect("tempdir");
        let (top, bottom, upper) = (
            t.path().join("top"),
            t.path().join("bottom"),
            t.path().join("upper"),
        );
        for d in [&top, &bottom, &upper] {
            fs::create_dir(d).expect("mkdir");
        }
        fs::create_dir(bottom.join("proc")).expect("proc");
        // An image whose /tmp is a symlink keeps it: nothing may shadow it.
        std::os::unix::fs::symlink("/var/tmp", top.join("tmp")).expect("symlink");
        premake_mountpoints(&[top, bottom], &upper).expect("premake");
        let mut made: Vec<String> = fs::read_dir(&upper)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        made.sort();
        assert_eq!(made, ["dev", "sys"]);
        let mode = fs::metadata(upper.join("dev"))
            .expect("dev")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
}
