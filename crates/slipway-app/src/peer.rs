//! Whether a loopback connection comes from a process inside a Slipway
//! container. Containers share the host's network, so while authentication is
//! off (no user yet, loopback listener) this is what keeps them off the API.

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

/// Whether the process holding the client end of `peer` → `local` runs in a
/// Slipway container. Only container processes are looked at, so with no
/// container running this reads nothing but the cgroup directories.
pub(crate) fn from_container(local: SocketAddr, peer: SocketAddr) -> bool {
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
        drop(c);
    }
}
