//! Several machines, made of network namespaces on one bridge (see
//! `slipway_testkit::netns`): etcd, two control planes (`slipway serve --state
//! etcd://… --no-instances`), three nodes each running `slipway agent`, and a
//! load generator, each in a namespace of its own with an address from a subnet
//! that exists only inside them. Every scenario runs under continuous GETs
//! through both control planes' ingresses and counts the failed ones.

#![expect(clippy::unwrap_used, reason = "test setup")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use slipway_testkit::netns::{Proc, Topology};
use slipway_testkit::{poll, request};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");
const TOKEN: &str = "cluster-test-join-token-0123456789";
const API: u16 = 5000;
const INGRESS: u16 = 8080;
const AGENT: u16 = 7480;

/// The machines and what runs on them. Fields drop in order: processes first,
/// then the namespaces.
struct Cluster {
    procs: Vec<(String, Proc)>,
    agents: Vec<String>,
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Cluster {
    fn start() -> Self {
        let topo = Topology::new(&["etcd", "cp1", "cp2", "n1", "n2", "n3", "lg"])
            .expect("network namespaces can be made (iproute2, root)");
        // The test's own thread is the load generator's machine.
        topo.enter("lg");
        let mut c = Self {
            procs: Vec::new(),
            agents: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            topo,
        };
        c.start_etcd();
        c.start_cp("cp1");
        c.wait_api("cp1");
        c.start_cp("cp2");
        c.wait_api("cp2");
        for n in ["n1", "n2", "n3"] {
            c.start_agent(n);
        }
        poll(Duration::from_secs(20), || {
            let nodes = c.api("cp1", "GET", "/api/v1/nodes", "").json();
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|n| n["status"] == "ready")
                .count();
            (ready == 3).then_some(())
        })
        .expect("three agents joined and are ready");
        c
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn start_etcd(&mut self) {
        let ip = self.topo.addr("etcd");
        let data = self.dir.path().join("etcd");
        let mut cmd = self.topo.command("etcd", "etcd");
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls=http://{ip}:2379"))
            .arg(format!("--advertise-client-urls=http://{ip}:2379"))
            .arg("--listen-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:2380")
            .arg("--initial-cluster=test=http://127.0.0.1:2380")
            .arg("--log-level=error");
        let p = Proc::spawn(&mut cmd, &self.log("etcd"));
        self.procs.push(("etcd".into(), p));
        let addr = SocketAddr::new(ip, 2379);
        poll(Duration::from_secs(20), || {
            get(addr, "/health").filter(|(s, _)| *s == 200)
        })
        .expect("etcd is healthy");
    }

    fn start_cp(&mut self, name: &str) {
        let ip = self.topo.addr(name);
        let etcd = self.topo.addr("etcd");
        let mut cmd = self.topo.command(name, BIN);
        cmd.args(["serve", "--insecure-no-auth", "--no-instances"])
            .arg("--listen")
            .arg(format!("{ip}:{API}"))
            .arg("--data")
            .arg(self.dir.path().join(name))
            .arg("--state")
            .arg(format!("etcd://{etcd}:2379"))
            .arg("--join-token")
            .arg(TOKEN)
            .arg("--node-name")
            .arg(name)
            .env("SLIPWAY_LOG", "info");
        let p = Proc::spawn(&mut cmd, &self.log(name));
        self.procs.push((name.into(), p));
    }

    fn start_agent(&mut self, name: &str) {
        let ip = self.topo.addr(name);
        let join = format!(
            "http://{}:{API},http://{}:{API}",
            self.topo.addr("cp1"),
            self.topo.addr("cp2")
        );
        let mut cmd = self.topo.command(name, BIN);
        cmd.args(["agent", "--join", &join, "--token", TOKEN, "--name", name])
            .arg("--advertise")
            .arg(ip.to_string())
            .arg("--data")
            .arg(self.data(name))
            .arg("--listen")
            .arg(format!("0.0.0.0:{AGENT}"))
            .env("SLIPWAY_LOG", "info");
        let log = self.log(&format!("{name}-{}", self.procs.len()));
        let p = Proc::spawn(&mut cmd, &log);
        self.procs.push((name.into(), p));
        if !self.agents.iter().any(|a| a == name) {
            self.agents.push(name.into());
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn proc(&mut self, name: &str) -> &mut Proc {
        &mut self
            .procs
            .iter_mut()
            .rev()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    }

    fn url(&self, cp: &str) -> String {
        format!("http://{}:{API}", self.topo.addr(cp))
    }

    fn wait_api(&self, cp: &str) {
        let addr = SocketAddr::new(self.topo.addr(cp), API);
        poll(Duration::from_secs(30), || {
            get(addr, "/api/v1/nodes").filter(|(s, _)| *s == 200)
        })
        .unwrap_or_else(|| panic!("{cp} answers; log: {}", self.tail(cp)));
    }

    fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("this control plane is a standby"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn api(&self, cp: &str, method: &str, path: &str, body: &str) -> slipway_testkit::Response {
        request(
            SocketAddr::new(self.topo.addr(cp), API),
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    fn cli(&self, cp: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .arg("--server")
            .arg(self.url(cp))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Packs hello as `tag` (reporting `version`) into both control planes'
    /// registries.
    fn pack(&self, tag: &str, version: &str) {
        let env = format!("HELLO_VERSION={version}");
        let input = format!("{}:/hello", slipway_testkit::hello_bin().display());
        for cp in ["cp1", "cp2"] {
            let (code, _, err) = self.cli(
                cp,
                &[
                    "image",
                    "pack",
                    "-q",
                    "--tag",
                    tag,
                    "--entrypoint",
                    "/hello",
                    "--env",
                    &env,
                    &input,
                ],
            );
            assert_eq!(code, 0, "pack into {cp}: {err}");
        }
    }

    /// Which control plane leads (the other answers services with 503).
    fn leader(&self) -> &'static str {
        poll(Duration::from_secs(20), || {
            ["cp1", "cp2"]
                .into_iter()
                .find(|cp| self.api(cp, "GET", "/api/v1/services", "").status == 200)
        })
        .expect("one control plane leads")
    }

    fn status(&self, cp: &str) -> serde_json::Value {
        self.api(cp, "GET", "/api/v1/services/web", "").json()
    }

    fn deploy(&self, cp: &str, spec: &str, detach: bool) {
        let file = self.dir.path().join("web.toml");
        std::fs::write(&file, spec).unwrap();
        let path = file.display().to_string();
        let mut args = vec!["deploy"];
        if detach {
            args.push("--detach");
        }
        args.push(&path);
        let (code, out, err) = self.cli(cp, &args);
        assert_eq!(code, 0, "deploy: {out}{err}\n{}", self.tail(cp));
    }

    /// The instances of the active revision per node, once it has `replicas`
    /// of them, all ready and idle.
    fn settled(&self, cp: &str, replicas: usize) -> Option<Vec<String>> {
        let st = self.status(cp);
        let insts = st["instances"].as_array()?;
        let active = st["active"].clone();
        (st["phase"] == "idle"
            && insts.len() == replicas
            && insts.iter().all(|i| i["revision"] == active))
        .then(|| {
            insts
                .iter()
                .map(|i| {
                    i["id"]
                        .as_str()
                        .and_then(|id| id.rsplit_once('@'))
                        .map(|(_, n)| n.to_owned())
                        .unwrap_or_default()
                })
                .collect()
        })
    }

    /// What an agent runs, as its API lists it; `None` if it cannot be reached.
    fn on_agent(&self, node: &str) -> Option<usize> {
        let auth = format!("Authorization: Bearer {TOKEN}\r\n");
        let addr = SocketAddr::new(self.topo.addr(node), AGENT);
        let (_, body) = try_get(addr, "/agent/v1/instances", &auth).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["Ok"].as_array().map(Vec::len)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Control planes first, so nothing restarts what the sweep removes.
        for (_, p) in &mut self.procs {
            p.kill();
        }
        for a in self.agents.clone() {
            sweep(&self.data(&a));
        }
    }
}

/// Removes what a killed agent's containers left: runc's state and cgroups,
/// then every mount under its data directory.
fn sweep(data: &Path) {
    let root = data.join("runtime/runc");
    if let Ok(out) = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", id.trim()])
                .output();
        }
    }
    let prefix = data.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = Command::new("umount").args(["-l", m]).output();
    }
}

/// One GET on a fresh connection: (status, body), or what went wrong.
fn try_get(addr: SocketAddr, path: &str, headers: &str) -> Result<(u16, String), String> {
    let started = Instant::now();
    let fail = |what: &str, e: std::io::Error| format!("{what} after {:?}: {e}", started.elapsed());
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| fail("connect", e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail("socket", e))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .map_err(|e| fail("write", e))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| fail("read", e))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    try_get(addr, path, "").ok()
}

/// GETs through every ingress in turn, from the load generator's machine, on
/// four connections at a time, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(topo: &Topology, targets: Vec<SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|k| {
                let flag = stop.clone();
                let ns = topo.path("lg");
                let targets = targets.clone();
                std::thread::spawn(move || {
                    slipway_testkit::netns::enter_path(&ns);
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    let mut i = k;
                    while !flag.load(Ordering::Relaxed) {
                        let addr = targets[i % targets.len()];
                        i += 1;
                        match try_get(addr, "/", "") {
                            Ok((200, _)) => ok += 1,
                            other => failed.push(format!("{addr}: {other:?}")),
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops; asserts that no GET failed and that GETs were made.
    fn finish(mut self, what: &str) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0u64, Vec::new());
        for t in self.threads.drain(..) {
            let (o, f) = t.join().unwrap();
            ok += o;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{what}: {} of {} GETs failed: {:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(10)]
        );
        assert!(ok > 20, "{what}: only {ok} GETs were made");
        ok
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn spec(replicas: u32, extra: &str) -> String {
    format!(
        "name = \"web\"\nimage = \"hello:1\"\nreplicas = {replicas}\ndrain_timeout = \"2s\"\n[ingress]\nlisten = \"0.0.0.0:{INGRESS}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n{extra}"
    )
}

fn per_node(nodes: &[String]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for n in nodes {
        match out.iter_mut().find(|(m, _)| m == n) {
            Some((_, c)) => *c += 1,
            None => out.push((n.clone(), 1)),
        }
    }
    out.sort();
    out
}

#[test]
fn replicas_spread_over_three_nodes_and_a_dead_or_cut_off_node_is_replaced_within_ten_seconds_without_a_failed_get()
 {
    let mut c = Cluster::start();
    c.pack("hello:1", "1");
    let leader = c.leader();
    c.deploy(leader, &spec(6, ""), false);
    let nodes = poll(Duration::from_secs(30), || c.settled(leader, 6)).expect("6 ready");
    assert_eq!(
        per_node(&nodes),
        vec![("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)],
        "spread 2-2-2"
    );
    let ingresses = vec![
        SocketAddr::new(c.topo.addr("cp1"), INGRESS),
        SocketAddr::new(c.topo.addr("cp2"), INGRESS),
    ];
    poll(Duration::from_secs(10), || {
        ingresses
            .iter()
            .all(|a| get(*a, "/").is_some_and(|(s, b)| s == 200 && b.starts_with("hello 1")))
            .then_some(())
    })
    .expect("both control planes serve the ingress");

    // A machine dies: its agent and its instances are SIGKILLed.
    let load = Load::start(&c.topo, ingresses.clone());
    let killed = Instant::now();
    c.topo.kill_all("n1");
    let nodes = poll(Duration::from_secs(20), || {
        c.settled(leader, 6)
            .filter(|n| !n.iter().any(|x| x == "n1"))
    })
    .expect("replaced elsewhere");
    let took = killed.elapsed();
    let gets = load.finish("kill -9 of n1");
    assert!(
        took < Duration::from_secs(10),
        "replacements ready {took:?} after the kill"
    );
    assert_eq!(per_node(&nodes), vec![("n2".into(), 3), ("n3".into(), 3)]);
    eprintln!("n1 killed: replacements ready after {took:?}; {gets} GETs, none failed");

    // It comes back: what it ran is stale and stopped.
    c.start_agent("n1");
    poll(Duration::from_secs(30), || {
        (c.on_agent("n1") == Some(0)).then_some(())
    })
    .expect("n1's stale instances are stopped once it is back");

    // A node is cut off (its link down): its instances are replaced; when the
    // link returns, what it still runs is stopped.
    let load = Load::start(&c.topo, ingresses.clone());
    let cut = Instant::now();
    c.topo.link("n2", false);
    poll(Duration::from_secs(20), || {
        c.settled(leader, 6)
            .filter(|n| !n.iter().any(|x| x == "n2"))
    })
    .expect("n2's instances replaced");
    let took = cut.elapsed();
    let gets = load.finish("n2's link down");
    assert!(
        took < Duration::from_secs(10),
        "replacements ready {took:?} after the cut"
    );
    eprintln!("n2 cut off: replacements ready after {took:?}; {gets} GETs, none failed");
    assert_eq!(c.on_agent("n2"), None, "n2 cannot be reached while cut off");
    c.topo.link("n2", true);
    poll(Duration::from_secs(20), || {
        (c.on_agent("n2") == Some(0)).then_some(())
    })
    .expect("n2's stale instances are stopped once it is back");

    let (code, _, err) = c.cli(leader, &["service", "rm", "web"]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2", "n3"] {
        poll(Duration::from_secs(20), || {
            (c.on_agent(n) == Some(0)).then_some(())
        })
        .unwrap_or_else(|| panic!("{n} runs nothing after rm"));
    }
}

#[test]
fn drain_etcd_restart_and_the_death_of_the_leader_mid_rollout_fail_no_request() {
    let mut c = Cluster::start();
    c.pack("hello:1", "1");
    c.pack("hello:2", "2");
    let leader = c.leader();
    c.deploy(leader, &spec(6, ""), false);
    poll(Duration::from_secs(30), || c.settled(leader, 6)).expect("6 ready");
    let ingresses = vec![
        SocketAddr::new(c.topo.addr("cp1"), INGRESS),
        SocketAddr::new(c.topo.addr("cp2"), INGRESS),
    ];
    poll(Duration::from_secs(10), || {
        ingresses
            .iter()
            .all(|a| get(*a, "/").is_some_and(|(s, _)| s == 200))
            .then_some(())
    })
    .expect("both control planes serve the ingress");

    // Drain: every instance of n3 moves, each replacement ready first.
    let load = Load::start(&c.topo, ingresses.clone());
    let (code, out, err) = c.cli(leader, &["node", "drain", "n3", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    let nodes = poll(Duration::from_secs(20), || c.settled(leader, 6)).expect("settled");
    load.finish("drain of n3");
    assert!(!nodes.iter().any(|n| n == "n3"), "{nodes:?}");
    poll(Duration::from_secs(20), || {
        (c.on_agent("n3") == Some(0)).then_some(())
    })
    .expect("n3 runs nothing");
    assert_eq!(c.cli(leader, &["node", "uncordon", "n3"]).0, 0);

    // etcd restarts: control planes and agents reconnect, nothing is lost.
    let load = Load::start(&c.topo, ingresses.clone());
    c.proc("etcd").kill();
    c.start_etcd();
    poll(Duration::from_secs(30), || {
        let nodes = c.api(leader, "GET", "/api/v1/nodes", "").json();
        let ready = nodes
            .as_array()?
            .iter()
            .filter(|n| n["status"] == "ready")
            .count();
        (ready == 3).then_some(())
    })
    .expect("the agents heartbeat again after etcd's restart");
    let (code, _, err) = c.cli(leader, &["scale", "web", "4"]);
    assert_eq!(code, 0, "scale after etcd's restart: {err}");
    poll(Duration::from_secs(30), || c.settled(leader, 4)).expect("scaled to 4");
    load.finish("etcd restart");

    // The leader dies mid-rollout; the other control plane finishes or rolls
    // it back, and its ingress serves throughout.
    let other = if leader == "cp1" { "cp2" } else { "cp1" };
    let load = Load::start(&c.topo, vec![SocketAddr::new(c.topo.addr(other), INGRESS)]);
    c.deploy(
        leader,
        &spec(4, "[env]\nHELLO_START_DELAY_MS = \"3000\"\n").replace("hello:1", "hello:2"),
        true,
    );
    poll(Duration::from_secs(15), || {
        let st = c.status(leader);
        st["instances"]
            .as_array()?
            .iter()
            .any(|i| i["revision"] == 2)
            .then_some(())
    })
    .expect("revision 2 started an instance");
    let killed = Instant::now();
    c.proc(leader).kill();
    poll(Duration::from_secs(30), || {
        let st = c.status(other);
        let done = st["revisions"][1]["status"] == "active"
            || st["revisions"][1]["status"] == "rolled-back";
        (done && st["phase"] == "idle").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{other} ended the rollout: {}\n{other}'s log:\n{}",
            c.status(other),
            c.tail(other)
        )
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: lease TTL 5 s + 5 s"
    );
    load.finish("leader killed mid-rollout");
    eprintln!("leader killed mid-rollout: {other} ended it after {took:?}");

    let (code, _, err) = c.cli(other, &["service", "rm", "web"]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2", "n3"] {
        poll(Duration::from_secs(20), || {
            (c.on_agent(n) == Some(0)).then_some(())
        })
        .unwrap_or_else(|| panic!("{n} runs nothing after rm"));
    }
}
