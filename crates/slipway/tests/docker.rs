//! The docker CLI and dockerd (Debian's docker.io, on a private socket) against
//! Slipway with authentication on: `docker login`, push and pull.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slipway_testkit::{TestServer, poll};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

/// A dockerd of our own, stopped by PID on drop.
struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    /// Whether dockerd's `docker` cgroups existed before it started (else they
    /// are removed after it).
    cgroups_before: bool,
}

fn docker_cgroups() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("docker"))
        .filter(|p| p.is_dir())
        .collect()
}

impl Dockerd {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path();
        let cgroups_before = !docker_cgroups().is_empty();
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", p.join("docker.sock").display()))
            .arg("--data-root")
            .arg(p.join("root"))
            .arg("--exec-root")
            .arg(p.join("exec"))
            .arg("--pidfile")
            .arg(p.join("docker.pid"))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver",
                "vfs",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dockerd from docker.io");
        let d = Self {
            child,
            dir,
            cgroups_before,
        };
        poll(Duration::from_secs(60), || {
            d.docker(&["version"]).status.success().then_some(())
        })
        .expect("dockerd answers");
        d
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        self.docker_in(args, None)
    }

    fn docker_in(&self, args: &[&str], stdin: Option<&Path>) -> std::process::Output {
        let mut c = Command::new("docker");
        c.arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args)
            .env("DOCKER_CONFIG", self.config());
        if let Some(f) = stdin {
            c.stdin(std::fs::File::open(f).expect("stdin"));
        }
        c.output().expect("docker")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if poll(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.cgroups_before {
            for d in docker_cgroups() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

fn ok(o: &std::process::Output) -> bool {
    o.status.success()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn docker_logs_in_pushes_and_pulls_and_is_refused_without_credentials() {
    let s = TestServer::start_secure(BIN, &[]);
    let auth = slipway_testkit::basic(slipway_testkit::ADMIN.0, slipway_testkit::ADMIN.1);
    let r = s.request(
        "POST",
        "/api/v1/users",
        &[("authorization", &auth), ("content-type", "application/json")],
        br#"{"name":"dev","password":"dev-password","rights":{"grants":[{"kind":"repository","glob":"team/*","role":"developer"}]}}"#,
    );
    assert_eq!(r.status, 201);
    let d = Dockerd::start();
    // An image of busybox, imported from a root filesystem tarball.
    let rootfs = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(rootfs.path().join("bin")).expect("bin");
    std::fs::copy("/bin/busybox", rootfs.path().join("bin/busybox")).expect("busybox");
    let tarball = rootfs.path().join("rootfs.tar");
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(rootfs.path())
            .args(["-cf"])
            .arg(&tarball)
            .arg("bin")
            .status()
            .expect("tar")
            .success()
    );
    let image = format!("{}/team/bb:1", s.host());
    let out = d.docker_in(&["import", "-", &image], Some(&tarball));
    assert!(ok(&out), "{}", text(&out));

    let out = d.docker(&["push", &image]);
    assert!(!ok(&out), "a push without login is refused: {}", text(&out));
    let out = d.docker(&["login", "-u", "dev", "-p", "wrong-password", &s.host()]);
    assert!(!ok(&out), "a wrong password is refused: {}", text(&out));
    let out = d.docker(&["login", "-u", "dev", "-p", "dev-password", &s.host()]);
    assert!(ok(&out), "{}", text(&out));
    // The login is persistent: docker stored a refresh (identity) token, not the password.
    let cfg = std::fs::read_to_string(d.config().join("config.json")).expect("config");
    assert!(cfg.contains("identitytoken"), "{cfg}");
    assert!(!cfg.contains("dev-password"));
    let out = d.docker(&["push", &image]);
    assert!(ok(&out), "{}", text(&out));
    let out = d.docker(&["rmi", &image]);
    assert!(ok(&out), "{}", text(&out));
    let out = d.docker(&["pull", &image]);
    assert!(ok(&out), "{}", text(&out));
    // Outside its grant the developer is denied.
    let other = format!("{}/other/bb:1", s.host());
    assert!(ok(&d.docker(&["tag", &image, &other])));
    let out = d.docker(&["push", &other]);
    assert!(!ok(&out), "{}", text(&out));
    assert!(text(&out).contains("denied"), "{}", text(&out));
    let out = d.docker(&["logout", &s.host()]);
    assert!(ok(&out));
    let _ = d.docker(&["rmi", "-f", &image, &other]);
}
