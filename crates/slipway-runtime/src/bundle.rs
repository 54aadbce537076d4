//! Generating the OCI runtime bundle's `config.json` with the oci-spec crate.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::RuntimeError;

/// Everything the bundle needs, already validated.
#[derive(Debug, Clone)]
pub struct BundleConfig {
    /// argv.
    pub args: Vec<String>,
    /// `K=V` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// uid and gid.
    pub user: (u32, u32),
    /// Hostname.
    pub hostname: String,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// CPUs (fractional), as a CFS quota over a 100 ms period.
    pub cpus: Option<f64>,
    /// Max processes.
    pub pids: Option<i64>,
    /// Read-only root filesystem.
    pub read_only: bool,
    /// Bind mounts: (host dir, container path).
    pub binds: Vec<(PathBuf, String)>,
    /// Read-only bind mounts of single files (secrets): (host file, container path).
    pub ro_files: Vec<(PathBuf, String)>,
    /// cgroup path, e.g. `/slipway/<id>`.
    pub cgroup: String,
    /// Soft and hard RLIMIT_NOFILE (must stay within the host's hard limit).
    pub nofile: u64,
    /// A user namespace mapping container ids 0..USERNS_SIZE to host ids from this.
    pub userns: Option<u32>,
    /// The capability set (see [`crate::security`]).
    pub capabilities: std::collections::HashSet<oci_spec::runtime::Capability>,
}

fn spec_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Bundle(e.to_string())
}

/// Container ids a user namespace maps (0..65535).
pub const USERNS_SIZE: u32 = 65_536;

/// CFS period used for `cpus`.
const CPU_PERIOD: u64 = 100_000;

/// Builds the runtime spec.
pub fn build_spec(c: &BundleConfig) -> Result<Spec, RuntimeError> {
    let mut spec = Spec::default();
    let user = UserBuilder::default()
        .uid(c.user.0)
        .gid(c.user.1)
        .build()
        .map_err(spec_err)?;
    let rlimits = vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(c.nofile)
            .soft(c.nofile)
            .build()
            .map_err(spec_err)?,
    ];
    let mut process = ProcessBuilder::default()
        .args(c.args.clone())
        .env(c.env.clone())
        .cwd(c.cwd.clone())
        .user(user)
        .rlimits(rlimits)
        .no_new_privileges(true)
        .build()
        .map_err(spec_err)?;
    // Root in the container holds these and nothing else; no ambient or
    // inheritable set, so a non-root process gets none of them.
    process.set_capabilities(Some(
        oci_spec::runtime::LinuxCapabilitiesBuilder::default()
            .bounding(c.capabilities.clone())
            .effective(c.capabilities.clone())
            .permitted(c.capabilities.clone())
            .inheritable(std::collections::HashSet::new())
            .ambient(std::collections::HashSet::new())
            .build()
            .map_err(spec_err)?,
    ));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(c.read_only)
            .build()
            .map_err(spec_err)?,
    ));
    spec.set_hostname(Some(c.hostname.clone()));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(
        MountBuilder::default()
            .destination("/tmp")
            .typ("tmpfs")
            .source("tmpfs")
            .options(vec!["nosuid".into(), "nodev".into(), "mode=1777".into()])
            .build()
            .map_err(spec_err)?,
    );
    for (host, dest) in &c.binds {
        mounts.push(
            MountBuilder::default()
                .destination(dest.clone())
                .typ("bind")
                .source(host.clone())
                .options(vec!["rbind".into(), "rw".into()])
                .build()
                .map_err(spec_err)?,
        );
    }
    for (host, dest) in &c.ro_files {
        mounts.push(
            MountBuilder::default()
                .destination(dest.clone())
                .typ("bind")
                .source(host.clone())
                .options(vec![
                    "bind".into(),
                    "ro".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    "noexec".into(),
                ])
                .build()
                .map_err(spec_err)?,
        );
    }
    spec.set_mounts(Some(mounts));

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(m) = c.memory {
        // Swap equal to the limit: no swapping beyond it, so the OOM killer acts.
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(m)
                .swap(m)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(cpus) = c.cpus {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "validated to a small positive range"
        )]
        let quota = (cpus * CPU_PERIOD as f64) as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD)
                .build()
                .map_err(spec_err)?,
        );
    }
    if let Some(p) = c.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(p)
                .build()
                .map_err(spec_err)?,
        );
    }
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
    ];
    if c.userns.is_some() {
        kinds.push(LinuxNamespaceType::User);
        // sysfs cannot be mounted in a user namespace that does not own the
        // network namespace (the host's, here): bind the host's, read-only,
        // as runc's rootless spec does.
        let mounts: Vec<_> = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.typ().as_deref() != Some("cgroup"))
            .map(|m| {
                if m.typ().as_deref() == Some("sysfs") {
                    MountBuilder::default()
                        .destination("/sys")
                        .typ("none")
                        .source("/sys")
                        .options(vec![
                            "rbind".into(),
                            "nosuid".into(),
                            "noexec".into(),
                            "nodev".into(),
                            "ro".into(),
                        ])
                        .build()
                        .unwrap_or(m)
                } else {
                    m
                }
            })
            .collect();
        spec.set_mounts(Some(mounts));
    }
    let namespaces = kinds
        .into_iter()
        .map(|t| {
            LinuxNamespaceBuilder::default()
                .typ(t)
                .build()
                .map_err(spec_err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let defaults = spec.linux().clone().unwrap_or_default();
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.devices(vec![]).build().map_err(spec_err)?)
        .cgroups_path(PathBuf::from(&c.cgroup))
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .seccomp(crate::security::seccomp(&c.capabilities)?)
        .build()
        .map_err(spec_err)?;
    let mut linux = linux;
    if let Some(base) = c.userns {
        let map = oci_spec::runtime::LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(base)
            .size(USERNS_SIZE)
            .build()
            .map_err(spec_err)?;
        linux.set_uid_mappings(Some(vec![map]));
        linux.set_gid_mappings(Some(vec![map]));
    }
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Writes `config.json` into `bundle`. With `private_dir` (a tmpfs directory of
/// the container's secrets), the file is written there, mode 0600, and the
/// bundle gets a symlink to it: environment secrets never reach the data disk.
pub fn write(
    bundle: &Path,
    c: &BundleConfig,
    private_dir: Option<&Path>,
) -> Result<(), RuntimeError> {
    let spec = build_spec(c)?;
    let json = serde_json::to_vec_pretty(&spec).map_err(spec_err)?;
    let io = |e| RuntimeError::Io("write config.json".into(), e);
    match private_dir {
        None => std::fs::write(bundle.join("config.json"), json).map_err(io),
        Some(dir) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let target = dir.join("config.json");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&target)
                .map_err(io)?;
            f.write_all(&json).map_err(io)?;
            let link = bundle.join("config.json");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io)
        }
    }
}

/// Resolves the image's `User` against the rootfs' /etc/passwd and /etc/group.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), RuntimeError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                Some((
                    f.get(2)?.parse().ok()?,
                    f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
                ))
            })?
        })
    };
    let (uid, default_gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup("etc/passwd", u).map_or(0, |(_, g)| g)),
        Err(_) => lookup("etc/passwd", u).ok_or_else(|| {
            RuntimeError::InvalidSpec(format!(
                "user: {u:?} is not in the image's /etc/passwd; use a numeric uid"
            ))
        })?,
    };
    let gid = match g {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g).map(|(gid, _)| gid).ok_or_else(|| {
                RuntimeError::InvalidSpec(format!(
                    "user: group {g:?} is not in the image's /etc/group"
                ))
            })?,
        },
    };
    Ok((uid, gid))
}
