//! Test harness for whole-system tests: starts the real `slipway` binary on a free
//! loopback port with a temp data directory, speaks raw HTTP/1.1 to it (so tests
//! control every byte, including hostile paths), and stops it by PID on drop.
//!
//! `publish = false`; only tests depend on it.

#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed setup step is a test failure"
)]

pub mod cluster;
pub mod netns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `slipway serve`.
pub struct TestServer {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its data directory.
    pub data: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
    bin: PathBuf,
    extra: Vec<String>,
    /// An admin API token, on servers from [`TestServer::start_secure`]; [`cli`]
    /// passes it as `SLIPWAY_TOKEN`.
    pub admin_token: Option<String>,
}

/// The admin of [`TestServer::start_secure`]: user name and password.
pub const ADMIN: (&str, &str) = ("admin", "admin-secret-pw");

/// An `Authorization: Basic` value.
pub fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: HashMap<String, String>,
    /// Body bytes (chunked encoding already removed).
    pub body: Vec<u8>,
}

impl Response {
    /// A header by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The first OCI error code in the body.
    pub fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Polls `f` until it returns `Some` or `deadline` passes.
pub fn poll<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// === impl TestServer ===

impl TestServer {
    /// Starts `bin serve` with a fresh temp data dir.
    pub fn start(bin: &str) -> Self {
        Self::start_with(bin, &[])
    }

    /// Starts `bin serve` with extra arguments.
    pub fn start_with(bin: &str, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Self::start_in(tmp, bin, extra)
    }

    /// Starts on `<tmp>/data`, owning `tmp`.
    fn start_in(tmp: tempfile::TempDir, bin: &str, extra: &[&str]) -> Self {
        let data = tmp.path().join("data");
        let mut s = Self::spawn(
            Path::new(bin),
            &data,
            extra.iter().map(|s| (*s).to_owned()).collect(),
            None,
        );
        s._tmp = Some(tmp);
        s
    }

    /// Starts with authentication on: an admin user ([`ADMIN`]) is created in
    /// the data directory first, as `slipway user add --data` does.
    pub fn start_secure(bin: &str, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut child = Command::new(bin)
            .args([
                "user",
                "add",
                ADMIN.0,
                "--role",
                "admin",
                "--password-stdin",
                "--data",
            ])
            .arg(&data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ADMIN.1.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "user add failed");
        let mut s = Self::start_in(tmp, bin, extra);
        let auth = basic(ADMIN.0, ADMIN.1);
        let r = s.request(
            "POST",
            "/api/v1/tokens",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            br#"{"name":"testkit-admin","rights":{"admin":true}}"#,
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        s.admin_token = r.json()["token"].as_str().map(str::to_owned);
        s
    }

    /// Starts on an existing data directory (the caller owns it).
    pub fn start_on(bin: &str, data: &Path, extra: &[&str]) -> Self {
        Self::spawn(
            Path::new(bin),
            data,
            extra.iter().map(|s| (*s).to_owned()).collect(),
            None,
        )
    }

    fn spawn(bin: &Path, data: &Path, extra: Vec<String>, listen: Option<SocketAddr>) -> Self {
        // One slice of instance ports per server (nextest runs tests side by side).
        let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        // The server writes its bound address here once it listens.
        let ready = data.join(".ready-addr");
        let _ = std::fs::remove_file(&ready);
        // A test may choose the listen address itself (`--listen 0.0.0.0:0`).
        let listen_args: Vec<String> = if extra.iter().any(|a| a == "--listen") {
            Vec::new()
        } else {
            vec!["--listen".into(), listen]
        };
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(&listen_args)
            .arg("--ready-file")
            .arg(&ready)
            .args(&extra)
            .env("SLIPWAY_LOG", "info")
            .env("SLIPWAY_PORT_RANGE", port_slice())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line);
            }
        });
        let addr = poll(Duration::from_secs(30), || {
            if child.try_wait().ok().flatten().is_some() {
                return Some(None);
            }
            std::fs::read_to_string(&ready)
                .ok()
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                .map(Some)
        })
        .flatten();
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("slipway serve did not start: {:?}", log.lock().unwrap());
        };
        // Its "listening on" line is logged just before the file is written.
        let _ = poll(Duration::from_secs(5), || {
            log.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("listening on "))
                .then_some(())
        });
        Self {
            child: Some(child),
            addr,
            data: data.to_owned(),
            log,
            _tmp: None,
            bin: bin.to_owned(),
            extra,
            admin_token: None,
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `host:port`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Sends a signal to the server (by its PID) and waits for it to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} failed");
        child.wait().unwrap()
    }

    /// `kill -9`s the server and starts it again on the same data dir and port.
    pub fn crash_and_restart(&mut self) {
        let status = self.signal_and_wait("KILL");
        assert!(!status.success());
        let tmp = self._tmp.take();
        let addr = self.addr;
        let mut next = Self::spawn(&self.bin, &self.data, self.extra.clone(), Some(addr));
        next._tmp = tmp;
        next.admin_token = self.admin_token.take();
        std::mem::swap(self, &mut next);
        // `next` now holds the dead child handle (None) and is dropped harmlessly.
    }

    /// Sends one request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.addr, method, path, headers, body)
    }

    /// GET shorthand.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// Pushes a blob monolithically and returns its digest.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let r = self.request(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[],
            data,
        );
        assert_eq!(
            r.status,
            201,
            "push blob: {}",
            String::from_utf8_lossy(&r.body)
        );
        digest
    }

    /// Pushes, as `repo:tag`, an OCI index whose one entry is the manifest at
    /// `repo:of` for platform linux/`arch`; returns the push's status.
    pub fn push_index(&self, repo: &str, tag: &str, of: &str, arch: &str) -> u16 {
        let m = self.get(&format!("/v2/{repo}/manifests/{of}"));
        let digest = m.header("docker-content-digest").unwrap_or_default();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}]}}"#,
            m.body.len()
        );
        self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
            index.as_bytes(),
        )
        .status
    }

    /// Pushes an image manifest with the given config and layers under `reference`.
    pub fn push_image(
        &self,
        repo: &str,
        reference: &str,
        config: &[u8],
        layers: &[&[u8]],
    ) -> (String, Vec<u8>) {
        let c = self.push_blob(repo, config);
        let layers: Vec<String> = layers
            .iter()
            .map(|l| {
                let d = self.push_blob(repo, l);
                format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d}","size":{}}}"#, l.len())
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            layers.join(",")
        )
        .into_bytes();
        let r = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            &manifest,
        );
        assert_eq!(
            r.status,
            201,
            "push manifest: {}",
            String::from_utf8_lossy(&r.body)
        );
        (sha256(&manifest), manifest)
    }
}

impl TestServer {
    /// The `name` fields of a JSON list the admin API returns (empty on any failure).
    fn names(&self, path: &str) -> Vec<String> {
        try_request(self.addr, "GET", path, self.admin_token.as_deref())
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x["name"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Containers outlive the daemon by design; a test that failed half-way must
        // still leave none behind. Services first: their healing would replace
        // containers removed under them.
        if self.child.is_some() {
            for name in self.names("/api/v1/services") {
                let _ = try_request(
                    self.addr,
                    "DELETE",
                    &format!("/api/v1/services/{name}"),
                    self.admin_token.as_deref(),
                );
            }
            // Removal is a command the service finishes on its own: wait for it.
            let _ = poll(Duration::from_secs(60), || {
                self.names("/api/v1/services").is_empty().then_some(())
            });
            for name in self.names("/api/v1/containers") {
                let _ = try_request(
                    self.addr,
                    "DELETE",
                    &format!("/api/v1/containers/{name}?force=true"),
                    self.admin_token.as_deref(),
                );
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A slice of 100 instance ports for one test server, below the ephemeral range:
/// servers of concurrent tests rarely share one (and a port taken anyway is
/// skipped by the daemon).
fn port_slice() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let slice = (std::process::id()
        .wrapping_mul(31)
        .wrapping_add(n.wrapping_mul(7)))
        % 120;
    let first = 20_000 + slice * 100;
    format!("{first}-{}", first + 99)
}

/// A request that reports failure instead of panicking (for cleanup paths).
fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n").as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    (raw.starts_with(b"HTTP/1.") && raw.windows(4).any(|w| w == b"\r\n\r\n"))
        .then(|| parse_response(&raw, false))
}

/// sha256 digest string of `data`.
pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Opens a connection and writes the request head (and an optional body prefix),
/// leaving the stream open so the caller can write more or drop it mid-body.
pub fn open_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let has_len = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (e.g. 413) and close before reading the whole body;
    // the response is still there to read.
    let _ = s.write_all(body);
    s
}

/// Reads a whole response from a stream opened by [`open_request`].
pub fn read_response(mut s: TcpStream, method: &str) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 << 10];
    // Keep what arrived even if the connection is then reset.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw, method == "HEAD")
}

/// One request, whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    read_response(open_request(addr, method, path, headers, body), method)
}

fn parse_response(raw: &[u8], head_only: bool) -> Response {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers = HashMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if head_only {
        body.clear();
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..i])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds an OCI image layout at `dir` tagged `tag` from busybox-static and a
/// generated file, with umoci. Returns the layout path.
pub fn busybox_layout(dir: &Path, tag: &str) -> PathBuf {
    let layout = dir.join("layout");
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    let image = format!("{}:{tag}", layout.display());
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci").args(["insert", "--image", &image, "/bin/busybox", "/bin/busybox"]));
    let f = dir.join("hello.txt");
    std::fs::write(&f, format!("generated for {tag}\n")).unwrap();
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&f)
        .arg("/hello.txt"));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.cmd",
        "/bin/busybox",
        "--config.cmd",
        "sh",
    ]));
    layout
}

/// The static `hello` binary built by `scripts/build-hello` (or `$HELLO_BIN`).
pub fn hello_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HELLO_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/static/x86_64-unknown-linux-gnu/release/hello");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-hello (scripts/test does)",
        p.display()
    );
    p
}

/// Runs the `slipway` CLI against `server`, returning (exit code, stdout, stderr).
///
/// A command still running after [`CLI_DEADLINE`] is killed and reported as exit
/// code -1 with what it printed: a hang fails its test with evidence instead of
/// stalling the suite.
pub fn cli(bin: &str, server: &TestServer, args: &[&str]) -> (i32, String, String) {
    cli_with(bin, server, args, &[], None)
}

/// [`cli`] with extra environment variables and optional stdin.
pub fn cli_with(
    bin: &str,
    server: &TestServer,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
) -> (i32, String, String) {
    let mut child = Command::new(bin)
        .arg("--server")
        .arg(format!("http://{}", server.host()))
        .args(args)
        .envs(env.iter().copied())
        .envs(
            server
                .admin_token
                .as_deref()
                .filter(|_| !env.iter().any(|(k, _)| *k == "SLIPWAY_TOKEN"))
                .map(|t| ("SLIPWAY_TOKEN", t)),
        )
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        let _ = w.write_all(text.as_bytes());
    }
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let status = poll(CLI_DEADLINE, || child.try_wait().ok().flatten());
    let code = match status {
        Some(s) => s.code().unwrap_or(-1),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            -1
        }
    };
    let mut err = err.join().unwrap_or_default();
    if status.is_none() {
        err.push_str(&format!(
            "\n(testkit: `slipway {}` killed after {CLI_DEADLINE:?})",
            args.join(" ")
        ));
    }
    (code, out.join().unwrap_or_default(), err)
}

/// A small tmpfs, for full-disk tests, unmounted on drop (needs root).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"3m"`) on `dir`, which is created.
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("tmpfs mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Self(dir.to_owned())
    }

    /// Fills the filesystem with a file of zeros until only `left` bytes are free.
    pub fn fill_leaving(&self, left: u64) {
        let st = nix::sys::statvfs::statvfs(&self.0).expect("statvfs");
        let free = st.blocks_available() * st.fragment_size();
        let size = usize::try_from(free.saturating_sub(left)).expect("size");
        std::fs::write(self.0.join("filler"), vec![0u8; size]).expect("fill the tmpfs");
    }

    /// Frees what [`Tmpfs::fill_leaving`] took.
    pub fn unfill(&self) {
        std::fs::remove_file(self.0.join("filler")).expect("remove the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// How long [`cli`] lets one command run.
pub const CLI_DEADLINE: Duration = Duration::from_secs(120);

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `http://127.0.0.1:port/path` with a fresh connection; `None` if it fails.
pub fn http_get(port: u16, path: &str) -> Option<Response> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    raw.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| parse_response(&raw, false))
}

/// Distribution (Debian's `docker-registry`) on a free loopback port, as "another
/// registry"; killed (by PID) on drop.
pub struct Distribution {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Distribution {
    /// Starts it and waits until `/v2/` answers; `None` if it does not come up.
    pub fn start() -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let port = free_port();
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
                dir.path().join("data").display()
            ),
        )
        .ok()?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let d = Self {
            child,
            host: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        poll(Duration::from_secs(10), || {
            http_get(port, "/v2/").filter(|r| r.status == 200)
        })
        .map(|_| d)
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's etcd (`etcd-server`) on free loopback ports with its data in a temp
/// dir; killed (by PID) on drop. `restart` stops and starts it on the same ports
/// and data, as an operator's restart would.
pub struct Etcd {
    child: Option<Child>,
    /// `127.0.0.1:<client port>`.
    pub host: String,
    peer: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts it and waits until `/health` answers; `None` if it does not come up
    /// (for example: `etcd` is not installed).
    pub fn start() -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mut e = Self {
            child: None,
            host: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            dir,
        };
        e.spawn().then_some(e)
    }

    /// `etcd://HOST:PORT`, as `slipway serve --state` takes it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.host)
    }

    fn spawn(&mut self) -> bool {
        let data = self.dir.path().join("data");
        let client = format!("http://{}", self.host);
        let peer = format!("http://{}", self.peer);
        let Ok(child) = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        self.child = Some(child);
        let port = self
            .host
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(0);
        poll(Duration::from_secs(20), || {
            http_get(port, "/health").filter(|r| r.status == 200)
        })
        .is_some()
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data; `true` once healthy.
    pub fn restart(&mut self) -> bool {
        self.stop();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `slipway image pack -q` of one input as `tag` with `entrypoint` and extra flags,
/// asserting success; returns the manifest digest the CLI prints.
pub fn pack(
    bin: &str,
    s: &TestServer,
    tag: &str,
    entrypoint: &str,
    extra: &[&str],
    input: &str,
) -> String {
    let mut args = vec![
        "image",
        "pack",
        "-q",
        "--tag",
        tag,
        "--entrypoint",
        entrypoint,
    ];
    args.extend_from_slice(extra);
    args.push(input);
    let (code, out, err) = cli(bin, s, &args);
    assert_eq!(code, 0, "pack failed: {err}");
    assert!(out.trim().starts_with("sha256:"), "{out}");
    out.trim().to_owned()
}

/// Packs busybox-static as `tag`, entrypoint `/bin/busybox`, with extra pack flags.
pub fn pack_busybox(bin: &str, s: &TestServer, tag: &str, extra: &[&str]) {
    pack(
        bin,
        s,
        tag,
        "/bin/busybox",
        extra,
        "/bin/busybox:/bin/busybox",
    );
}

/// Packs the static hello workload as `tag`, reporting `version`.
pub fn pack_hello(bin: &str, s: &TestServer, tag: &str, version: &str) {
    let env = format!("HELLO_VERSION={version}");
    let input = format!("{}:/hello", hello_bin().display());
    pack(
        bin,
        s,
        tag,
        "/hello",
        &["--env", &env, "--expose", "8080"],
        &input,
    );
}

/// The version of `s3s-fs` (an S3-compatible server over a directory) the tests
/// use; `scripts/test` installs it under `/var/cache/slipway-test`.
pub const S3S_FS_VERSION: &str = "0.14.1";

/// An S3-compatible server (`s3s-fs`) on a free loopback port over a temp dir,
/// with one bucket; killed (by PID) on drop.
pub struct S3Server {
    child: Child,
    bin: PathBuf,
    port: u16,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket's directory (objects are files under it).
    pub bucket_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// The bucket every server has.
    pub const BUCKET: &'static str = "slipway";
    /// Its credentials.
    pub const KEYS: (&'static str, &'static str) = ("testaccesskey", "testsecretkey0123456789");

    /// Starts it and waits until it accepts connections; `None` without the
    /// binary (`$S3S_FS`, or `scripts/test`'s install).
    pub fn start() -> Option<Self> {
        let bin = std::env::var_os("S3S_FS").map_or_else(
            || {
                PathBuf::from(format!(
                    "/var/cache/slipway-test/s3s-fs-{S3S_FS_VERSION}/bin/s3s-fs"
                ))
            },
            PathBuf::from,
        );
        if !bin.is_file() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let bucket_dir = dir.path().join(Self::BUCKET);
        std::fs::create_dir_all(&bucket_dir).ok()?;
        let port = free_port();
        let child = Self::spawn(&bin, port, dir.path())?;
        let s = Self {
            child,
            bin,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket_dir,
            _dir: dir,
        };
        poll(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .map(|_| s)
    }

    fn spawn(bin: &Path, port: u16, root: &Path) -> Option<Child> {
        Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", Self::KEYS.0, "--secret-key", Self::KEYS.1])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    /// Starts it again after [`S3Server::kill`], on the same port and objects.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.bin, self.port, self._dir.path()).expect("restart s3s-fs");
        let port = self.port;
        assert!(
            poll(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .ok())
            .is_some(),
            "s3s-fs did not come back on port {port}"
        );
    }

    /// A `[storage]` section for a bucket on this server, objects under `prefix`.
    pub fn storage_config(&self, prefix: &str) -> String {
        format!(
            "[storage]\nbackend = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprefix = \"{prefix}\"\n",
            self.endpoint,
            Self::BUCKET,
            Self::KEYS.0,
            Self::KEYS.1,
        )
    }

    /// Stops it (SIGKILL), as a crashed server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs podman on its own storage under `root` (vfs, runc), with `args`;
/// returns its stdout and panics on failure.
pub fn podman(root: &Path, args: &[&str]) -> String {
    run(Command::new("podman")
        .arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("runroot"))
        .args(["--runtime", "runc", "--storage-driver", "vfs"])
        .args(args))
}

/// Where Debian's `postgresql-15` puts its server binaries.
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server (Debian's `postgresql-15`) in a temp directory on a free
/// loopback port, run as the unprivileged user `nobody` (the server refuses
/// root); superuser `slipway`, trust authentication on loopback. Stopped (by
/// PID) on drop.
pub struct PgServer {
    child: Option<Child>,
    /// `postgres://slipway@127.0.0.1:<port>/postgres`.
    pub url: String,
    port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl PgServer {
    /// initdb and start; `None` without the binaries (`scripts/test` installs
    /// `postgresql-15`).
    pub fn start() -> Option<Self> {
        use std::os::unix::process::CommandExt as _;
        let bin = Path::new(POSTGRES_BIN);
        if !bin.join("postgres").is_file() {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).ok()?;
        // nobody must own the data directory and reach it.
        let status = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(dir.path())
            .status()
            .ok()?;
        if !status.success() {
            return None;
        }
        let init = Command::new(bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "slipway", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .uid(65534)
            .gid(65534)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .ok()?;
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let mut s = Self {
            child: None,
            url: format!("postgres://slipway@127.0.0.1:{port}/postgres"),
            port,
            data,
            _dir: dir,
        };
        s.resume();
        Some(s)
    }

    /// Starts the server again (after [`PgServer::stop`]) on the same data and
    /// port, and waits until it accepts queries.
    pub fn resume(&mut self) {
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(Path::new(POSTGRES_BIN).join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.data)
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "max_connections=200"])
            .uid(65534)
            .gid(65534)
            .current_dir(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let port = self.port.to_string();
        let ready = poll(Duration::from_secs(30), || {
            Command::new(Path::new(POSTGRES_BIN).join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .ok()
                .filter(std::process::ExitStatus::success)
        });
        assert!(
            ready.is_some(),
            "postgres did not become ready on port {port}"
        );
    }

    /// Stops the server (fast shutdown: sessions are cut) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGINT,
                );
            }
            let stopped = poll(Duration::from_secs(20), || c.try_wait().ok().flatten());
            if stopped.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two `slipway serve` replicas sharing one bucket (`s3s-fs`) and one
/// PostgreSQL database, each with its own data directory: what several
/// replicas behind a load balancer are.
pub struct SharedRegistry {
    /// Replica A.
    pub a: TestServer,
    /// Replica B.
    pub b: TestServer,
    /// The S3 server.
    pub s3: S3Server,
    /// The database.
    pub pg: PgServer,
    /// The configuration file both replicas read.
    pub config: PathBuf,
    _dir: tempfile::TempDir,
}

impl SharedRegistry {
    /// Starts the S3 server, the database and both replicas; `extra` is
    /// appended to their configuration file.
    pub fn start(bin: &str, extra: &str) -> Self {
        let s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
        let pg = PgServer::start().expect("postgresql-15 is installed (scripts/test installs it)");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("slipway.toml");
        std::fs::write(
            &config,
            format!(
                "{}database = \"{}\"\n{extra}",
                s3.storage_config("reg/"),
                pg.url
            ),
        )
        .expect("write config");
        let c = config.display().to_string();
        let a = TestServer::start_with(bin, &["--config", &c]);
        let b = TestServer::start_with(bin, &["--config", &c]);
        Self {
            a,
            b,
            s3,
            pg,
            config,
            _dir: dir,
        }
    }
}
