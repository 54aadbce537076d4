//! Machines for multi-node tests, made of network namespaces: each member (a
//! node, a control plane, etcd, the load generator) is a namespace with one
//! veth link to a bridge that itself lives in a namespace of its own, with an
//! address from a private subnet that exists only inside them. Nothing is added
//! to the host's interfaces or routes. Processes run in a member through
//! `nsenter --net` (only the network namespace changes, so cgroups and mounts are
//! the host's, as on a real machine); the test's own thread can enter a member
//! to be a client there. Everything is removed on drop, also after a failed
//! test: processes left in a member are killed, then the namespaces deleted.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};

/// A bridge and its members.
pub struct Topology {
    prefix: String,
    subnet: [u8; 3],
    members: Vec<String>,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Topology {
    /// A bridge with `members` (short names) on it, numbered from .10 on; `None`
    /// when namespaces cannot be made here.
    pub fn new(members: &[&str]) -> Option<Self> {
        let pid = std::process::id();
        // A subnet of 10.0.0.0/8 per test process, so parallel tests never meet.
        let subnet = [
            10,
            u8::try_from(200 + pid % 50).unwrap_or(200),
            u8::try_from((pid / 50) % 250).unwrap_or(0),
        ];
        let mut t = Self {
            prefix: format!("sw{}", pid % 100_000),
            subnet,
            members: Vec::new(),
        };
        let br = t.ns("br");
        if !ip(&["netns", "add", &br])
            || !ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])
            || !ip(&["-n", &br, "link", "set", "br0", "up"])
        {
            let _ = ip(&["netns", "del", &br]);
            return None;
        }
        for (i, m) in members.iter().enumerate() {
            let ns = t.ns(m);
            let host = u8::try_from(10 + i).unwrap_or(250);
            let addr = format!("{}/24", t.addr_n(host));
            let veth = format!("v{}", i);
            let ok = ip(&["netns", "add", &ns])
                && ip(&[
                    "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])
                && ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"])
                && ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])
                && ip(&["-n", &ns, "link", "set", "eth0", "up"])
                && ip(&["-n", &ns, "link", "set", "lo", "up"]);
            t.members.push((*m).to_owned());
            if !ok {
                return None;
            }
        }
        Some(t)
    }

    fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.prefix)
    }

    fn addr_n(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host)
    }

    fn index(&self, member: &str) -> usize {
        self.members
            .iter()
            .position(|m| m == member)
            .unwrap_or_else(|| panic!("no member {member}"))
    }

    /// A member's address.
    pub fn addr(&self, member: &str) -> IpAddr {
        IpAddr::V4(self.addr_n(u8::try_from(10 + self.index(member)).unwrap_or(250)))
    }

    /// `Command` for `program` inside `member`.
    pub fn command(&self, member: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path(member)))
            .arg("--")
            .arg(program);
        c
    }

    /// The namespace file of `member`.
    pub fn path(&self, member: &str) -> String {
        format!("/var/run/netns/{}", self.ns(member))
    }

    /// Moves the calling thread into `member` (its sockets and the processes it
    /// starts are then there).
    pub fn enter(&self, member: &str) {
        enter_path(&self.path(member));
    }

    /// Takes `member`'s link to the bridge down (`false`) or up (`true`).
    pub fn link(&self, member: &str, up: bool) {
        let veth = format!("v{}", self.index(member));
        assert!(
            ip(&[
                "-n",
                &self.ns("br"),
                "link",
                "set",
                &veth,
                if up { "up" } else { "down" }
            ]),
            "link {member}"
        );
    }

    /// The pids of every process in `member`.
    pub fn pids(&self, member: &str) -> Vec<i32> {
        let Ok(target) = std::fs::metadata(format!("/var/run/netns/{}", self.ns(member))) else {
            return Vec::new();
        };
        let ino = std::os::unix::fs::MetadataExt::ino(&target);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let same = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino);
            if same {
                out.push(pid);
            }
        }
        out
    }

    /// SIGKILLs every process in `member` (a machine that died), but this one.
    pub fn kill_all(&self, member: &str) {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        for pid in self.pids(member).into_iter().filter(|p| *p != me) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for m in self.members.clone() {
            self.kill_all(&m);
        }
        for m in self.members.clone() {
            let _ = ip(&["netns", "del", &self.ns(&m)]);
        }
        let _ = ip(&["netns", "del", &self.ns("br")]);
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_path(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open netns {path}: {e}"));
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// A process started in a member, SIGKILLed (by PID) on drop unless it exited.
pub struct Proc(pub Child);

impl Proc {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(cmd: &mut Command, log: &std::path::Path) -> Self {
        let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("log: {e}"));
        Self(
            cmd.stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then wait for it to exit.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}
