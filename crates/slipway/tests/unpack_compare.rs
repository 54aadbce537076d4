//! Layers with whiteouts, opaque directories, hardlinks and symlinks unpack to
//! exactly the tree `umoci unpack` produces from the same image.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use slipway_testkit::{TestServer, cli, poll, run, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        h.set_size(0);
        self.0
            .append_data(&mut h, path, std::io::empty())
            .expect("dir");
        self
    }

    fn file(&mut self, path: &str, body: &[u8], mode: u32, uid: u64) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid);
        h.set_size(body.len() as u64);
        self.0.append_data(&mut h, path, body).expect("file");
        self
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, 0o777, 0);
        h.set_size(0);
        self.0.append_link(&mut h, path, target).expect("link");
        self
    }

    /// The gzip'd layer and its diff_id (digest of the uncompressed tar).
    fn gzip(self) -> (Vec<u8>, String) {
        let tar = self.0.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        (gz.finish().expect("gzip"), sha256(&tar))
    }
}

fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("prefix").display().to_string();
            let m = std::fs::symlink_metadata(&p).expect("meta");
            let ft = m.file_type();
            let owner = format!("{:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid());
            let d = if ft.is_dir() {
                stack.push(p.clone());
                format!("dir {owner}")
            } else if ft.is_symlink() {
                format!(
                    "symlink -> {} {}:{}",
                    std::fs::read_link(&p).expect("link").display(),
                    m.uid(),
                    m.gid()
                )
            } else if ft.is_file() {
                format!("file {owner} {}", sha256(&std::fs::read(&p).expect("read")))
            } else if ft.is_char_device() {
                format!("chardev {}", m.rdev())
            } else {
                format!("other {owner}")
            };
            out.insert(rel, d);
        }
    }
    out
}

#[test]
fn layered_fixture_unpacks_to_the_same_tree_as_umoci() {
    let s = TestServer::start(BIN);
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let mut l1 = Layer::new();
    l1.dir("bin/")
        .file("bin/busybox", &busybox, 0o755, 0)
        .dir("etc/")
        .file("etc/keep.conf", b"keep", 0o644, 0)
        .file("etc/remove.conf", b"remove me", 0o644, 0)
        .dir("opq/")
        .file("opq/old1", b"old", 0o644, 0)
        .dir("opq/sub/")
        .file("opq/sub/old2", b"old2", 0o600, 0)
        .dir("data/")
        .file("data/file", b"payload", 0o640, 1000)
        .link(tar::EntryType::Symlink, "data/sym", "file")
        .dir("usr/")
        .dir("usr/share/")
        .file("usr/share/readme", b"doc", 0o644, 0);
    let mut l2 = Layer::new();
    l2.file("etc/.wh.remove.conf", b"", 0o644, 0)
        .dir("opq/")
        .file("opq/.wh..wh..opq", b"", 0o644, 0)
        .file("opq/new", b"new", 0o644, 0)
        .link(tar::EntryType::Link, "data/hard", "data/file")
        .link(tar::EntryType::Symlink, "data/sym2", "../etc/keep.conf")
        .file("usr/.wh.share", b"", 0o644, 0);
    let mut l3 = Layer::new();
    l3.file("data/inlayer", b"x", 0o644, 2000)
        .link(tar::EntryType::Link, "data/inlayer2", "data/inlayer")
        .file("etc/keep.conf", b"keep, changed", 0o600, 0)
        .dir("usr/share/")
        .dir("usr/share/again/")
        .file("usr/share/again/file", b"back", 0o644, 0)
        .file("data/sym", b"now a file", 0o644, 0);
    let (layers, diff_ids): (Vec<Vec<u8>>, Vec<String>) =
        [l1.gzip(), l2.gzip(), l3.gzip()].into_iter().unzip();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sleep", "600"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let c = s.push_blob("fixture", config.as_bytes());
    let descs: Vec<String> = layers
        .iter()
        .map(|l| {
            let d = s.push_blob("fixture", l);
            format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{}}}"#, l.len())
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        descs.join(",")
    );
    let r = s.request(
        "PUT",
        "/v2/fixture/manifests/v1",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        manifest.as_bytes(),
    );
    assert_eq!(r.status, 201);

    // umoci's view of the same image.
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = tmp.path().join("layout");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/fixture:v1", s.host()),
        ])
        .arg(format!("oci:{}:v1", layout.display())));
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle));
    let expected = describe(&bundle.join("rootfs"));

    // Slipway's view: the container's overlay root filesystem.
    let (code, _, err) = cli(BIN, &s, &["run", "-d", "--name", "fx", "fixture:v1"]);
    assert_eq!(code, 0, "{err}");
    poll(Duration::from_secs(20), || {
        (s.get("/api/v1/containers/fx").json()["status"] == "running").then_some(())
    })
    .expect("running");
    let mut actual = describe(&s.data.join("runtime/containers/fx/bundle/rootfs"));
    // Mount points runc creates for /proc, /dev, /sys and /tmp are not image content.
    for top in ["proc", "dev", "sys", "tmp"] {
        if !expected.contains_key(top) {
            actual.retain(|k, _| k != top && !k.starts_with(&format!("{top}/")));
        }
    }
    assert_eq!(actual, expected);
    assert!(
        expected.contains_key("data/hard")
            && !expected.contains_key("etc/remove.conf")
            && !expected.contains_key("opq/old1")
    );
    let (code, _, _) = cli(BIN, &s, &["rm", "-f", "fx"]);
    assert_eq!(code, 0);
}
