//! What a container may do to the kernel: Docker's default capability set with
//! `cap_add`/`cap_drop`, and a seccomp allow-list equivalent to Docker's default
//! profile (written here), widened for the capabilities a container was given.

use std::collections::HashSet;
use std::str::FromStr as _;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use crate::RuntimeError;

/// Docker's default set: what images are written for.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SYS_CHROOT",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
];

fn parse_cap(field: &str, name: &str) -> Result<Capability, RuntimeError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| {
        RuntimeError::InvalidSpec(format!(
            "{field}: unknown capability {name:?} (for example NET_ADMIN or SYS_PTRACE)"
        ))
    })
}

/// The capability set: the defaults, minus `drop` (`ALL` drops every one),
/// plus `add` (`ALL` adds every one).
pub fn capabilities(add: &[String], drop: &[String]) -> Result<HashSet<Capability>, RuntimeError> {
    let mut set: HashSet<Capability> = DEFAULT_CAPS
        .iter()
        .map(|c| parse_cap("cap_add", c))
        .collect::<Result<_, _>>()?;
    for d in drop {
        if d.eq_ignore_ascii_case("all") {
            set.clear();
        } else {
            set.remove(&parse_cap("cap_drop", d)?);
        }
    }
    for a in add {
        if a.eq_ignore_ascii_case("all") {
            for c in ALL_CAPS {
                set.insert(parse_cap("cap_add", c)?);
            }
        } else {
            set.insert(parse_cap("cap_add", a)?);
        }
    }
    Ok(set)
}

const ALL_CAPS: [&str; 41] = [
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETGID",
    "SETFCAP",
    "SETPCAP",
    "SETUID",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "SYSLOG",
    "WAKE_ALARM",
];

/// Allowed for every container (Docker's default profile's unconditional list).
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Further syscalls a capability opens, as Docker's profile does.
const BY_CAP: &[(&str, &[&str])] = &[
    (
        "SYS_ADMIN",
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("SYS_BOOT", &["reboot"]),
    ("SYS_CHROOT", &["chroot"]),
    (
        "SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("SYS_PACCT", &["acct"]),
    (
        "SYS_PTRACE",
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    ("SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("SYS_TTY_CONFIG", &["vhangup"]),
    (
        "SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("SYSLOG", &["syslog"]),
    ("BPF", &["bpf"]),
    ("PERFMON", &["perf_event_open"]),
];

/// Namespace flags of clone(2) that need CAP_SYS_ADMIN.
const CLONE_NEW_FLAGS: u64 = 0x7E02_0000;

fn rule(names: &[&str], action: LinuxSeccompAction) -> Result<LinuxSyscall, RuntimeError> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .action(action)
        .build()
        .map_err(|e| RuntimeError::Bundle(e.to_string()))
}

fn bundle_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Bundle(e.to_string())
}

/// The seccomp profile for a container holding `caps`: everything not allowed
/// fails with EPERM.
pub fn seccomp(caps: &HashSet<Capability>) -> Result<LinuxSeccomp, RuntimeError> {
    let has = |c: &str| parse_cap("cap_add", c).is_ok_and(|c| caps.contains(&c));
    let mut rules = vec![rule(ALLOWED, LinuxSeccompAction::ScmpActAllow)?];
    for (cap, names) in BY_CAP {
        if has(cap) {
            rules.push(rule(names, LinuxSeccompAction::ScmpActAllow)?);
        }
    }
    // personality(2): only the harmless personas, as Docker.
    for persona in [0x0u64, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(persona)
            .op(LinuxSeccompOperator::ScmpCmpEq)
            .build()
            .map_err(bundle_err)?;
        let mut r = rule(&["personality"], LinuxSeccompAction::ScmpActAllow)?;
        r.set_args(Some(vec![arg]));
        rules.push(r);
    }
    if has("SYS_ADMIN") {
        rules.push(rule(
            &["clone", "clone3"],
            LinuxSeccompAction::ScmpActAllow,
        )?);
    } else {
        // clone without namespace flags; clone3 cannot be filtered by argument,
        // so it answers ENOSYS and libc falls back to clone.
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(CLONE_NEW_FLAGS)
            .value_two(0u64)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .map_err(bundle_err)?;
        let mut r = rule(&["clone"], LinuxSeccompAction::ScmpActAllow)?;
        r.set_args(Some(vec![arg]));
        rules.push(r);
        let mut r = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno)?;
        r.set_errno_ret(Some(38));
        rules.push(r);
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(1u32)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(rules)
        .build()
        .map_err(bundle_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers_and_add_and_drop_adjust_it() {
        let d = capabilities(&[], &[]).expect("default");
        assert_eq!(d.len(), 14);
        assert!(d.contains(&Capability::Chown) && d.contains(&Capability::Setuid));
        assert!(!d.contains(&Capability::SysAdmin));
        let c = capabilities(&["net_admin".into()], &["CAP_NET_RAW".into()]).expect("adjusted");
        assert!(c.contains(&Capability::NetAdmin) && !c.contains(&Capability::NetRaw));
        let none = capabilities(&["KILL".into()], &["ALL".into()]).expect("drop all");
        assert_eq!(none.len(), 1);
        let e = capabilities(&["CAP_FLY".into()], &[]).expect_err("unknown");
        assert!(
            e.to_string().starts_with("cap_add: unknown capability"),
            "{e}"
        );
    }

    #[test]
    fn seccomp_denies_by_default_and_widens_only_for_granted_capabilities() {
        let p = seccomp(&capabilities(&[], &[]).expect("caps")).expect("profile");
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(1));
        let names: Vec<String> = p
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|r| r.names().clone())
            .collect();
        for denied in [
            "add_key",
            "keyctl",
            "mount",
            "unshare",
            "ptrace",
            "bpf",
            "kexec_load",
        ] {
            assert!(!names.iter().any(|n| n == denied), "{denied} is allowed");
        }
        assert!(
            names.iter().any(|n| n == "chroot"),
            "SYS_CHROOT is a default capability"
        );
        let admin =
            seccomp(&capabilities(&["SYS_ADMIN".into()], &[]).expect("caps")).expect("profile");
        assert!(
            admin
                .syscalls()
                .iter()
                .flatten()
                .any(|r| r.names().iter().any(|n| n == "mount"))
        );
    }
}
