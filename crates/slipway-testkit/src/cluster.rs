//! Several machines for whole-system tests and benchmarks: etcd, two control
//! planes (`slipway serve --state etcd://… --no-instances`) and three nodes
//! running `slipway agent`, each in a network namespace of [`crate::netns`], and a
//! load generator that counts failed GETs through the ingresses.

#![expect(clippy::unwrap_used, reason = "test harness")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{Proc, Topology};
use crate::{poll, request};

/// The join token the control planes and agents share.
pub const TOKEN: &str = "cluster-test-join-token-0123456789";
/// The control planes' API port.
pub const API: u16 = 5000;
/// The ingress port the tests' services listen on.
pub const INGRESS: u16 = 8080;
/// The agents' API port.
pub const AGENT: u16 = 7480;

/// The machines and what runs on them. Fields drop in order: processes first,
/// then the namespaces.
pub struct Cluster {
    bin: String,
    procs: Vec<(String, Proc)>,
    agents: Vec<String>,
    dir: tempfile::TempDir,
    /// The machines.
    pub topo: Topology,
}

impl Cluster {
    /// etcd, two control planes and three agents, up and joined; the calling
    /// thread is moved into the load generator's machine.
    pub fn start(bin: &str) -> Self {
        let topo = Topology::new(&["etcd", "cp1", "cp2", "n1", "n2", "n3", "lg"])
            .expect("network namespaces can be made (iproute2, root)");
        // The test's own thread is the load generator's machine.
        topo.enter("lg");
        let mut c = Self {
            bin: bin.to_owned(),
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
            (c.ready_nodes("cp1") == 3).then_some(())
        })
        .expect("three agents joined and are ready");
        c
    }

    /// Where a process's output goes.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts etcd in its machine (again, on the same data) and waits until healthy.
    pub fn start_etcd(&mut self) {
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

    /// Starts control plane `name`.
    pub fn start_cp(&mut self, name: &str) {
        let ip = self.topo.addr(name);
        let etcd = self.topo.addr("etcd");
        let mut cmd = self.topo.command(name, &self.bin);
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

    /// Starts (or starts again) the agent of node `name`.
    pub fn start_agent(&mut self, name: &str) {
        let ip = self.topo.addr(name);
        let join = format!(
            "http://{}:{API},http://{}:{API}",
            self.topo.addr("cp1"),
            self.topo.addr("cp2")
        );
        let mut cmd = self.topo.command(name, &self.bin);
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

    /// The data directory of `name`.
    pub fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The newest process started as `name`.
    pub fn proc(&mut self, name: &str) -> &mut Proc {
        &mut self
            .procs
            .iter_mut()
            .rev()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    }

    /// A control plane's API URL.
    pub fn url(&self, cp: &str) -> String {
        format!("http://{}:{API}", self.topo.addr(cp))
    }

    /// Waits until a control plane answers.
    pub fn wait_api(&self, cp: &str) {
        let addr = SocketAddr::new(self.topo.addr(cp), API);
        poll(Duration::from_secs(30), || {
            get(addr, "/api/v1/nodes").filter(|(s, _)| *s == 200)
        })
        .unwrap_or_else(|| panic!("{cp} answers; log: {}", self.tail(cp)));
    }

    /// The last lines of a process's output.
    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("this control plane is a standby"))
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// One request to a control plane's API.
    pub fn api(&self, cp: &str, method: &str, path: &str, body: &str) -> crate::Response {
        request(
            SocketAddr::new(self.topo.addr(cp), API),
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    /// Runs the CLI against a control plane: (exit code, stdout, stderr).
    pub fn cli(&self, cp: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(&self.bin)
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
    pub fn pack(&self, tag: &str, version: &str) {
        let env = format!("HELLO_VERSION={version}");
        let input = format!("{}:/hello", crate::hello_bin().display());
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
    pub fn leader(&self) -> &'static str {
        poll(Duration::from_secs(20), || {
            ["cp1", "cp2"]
                .into_iter()
                .find(|cp| self.api(cp, "GET", "/api/v1/services", "").status == 200)
        })
        .expect("one control plane leads")
    }

    /// Service `web`'s status as a control plane answers it.
    pub fn status(&self, cp: &str) -> serde_json::Value {
        self.api(cp, "GET", "/api/v1/services/web", "").json()
    }

    /// Deploys `spec` through a control plane (`--detach` if asked).
    pub fn deploy(&self, cp: &str, spec: &str, detach: bool) {
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
    pub fn settled(&self, cp: &str, replicas: usize) -> Option<Vec<String>> {
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

    /// How many nodes a control plane sees ready.
    pub fn ready_nodes(&self, cp: &str) -> usize {
        let nodes = self.api(cp, "GET", "/api/v1/nodes", "").json();
        nodes
            .as_array()
            .map_or(0, |a| a.iter().filter(|n| n["status"] == "ready").count())
    }

    /// Waits until `replicas` ready instances run and none on `node`; their nodes.
    pub fn replaced_without(
        &self,
        cp: &str,
        node: &str,
        replicas: usize,
        within: Duration,
    ) -> Option<Vec<String>> {
        poll(within, || {
            self.settled(cp, replicas)
                .filter(|n| !n.iter().any(|x| x == node))
        })
    }

    /// Waits until `node`'s agent answers and runs nothing.
    pub fn runs_nothing(&self, node: &str, within: Duration) -> bool {
        poll(within, || (self.on_agent(node) == Some(0)).then_some(())).is_some()
    }

    /// What an agent runs, as its API lists it; `None` if it cannot be reached.
    pub fn on_agent(&self, node: &str) -> Option<usize> {
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
pub fn try_get(addr: SocketAddr, path: &str, headers: &str) -> Result<(u16, String), String> {
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

/// [`try_get`] without the reason.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    try_get(addr, path, "").ok()
}

/// GETs through every ingress in turn, from the load generator's machine, on
/// four connections at a time, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    /// Starts GETs at `targets`.
    pub fn start(topo: &Topology, targets: Vec<SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|k| {
                let flag = stop.clone();
                let ns = topo.path("lg");
                let targets = targets.clone();
                std::thread::spawn(move || {
                    crate::netns::enter_path(&ns);
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

    /// Stops; the GETs that succeeded and what went wrong with the others.
    pub fn counts(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0u64, Vec::new());
        for t in self.threads.drain(..) {
            let (o, f) = t.join().unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }

    /// Stops; asserts that no GET failed and that GETs were made.
    pub fn finish(self, what: &str) -> u64 {
        let (ok, failed) = self.counts();
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
