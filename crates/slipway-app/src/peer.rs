//! Whether a loopback connection comes from a process inside a Slipway
//! container. Containers share the host's network, so while authentication is
//! off (no user yet, loopback listener) this is what keeps them off the API.
//!
//! The kernel says which cgroup v2 created the client's socket (sock_diag's
//! `INET_DIAG_CGROUP_ID`, as `ss --cgroup` shows it), and runc puts every
//! container in `/slipway/<id>` of the v2 hierarchy (the unified one on a
//! hybrid host): one netlink round trip and one directory listing, about
//! 0.1 ms with 200 containers. Without a v2 hierarchy the answer comes from the
//! container processes' descriptors instead (25 ms with 200 containers).

use std::net::SocketAddr;

/// `/proc/net/tcp` notation of an address: `0100007F:1F90`.
fn proc_addr(a: SocketAddr) -> Option<String> {
    match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(v6) => {
            let o = v6.ip().octets();
            let mut s = String::new();
            for w in o.chunks(4) {
                s.push_str(&format!(
                    "{:08X}",
                    u32::from_le_bytes([w[0], w[1], w[2], w[3]])
                ));
            }
            Some(format!("{s}:{:04X}", v6.port()))
        }
    }
}

/// The socket inode of the client end of the connection `peer` → `local`.
fn client_inode(local: SocketAddr, peer: SocketAddr) -> Option<String> {
    let (l, p) = (proc_addr(local)?, proc_addr(peer)?);
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&p.as_str()) && f.get(2) == Some(&l.as_str()))
            .then(|| f.get(9).map(|s| (*s).to_owned()))
            .flatten()
    })
}

/// The processes in Slipway containers: the members of every `/slipway/<id>`
/// cgroup, in whichever hierarchy exists (v1 controllers or v2).
fn container_pids() -> Vec<String> {
    let mut pids = Vec::new();
    for root in [
        "/sys/fs/cgroup/pids/slipway",
        "/sys/fs/cgroup/memory/slipway",
        "/sys/fs/cgroup/unified/slipway",
        "/sys/fs/cgroup/slipway",
    ] {
        let Ok(dirs) = std::fs::read_dir(root) else {
            continue;
        };
        for d in dirs.flatten() {
            if let Ok(text) = std::fs::read_to_string(d.path().join("cgroup.procs")) {
                pids.extend(text.split_whitespace().map(str::to_owned));
            }
        }
        // One hierarchy that has them is enough: every one lists the same processes.
        if !pids.is_empty() {
            break;
        }
    }
    pids.sort();
    pids.dedup();
    pids
}

/// A socket address's 16 bytes as `inet_diag_sockid` holds it (IPv4 in the
/// first four).
fn diag_addr(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut a = [0; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// The cgroup v2 id of the client's socket of the TCP connection `peer` →
/// `local`, asked of sock_diag; `None` when the kernel cannot tell.
fn socket_cgroup(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, sendto, socket,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const INET_DIAG_CGROUP_ID: u16 = 21;
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )
    .ok()?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(1)),
    )
    .ok()?;
    // nlmsghdr, then inet_diag_req_v2 naming the client's socket: its source is
    // the peer, its destination us.
    let mut msg = Vec::with_capacity(72);
    msg.extend_from_slice(&72u32.to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    msg.push(if peer.is_ipv4() { 2 } else { 10 }); // AF_INET / AF_INET6
    msg.push(6); // IPPROTO_TCP
    msg.extend_from_slice(&[0, 0]); // extensions, padding
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    msg.extend_from_slice(&peer.port().to_be_bytes());
    msg.extend_from_slice(&local.port().to_be_bytes());
    msg.extend_from_slice(&diag_addr(peer.ip()));
    msg.extend_from_slice(&diag_addr(local.ip()));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // interface
    msg.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    sendto(
        &fd,
        &msg,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )
    .ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = recv(&fd, &mut buf, RecvFlags::empty()).ok()?;
    let buf = buf.get(..n)?;
    let u16_at = |i: usize| Some(u16::from_ne_bytes(buf.get(i..i + 2)?.try_into().ok()?));
    if u16_at(4)? == NLMSG_ERROR || u16_at(4)? != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let len = usize::try_from(u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?)).ok()?;
    // Attributes follow the 16-byte header and the 72-byte inet_diag_msg.
    let mut at = 16 + 72;
    while at + 4 <= len.min(buf.len()) {
        let alen = usize::from(u16_at(at)?);
        if alen < 4 {
            return None;
        }
        if u16_at(at + 2)? == INET_DIAG_CGROUP_ID && alen >= 12 {
            return Some(u64::from_ne_bytes(
                buf.get(at + 4..at + 12)?.try_into().ok()?,
            ));
        }
        at += (alen + 3) & !3;
    }
    None
}

/// Where Slipway's containers are in the cgroup v2 hierarchy, if there is one.
fn v2_container_root() -> Option<&'static str> {
    ["/sys/fs/cgroup/unified/slipway", "/sys/fs/cgroup/slipway"]
        .into_iter()
        .find(|p| std::path::Path::new(p).join("cgroup.procs").exists())
}

/// The cgroup ids (directory inodes) of the containers under `root`.
fn container_cgroup_ids(root: &str) -> Vec<u64> {
    use std::os::unix::fs::DirEntryExt;
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.ino())
        .collect()
}

/// Whether the process holding the client end of `peer` → `local` runs in a
/// Slipway container (or did when it made the socket).
pub(crate) fn from_container(local: SocketAddr, peer: SocketAddr) -> bool {
    if let Some(root) = v2_container_root()
        && let Some(id) = socket_cgroup(local, peer)
    {
        return container_cgroup_ids(root).contains(&id);
    }
    from_container_by_descriptors(local, peer)
}

/// [`from_container`] without cgroup v2: whether a container process holds the
/// client's socket. Only container processes are looked at, so with no
/// container running this reads nothing but the cgroup directories.
fn from_container_by_descriptors(local: SocketAddr, peer: SocketAddr) -> bool {
    let pids = container_pids();
    if pids.is_empty() {
        return false;
    }
    let Some(inode) = client_inode(local, peer) else {
        return false;
    };
    let want = format!("socket:[{inode}]");
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_render_as_the_kernel_writes_them() {
        let a: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert_eq!(proc_addr(a).as_deref(), Some("0100007F:1F90"));
    }

    #[test]
    fn a_connection_from_this_process_is_not_from_a_container() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_s, peer) = l.accept().expect("accept");
        assert!(client_inode(l.local_addr().expect("addr"), peer).is_some());
        assert!(!from_container(l.local_addr().expect("addr"), peer));
        assert!(!from_container_by_descriptors(
            l.local_addr().expect("addr"),
            peer
        ));
        drop(c);
    }

    #[test]
    fn the_kernel_names_the_cgroup_of_a_connections_client() {
        // This process's cgroup v2 directory: its inode is the cgroup's id.
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return; // no cgroup v2 hierarchy: the descriptor path is used
        };
        let dir = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(|r| format!("{r}{path}"))
            .find(|d| std::path::Path::new(d).join("cgroup.procs").exists())
            .expect("the v2 hierarchy is mounted");
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).expect("stat"));
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_s, peer) = l.accept().expect("accept");
        assert_eq!(
            socket_cgroup(l.local_addr().expect("addr"), peer),
            Some(ino),
            "the client socket was made in {dir}"
        );
        // A connection that does not exist has no answer.
        let gone: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(socket_cgroup(l.local_addr().expect("addr"), gone), None);
        drop(c);
    }
}
