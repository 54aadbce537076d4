//! Containers from Slipway's registry run by real runc: pack, run, curl, stop,
//! restart policies, OOM, hostile layers, re-adoption and cleanup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use slipway_testkit::{TestServer, Tmpfs, cli, free_port, http_get, poll, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

/// Packs the hello workload as `tag`.
fn pack_hello(s: &TestServer, tag: &str, version: &str) {
    slipway_testkit::pack_hello(BIN, s, tag, version);
}

fn pack_busybox(s: &TestServer, tag: &str, extra: &[&str]) {
    slipway_testkit::pack_busybox(BIN, s, tag, extra);
}

fn info(s: &TestServer, name: &str) -> serde_json::Value {
    s.get(&format!("/api/v1/containers/{name}")).json()
}

fn wait_status(
    s: &TestServer,
    name: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll(Duration::from_secs(30), || {
        let i = info(s, name);
        pred(&i).then_some(i)
    })
    .unwrap_or_else(|| panic!("{name} never reached the expected state: {}", info(s, name)))
}

/// Removes the container with the CLI and asserts nothing of it is left: process,
/// mount, cgroup, files.
fn rm_and_assert_gone(s: &TestServer, name: &str, force: bool, pid: Option<u64>) {
    let id = info(s, name)["id"].as_str().expect("id").to_owned();
    let args: &[&str] = if force {
        &["rm", "-f", name]
    } else {
        &["rm", name]
    };
    let (code, _, err) = cli(BIN, s, args);
    assert_eq!(code, 0, "{err}");
    let dir = s.data.join("runtime/containers").join(name);
    assert!(!dir.exists(), "{} still exists", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&format!("{}/", dir.display())),
        "a mount under {} is left",
        dir.display()
    );
    for ctl in ["memory", "pids", "cpu,cpuacct"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(ctl)
            .join("slipway")
            .join(&id);
        assert!(!cg.exists(), "{} is left", cg.display());
    }
    if let Some(pid) = pid {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} is left"
        );
    }
}

#[test]
fn packed_hello_runs_answers_stops_gracefully_and_leaves_nothing() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1.0.0", "1.0.0");
    // Packing is deterministic: the same inputs give the same digest.
    let first = s
        .get("/v2/hello/manifests/1.0.0")
        .header("docker-content-digest")
        .map(str::to_owned);
    pack_hello(&s, "hello:again", "1.0.0");
    assert_eq!(
        first.as_deref(),
        s.get("/v2/hello/manifests/again")
            .header("docker-content-digest")
    );

    let port = free_port();
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--port",
            &port.to_string(),
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "hello:1.0.0",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "web");
    let body = poll(Duration::from_secs(20), || {
        http_get(port, "/").filter(|r| r.status == 200)
    })
    .expect("hello answers");
    assert!(String::from_utf8_lossy(&body.body).starts_with("hello 1.0.0 from "));
    assert_eq!(http_get(port, "/healthz").map(|r| r.status), Some(200));
    let i = info(&s, "web");
    assert_eq!(i["status"], "running");
    let pid = i["pid"].as_u64();
    // The limits are real cgroup settings while it runs.
    let cg = Path::new("/sys/fs/cgroup/memory/slipway").join(i["id"].as_str().expect("id"));
    assert_eq!(
        std::fs::read_to_string(cg.join("memory.limit_in_bytes"))
            .expect("cgroup")
            .trim(),
        (64u64 << 20).to_string()
    );
    let (_, ps, _) = cli(BIN, &s, &["ps"]);
    // The status says for how long: "running 2s".
    let row: Vec<&str> = ps
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web: {ps}"))
        .split_whitespace()
        .collect();
    assert_eq!(row.get(2), Some(&"running"), "{ps}");
    assert!(
        row.get(3)
            .and_then(|a| a.strip_suffix('s'))
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "{ps}"
    );

    let (code, out, _) = cli(BIN, &s, &["stop", "web"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("stopped (0)"),
        "SIGTERM made hello exit cleanly: {out}"
    );
    let (_, logs, _) = cli(BIN, &s, &["logs", "web"]);
    assert!(
        logs.contains("SIGTERM, draining") && logs.contains("bye"),
        "{logs}"
    );
    rm_and_assert_gone(&s, "web", false, pid);
    // Starting the same image again unpacks nothing new.
    let snapshots = std::fs::read_dir(s.data.join("runtime/snapshots/sha256"))
        .expect("snapshots")
        .count();
    let port2 = free_port();
    assert_eq!(
        cli(
            BIN,
            &s,
            &[
                "run",
                "-d",
                "--name",
                "web2",
                "--port",
                &port2.to_string(),
                "hello:1.0.0"
            ]
        )
        .0,
        0
    );
    assert_eq!(
        std::fs::read_dir(s.data.join("runtime/snapshots/sha256"))
            .expect("snapshots")
            .count(),
        snapshots
    );
    rm_and_assert_gone(&s, "web2", true, None);
}

#[test]
fn crashing_container_restarts_with_growing_backoff() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let port = free_port();
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--name",
            "crashy",
            "--port",
            &port.to_string(),
            "--restart",
            "on-failure",
            "--env",
            "HELLO_CRASH_AFTER_MS=100",
            "hello:1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut seen = Vec::new();
    poll(Duration::from_secs(30), || {
        let i = info(&s, "crashy");
        if let Some(b) = i["backoff_ms"].as_u64()
            && seen.last() != Some(&b)
        {
            seen.push(b);
        }
        (i["restart_count"].as_u64().unwrap_or(0) >= 4).then_some(())
    })
    .expect("restarted four times");
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]) && seen.len() >= 2,
        "backoff grows: {seen:?}"
    );
    assert_eq!(info(&s, "crashy")["exit_code"], 3);
    rm_and_assert_gone(&s, "crashy", true, None);
}

#[test]
fn memory_limit_is_enforced_and_the_oom_kill_recorded() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--name",
            "hog",
            "--memory",
            "32m",
            "--env",
            "HELLO_ALLOC_MB=256",
            "--port",
            &free_port().to_string(),
            "hello:1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let i = wait_status(&s, "hog", |i| i["status"] == "exited");
    assert_eq!(i["oom_killed"], true, "{i}");
    assert_eq!(i["exit_code"], 137);
    rm_and_assert_gone(&s, "hog", false, None);
}

/// Pushes an image whose single layer is `layer` (an uncompressed tar).
fn push_raw_image(s: &TestServer, repo: &str, tag: &str, layer: &[u8], config: &str) {
    let c = s.push_blob(repo, config.as_bytes());
    let l = s.push_blob(repo, layer);
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = s.request(
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        m.as_bytes(),
    );
    assert_eq!(r.status, 201);
}

fn hostile_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_link_name("/etc").expect("link");
    h.set_path("evil").expect("path");
    h.set_cksum();
    b.append(&h, std::io::empty()).expect("append");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(5);
    h.set_mode(0o644);
    h.set_path("evil/slipway-pwned").expect("path");
    h.set_cksum();
    b.append(&h, &b"owned"[..]).expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn a_full_disk_during_unpack_is_reported_as_such_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let disk = Tmpfs::mount(&dir.path().join("small"), "24m");
    let s = TestServer::start_on(BIN, &dir.path().join("small/data"), &[]);
    // 6 MB that gzip cannot shrink: stored as ~6 MB, unpacked as 6 MB more.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..6_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect();
    let file = dir.path().join("noise.bin");
    std::fs::write(&file, &noise).expect("write noise");
    pack_busybox(&s, "noisy:1", &[&format!("{}:/noise.bin", file.display())]);

    disk.fill_leaving(2 << 20);
    let (code, _, err) = cli(
        BIN,
        &s,
        &["run", "--name", "noisy", "noisy:1", "--", "true"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        !err.contains("corrupt"),
        "a full disk is not a bad layer: {err}"
    );
    let runtime = s.data.join("runtime");
    assert!(!runtime.join("containers/noisy").exists());
    let snapshots: Vec<_> = std::fs::read_dir(runtime.join("snapshots/sha256"))
        .expect("snapshots")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        snapshots.is_empty(),
        "half-written snapshots: {snapshots:?}"
    );
    let admin = s.request(
        "POST",
        "/api/v1/containers",
        &[("content-type", "application/json")],
        br#"{"image":"noisy:1","name":"noisy","command":["true"]}"#,
    );
    assert_eq!(
        admin.status,
        507,
        "{}",
        String::from_utf8_lossy(&admin.body)
    );

    // With space back, the same image unpacks whole and runs.
    disk.unfill();
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "noisy",
            "noisy:1",
            "--",
            "sh",
            "-c",
            "wc -c < /noise.bin",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "6000000");
    rm_and_assert_gone(&s, "noisy", false, None);
}

#[test]
fn bad_images_and_requests_get_clear_errors_and_leave_nothing() {
    let s = TestServer::start(BIN);
    let cfg = r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_raw_image(&s, "evil", "v1", &hostile_tar(), cfg);
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--name", "evil", "evil:v1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("is rejected") && err.contains("symlink"),
        "{err}"
    );
    assert!(!Path::new("/etc/slipway-pwned").exists());

    let (code, _, err) = cli(BIN, &s, &["run", "-d", "nothing:here"]);
    assert_ne!(code, 0);
    assert!(err.contains("image not found"), "{err}");

    let arm = r#"{"architecture":"arm64","os":"linux","config":{"Cmd":["/x"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_raw_image(
        &s,
        "arm",
        "v1",
        &tar::Builder::new(Vec::new()).into_inner().expect("tar"),
        arm,
    );
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "arm:v1"]);
    assert_ne!(code, 0);
    assert!(err.contains("not linux/amd64"), "{err}");

    // A layer whose stored bytes were corrupted on disk.
    pack_hello(&s, "hello:1", "1");
    let m = s.get("/v2/hello/manifests/1").json();
    let layer = m["layers"][0]["digest"].as_str().expect("layer").to_owned();
    let blob = s
        .data
        .join("blobs/sha256")
        .join(&layer[7..9])
        .join(&layer[7..]);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("corrupt");
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "hello:1"]);
    assert_ne!(code, 0);
    assert!(err.contains("corrupt"), "{err}");
    assert_ne!(
        sha256(&bytes),
        layer,
        "the blob on disk really was corrupted"
    );

    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--memory", "lots", "hello:1"]);
    assert!(code != 0 && err.contains("memory:"), "{err}");
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--cpus", "0", "hello:1"]);
    assert!(code != 0 && err.contains("cpus:"), "{err}");
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--port", &port, "hello:1"]);
    assert!(code != 0 && err.contains("already in use"), "{err}");

    // Nothing was left by any failure.
    assert_eq!(
        std::fs::read_dir(s.data.join("runtime/containers"))
            .expect("dir")
            .count(),
        0
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.data.join("runtime/snapshots"))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(s.get("/api/v1/containers").json(), serde_json::json!([]));
}

#[test]
fn missing_runc_is_reported_with_how_to_install_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[runtime]\nbinary = \"runc-not-installed\"\n").expect("write");
    let s = TestServer::start_with(BIN, &["--config", cfg.to_str().expect("utf8")]);
    pack_hello(&s, "hello:1", "1");
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "hello:1"]);
    assert_ne!(code, 0);
    assert!(err.contains("apt-get install -y runc"), "{err}");
}

#[test]
fn running_containers_are_readopted_after_a_daemon_restart() {
    let mut s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let port = free_port();
    assert_eq!(
        cli(
            BIN,
            &s,
            &[
                "run",
                "-d",
                "--name",
                "keep",
                "--port",
                &port.to_string(),
                "hello:1"
            ]
        )
        .0,
        0
    );
    poll(Duration::from_secs(20), || {
        http_get(port, "/").filter(|r| r.status == 200)
    })
    .expect("answers");
    let pid = wait_status(&s, "keep", |i| {
        i["pid"].as_u64().is_some_and(|p| p > 0) && i["status"] == "running"
    })["pid"]
        .as_u64();
    s.crash_and_restart();
    let i = wait_status(&s, "keep", |i| i["status"] == "running");
    assert_eq!(
        i["pid"].as_u64(),
        pid,
        "the same process was adopted, not restarted"
    );
    assert_eq!(http_get(port, "/").map(|r| r.status), Some(200));
    assert_eq!(cli(BIN, &s, &["stop", "keep"]).0, 0);
    rm_and_assert_gone(&s, "keep", false, pid);
}

#[test]
fn busybox_image_made_by_umoci_and_skopeo_runs_attached() {
    let s = TestServer::start(BIN);
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = slipway_testkit::busybox_layout(tmp.path(), "v1");
    slipway_testkit::run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/busybox:v1", s.host()),
    ]));
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "bb",
            "busybox:v1",
            "--",
            "/bin/busybox",
            "cat",
            "/hello.txt",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "generated for v1\n");
    let (code, _, _) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "bb-fail",
            "busybox:v1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "exit 7",
        ],
    );
    assert_eq!(code, 7, "the container's exit code is the command's");
    for n in ["bb", "bb-fail"] {
        rm_and_assert_gone(&s, n, false, None);
    }
}

#[test]
fn zstd_layers_read_only_rootfs_and_named_volumes_work() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "tools:zstd", &["--compression", "zstd"]);
    let m = s.get("/v2/tools/manifests/zstd").json();
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "writer",
            "--read-only",
            "--volume",
            "shared:/data",
            "tools:zstd",
            "--",
            "sh",
            "-c",
            "echo kept > /data/note && (touch /rootfs-write 2>/dev/null && echo writable || echo read-only)",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "read-only");
    rm_and_assert_gone(&s, "writer", false, None);
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "reader",
            "--volume",
            "shared:/data",
            "tools:zstd",
            "--",
            "cat",
            "/data/note",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "kept",
        "the named volume outlived its first container"
    );
    rm_and_assert_gone(&s, "reader", false, None);
}

#[test]
fn logs_rotate_past_their_size_limit() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[runtime]\nlog_max_bytes = 4096\nlog_files = 2\nlog_check_interval = \"200ms\"\n",
    )
    .expect("write");
    let s = TestServer::start_with(BIN, &["--config", cfg.to_str().expect("utf8")]);
    pack_busybox(&s, "tools:1", &[]);
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--name",
            "chatty",
            "tools:1",
            "--",
            "sh",
            "-c",
            "while true; do echo 0123456789012345678901234567890123456789; usleep 2000; done",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let cdir = s.data.join("runtime/containers/chatty");
    poll(Duration::from_secs(30), || {
        (cdir.join("container.log.2").exists()).then_some(())
    })
    .expect("rotated twice");
    assert!(
        !cdir.join("container.log.3").exists(),
        "only log_files rotations are kept"
    );
    let (_, logs, _) = cli(BIN, &s, &["logs", "chatty"]);
    assert!(logs.contains("0123456789"), "the live log still has output");
    rm_and_assert_gone(&s, "chatty", true, None);
}

#[test]
fn images_run_from_another_registry() {
    let s = TestServer::start(BIN);
    let dist = slipway_testkit::Distribution::start().expect("Distribution starts");
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = slipway_testkit::busybox_layout(tmp.path(), "remote");
    slipway_testkit::run(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:remote", layout.display()),
        &format!("docker://{}/busybox:remote", dist.host),
    ]));
    let result = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "remote",
            &format!("{}/busybox:remote", dist.host),
            "--",
            "/bin/busybox",
            "cat",
            "/hello.txt",
        ],
    );
    drop(dist);
    let (code, out, err) = result;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "generated for remote\n");
    rm_and_assert_gone(&s, "remote", false, None);
}

#[test]
fn pack_on_a_base_image_and_image_ls_and_inspect() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "base:1", &["--env", "FROM_BASE=yes"]);
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("greeting"), "hi from the top layer\n").expect("write");
    let input = format!("{}:/etc/greeting", dir.path().join("greeting").display());
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "image",
            "pack",
            "-q",
            "--tag",
            "app:1",
            "--from",
            "base:1",
            "--cmd",
            "cat",
            "--cmd",
            "/etc/greeting",
            &input,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(BIN, &s, &["image", "inspect", "app:1"]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        j["manifest"]["layers"].as_array().map(Vec::len),
        Some(2),
        "base layer + new layer"
    );
    assert!(
        j["config"]["config"]["Env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e == "FROM_BASE=yes")
    );
    assert_eq!(
        j["config"]["config"]["Entrypoint"],
        serde_json::json!(["/bin/busybox"])
    );
    let (_, ls, _) = cli(BIN, &s, &["image", "ls", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&ls).expect("json");
    let names: Vec<String> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["repository"].as_str().unwrap_or(""),
                r["tag"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(names, ["app:1", "base:1"]);
    let (code, out, err) = cli(BIN, &s, &["run", "--name", "layered", "app:1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "hi from the top layer\n");
    rm_and_assert_gone(&s, "layered", false, None);
}

#[test]
fn an_index_runs_its_linux_amd64_manifest() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "multi:amd64", &["--cmd", "true"]);
    let m = s.get("/v2/multi/manifests/amd64");
    let digest = m
        .header("docker-content-digest")
        .expect("digest")
        .to_owned();
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        m.body.len()
    );
    let r = s.request(
        "PUT",
        "/v2/multi/manifests/v1",
        &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
        index.as_bytes(),
    );
    assert_eq!(r.status, 201);
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "fromindex",
            "multi:v1",
            "--",
            "echo",
            "picked",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "picked\n");
    assert_eq!(info(&s, "fromindex")["image_digest"], digest.as_str());
    rm_and_assert_gone(&s, "fromindex", false, None);
    assert_eq!(s.push_index("multi", "arm", "amd64", "arm64"), 201);
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "multi:arm"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no linux/amd64 manifest") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn stop_sends_the_image_stop_signal_or_the_requested_one_before_sigkill() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "sig:1", &["--stop-signal", "SIGUSR1"]);
    pack_busybox(&s, "plain:1", &[]);
    // As PID 1, sh ignores every signal it has no trap for: only USR1 ends it.
    let script = "trap 'exit 0' USR1; while true; do sleep 0.1; done";
    let run = |name: &str, image: &str, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, "--", "sh", "-c", script]);
        let (code, _, err) = cli(BIN, &s, &args);
        assert_eq!(code, 0, "{err}");
        wait_status(&s, name, |i| i["status"] == "running");
    };
    run("viaimage", "sig:1", &[]);
    run("viaflag", "plain:1", &["--stop-signal", "SIGUSR1"]);
    run("default", "plain:1", &[]);
    assert_eq!(
        info(&s, "viaimage")["stop_signal"],
        10,
        "the image's StopSignal"
    );
    assert_eq!(info(&s, "default")["stop_signal"], 15, "SIGTERM by default");
    for name in ["viaimage", "viaflag"] {
        let t = std::time::Instant::now();
        let (code, _, err) = cli(BIN, &s, &["stop", name, "-t", "20"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            t.elapsed()
        );
        assert_eq!(info(&s, name)["exit_code"], 0, "{name} exited by its trap");
    }
    let (code, _, err) = cli(BIN, &s, &["stop", "default", "-t", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        info(&s, "default")["exit_code"],
        137,
        "SIGTERM ignored: SIGKILL after the grace"
    );
    for name in ["viaimage", "viaflag", "default"] {
        rm_and_assert_gone(&s, name, false, None);
    }
}

#[test]
fn containers_get_dockers_default_capabilities_and_seccomp_refuses_what_the_profile_forbids() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "caps:1", &[]);
    let script = "touch /tmp/f && chown 33:33 /tmp/f && stat -c owner=%u:%g /tmp/f; \
                  grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
                  grep CapEff /proc/self/status; \
                  unshare -U true 2>&1; echo unshare-exit=$?; \
                  su -s /bin/busybox nobody -c 'true' 2>&1; echo su-ran";
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "caps",
            "caps:1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("owner=33:33"), "CAP_CHOWN works: {out}");
    assert!(out.contains("Seccomp:\t2"), "a seccomp filter is on: {out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    // Docker's default set is 0x00000000a80425fb.
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(
        out.contains("Operation not permitted") && !out.contains("unshare-exit=0"),
        "unshare(CLONE_NEWUSER) is refused with EPERM: {out}"
    );
    // cap_drop ALL with one cap_add leaves exactly that one.
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "caps2",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "KILL",
            "caps:1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "grep CapEff /proc/self/status; chown 1 /tmp 2>&1; echo chown-exit=$?",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CapEff:\t0000000000000020"), "{out}");
    assert!(out.contains("chown-exit=1"), "{out}");
    let (code, _, err) = cli(
        BIN,
        &s,
        &["run", "--name", "caps3", "--cap-add", "FLY", "caps:1"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("cap_add: unknown capability"), "{err}");
    for n in ["caps", "caps2"] {
        rm_and_assert_gone(&s, n, false, None);
    }
}

/// The Debian 12 root with nginx-light that `scripts/build-nginx-rootfs` keeps
/// (built on first use).
fn nginx_rootfs() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/build-nginx-rootfs"
    );
    let out = slipway_testkit::run(&mut Command::new(script));
    PathBuf::from(out.trim())
}

#[test]
fn debians_own_nginx_runs_chowns_its_dirs_and_switches_workers_to_www_data() {
    let root = nginx_rootfs();
    let s = TestServer::start(BIN);
    let port = slipway_testkit::free_port();
    let conf_dir = tempfile::tempdir().expect("tmp");
    let conf = conf_dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user www-data;\nworker_processes 2;\npid /run/nginx.pid;\nerror_log stderr notice;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"nginx ok\\n\"; }} }} }}\n"
        ),
    )
    .expect("conf");
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "image",
            "pack",
            "-q",
            "--tag",
            "nginx:bookworm",
            "--compression",
            "zstd",
            "--entrypoint",
            "/usr/sbin/nginx",
            "--cmd=-c",
            "--cmd",
            "/etc/slipway-test/nginx.conf",
            "--cmd=-g",
            "--cmd",
            "daemon off;",
            &format!("{}:/", root.display()),
            &format!("{}:/etc/slipway-test/nginx.conf", conf.display()),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--name", "nginx", "nginx:bookworm"]);
    assert_eq!(code, 0, "{err}");
    let served = poll(Duration::from_secs(30), || {
        slipway_testkit::http_get(port, "/").filter(|r| r.status == 200)
    });
    let (_, logs, _) = cli(BIN, &s, &["logs", "nginx"]);
    let served = served.unwrap_or_else(|| panic!("nginx never answered; its log:\n{logs}"));
    assert_eq!(String::from_utf8_lossy(&served.body), "nginx ok\n");
    assert!(!logs.contains("Operation not permitted"), "{logs}");
    // Its workers run as www-data (uid 33): find them through the container's cgroup.
    let info = s.get("/api/v1/containers/nginx").json();
    let pid = info["pid"].as_u64().expect("pid");
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let uids: Vec<String> = children
        .split_whitespace()
        .filter_map(|c| std::fs::read_to_string(format!("/proc/{c}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(uids.len(), 2, "two workers: {uids:?}");
    assert!(
        uids.iter()
            .all(|u| u.split_whitespace().nth(1) == Some("33")),
        "{uids:?}"
    );
    rm_and_assert_gone(&s, "nginx", true, None);

    // The same image in a user namespace: www-data is host uid 1000000033.
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--userns",
            "--name",
            "nginx-uns",
            "nginx:bookworm",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let served = poll(Duration::from_secs(30), || {
        slipway_testkit::http_get(port, "/").filter(|r| r.status == 200)
    });
    let (_, logs, _) = cli(BIN, &s, &["logs", "nginx-uns"]);
    assert!(
        served.is_some(),
        "nginx in a user namespace never answered; its log:\n{logs}"
    );
    let pid = s.get("/api/v1/containers/nginx-uns").json()["pid"]
        .as_u64()
        .expect("pid");
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let worker_uid = children
        .split_whitespace()
        .filter_map(|c| std::fs::read_to_string(format!("/proc/{c}/status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_owned)
        })
        .next()
        .unwrap_or_default();
    assert_eq!(
        worker_uid.split_whitespace().nth(1),
        Some("1000000033"),
        "{worker_uid}"
    );
    rm_and_assert_gone(&s, "nginx-uns", true, None);
}

#[test]
fn a_user_namespaced_container_is_root_inside_and_an_unprivileged_uid_outside() {
    let s = TestServer::start(BIN);
    pack_busybox(&s, "userns:1", &[]);
    let script = "cat /proc/self/uid_map; id -u; touch /written && echo wrote; \
                  chown 33 /written && stat -c owner=%u /written; sleep 30";
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "-d",
            "--name",
            "uns",
            "--userns",
            "userns:1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let out = poll(Duration::from_secs(20), || {
        let (_, out, _) = cli(BIN, &s, &["logs", "uns"]);
        out.contains("owner=").then_some(out)
    })
    .unwrap_or_else(|| panic!("{:?}", cli(BIN, &s, &["logs", "uns"])));
    assert!(out.contains("0 1000000000      65536"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "0"), "root inside: {out}");
    assert!(out.contains("wrote") && out.contains("owner=33"), "{out}");
    // Outside, its processes belong to the shifted uid.
    let pid = info(&s, "uns")["pid"].as_u64().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("uid line");
    assert_eq!(uid.split_whitespace().nth(1), Some("1000000000"), "{uid}");
    rm_and_assert_gone(&s, "uns", true, None);
}
