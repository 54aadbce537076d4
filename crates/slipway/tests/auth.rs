//! Authentication and authorisation, end to end: every route against every kind
//! of principal, real clients logging in, containers calling the admin API, and
//! push triggers gated by the pusher's rights.

use std::process::Command;
use std::time::Duration;

use slipway_testkit::{ADMIN, Response, TestServer, basic, cli, cli_with, poll};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn as_admin(s: &TestServer, method: &str, path: &str, body: &str) -> Response {
    let auth = basic(ADMIN.0, ADMIN.1);
    s.request(
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
}

fn add_user(s: &TestServer, name: &str, rights: &str) {
    let r = as_admin(
        s,
        "POST",
        "/api/v1/users",
        &format!(r#"{{"name":"{name}","password":"{name}-password","rights":{rights}}}"#),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

fn everywhere(role: &str) -> String {
    format!(
        r#"{{"grants":[{{"kind":"repository","glob":"*","role":"{role}"}},{{"kind":"service","glob":"*","role":"{role}"}}]}}"#
    )
}

fn token(s: &TestServer, name: &str, rights: &str, expires: Option<u64>) -> String {
    let exp = expires.map_or("null".to_owned(), |e| e.to_string());
    let r = as_admin(
        s,
        "POST",
        "/api/v1/tokens",
        &format!(r#"{{"name":"{name}","rights":{rights},"expires_in_s":{exp}}}"#),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("token").to_owned()
}

const ZERO: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn every_route_answers_each_principal_as_its_role_allows() {
    // This test fails hundreds of logins on purpose: lift the per-address limit.
    let cfg = tempfile::tempdir().expect("tmp");
    let file = cfg.path().join("slipway.toml");
    std::fs::write(&file, "[auth]\nlogin_failures = 100000\n").expect("config");
    let s = TestServer::start_secure(BIN, &["--config", file.to_str().expect("utf8")]);
    slipway_testkit::pack_busybox(BIN, &s, "team/app:v1", &[]);
    for role in ["reader", "developer", "deployer", "maintainer"] {
        add_user(&s, role, &everywhere(role));
    }
    let scoped = token(
        &s,
        "ci",
        r#"{"grants":[{"kind":"repository","glob":"team/app","role":"developer"},{"kind":"service","glob":"app","role":"deployer"}]}"#,
        None,
    );
    let revoked = token(&s, "old", &everywhere("admin"), None);
    assert_eq!(as_admin(&s, "DELETE", "/api/v1/tokens/old", "").status, 200);
    let expired = token(&s, "brief", &everywhere("admin"), Some(1));

    // (method, path, body, expected for reader, developer, deployer, maintainer,
    // admin, scoped token); 'A' = allowed (any answer but 401/403), '3' = 403.
    let routes: &[(&str, String, &str, &str)] = &[
        ("GET", "/v2/".into(), "", "AAAAAA"),
        ("GET", "/v2/_catalog".into(), "", "AAAAAA"),
        ("GET", "/v2/team/app/tags/list".into(), "", "AAAAAA"),
        ("HEAD", "/v2/team/app/manifests/v1".into(), "", "AAAAAA"),
        ("GET", "/v2/other/x/tags/list".into(), "", "AAAAA3"),
        ("POST", "/v2/team/app/blobs/uploads/".into(), "", "3A3AAA"),
        ("POST", "/v2/other/x/blobs/uploads/".into(), "", "3A3AA3"),
        (
            "DELETE",
            format!("/v2/team/app/manifests/{ZERO}"),
            "",
            "333AA3",
        ),
        ("GET", "/api/v1/status".into(), "", "AAAAAA"),
        ("GET", "/api/v1/services/app".into(), "", "AAAAAA"),
        ("GET", "/api/v1/services/web".into(), "", "AAAAA3"),
        (
            "POST",
            "/api/v1/services/app/scale".into(),
            r#"{"replicas":2}"#,
            "33AAAA",
        ),
        (
            "POST",
            "/api/v1/services/web/scale".into(),
            r#"{"replicas":2}"#,
            "33AAA3",
        ),
        (
            "POST",
            "/api/v1/services/app/rollback".into(),
            "{}",
            "33AAAA",
        ),
        ("POST", "/api/v1/services/app/pause".into(), "", "33AAAA"),
        ("GET", "/api/v1/services/app/logs".into(), "", "33AAAA"),
        ("DELETE", "/api/v1/services/app".into(), "", "333AA3"),
        ("GET", "/api/v1/containers/app".into(), "", "AAAAAA"),
        ("POST", "/api/v1/containers/app/stop".into(), "", "333AA3"),
        ("DELETE", "/api/v1/containers/app".into(), "", "333AA3"),
        (
            "POST",
            "/api/v1/containers".into(),
            r#"{"name":"c1","image":"team/app:v1"}"#,
            "333AA3",
        ),
        ("POST", "/api/v1/gc?dry_run=true".into(), "", "3333A3"),
        ("GET", "/api/v1/users".into(), "", "3333A3"),
        ("GET", "/api/v1/tokens".into(), "", "3333A3"),
        ("GET", "/api/v1/audit".into(), "", "3333A3"),
        ("GET", "/metrics".into(), "", "3333A3"),
    ];
    let principals: Vec<(String, String)> = ["reader", "developer", "deployer", "maintainer"]
        .iter()
        .map(|r| (r.to_string(), basic(r, &format!("{r}-password"))))
        .chain([
            ("admin".to_owned(), basic(ADMIN.0, ADMIN.1)),
            ("scoped token".to_owned(), format!("Bearer {scoped}")),
        ])
        .collect();
    // The expired token's second has passed once it is refused.
    assert!(
        poll(Duration::from_secs(5), || {
            let r = s.request(
                "GET",
                "/v2/",
                &[("authorization", &format!("Bearer {expired}"))],
                b"",
            );
            (r.status == 401).then_some(())
        })
        .is_some(),
        "the 1 s token expires"
    );
    let mut failures = Vec::new();
    for (method, path, body, expected) in routes {
        let with = |auth: Option<&str>| {
            let mut h = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                h.push(("authorization", a));
            }
            s.request(method, path, &h, body.as_bytes())
        };
        for (who, auth) in [
            ("anonymous", None),
            ("revoked token", Some(format!("Bearer {revoked}"))),
            ("expired token", Some(format!("Bearer {expired}"))),
            (
                "wrong password",
                Some(basic("developer", "not-the-password")),
            ),
        ] {
            let r = with(auth.as_deref());
            if r.status != 401 {
                failures.push(format!("{who} {method} {path}: {} (want 401)", r.status));
            }
        }
        for ((who, auth), want) in principals.iter().zip(expected.chars()) {
            let r = with(Some(auth));
            let ok = match want {
                'A' => r.status != 401 && r.status != 403,
                _ => r.status == 403,
            };
            if !ok {
                failures.push(format!(
                    "{who} {method} {path}: {} (want {want}) {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The catalog shows each principal what it may pull.
    let cat = |auth: &str| {
        s.request("GET", "/v2/_catalog", &[("authorization", auth)], b"")
            .json()["repositories"]
            .clone()
    };
    slipway_testkit::pack_busybox(BIN, &s, "other/x:1", &[]);
    assert_eq!(
        cat(&format!("Bearer {scoped}")),
        serde_json::json!(["team/app"])
    );
    assert_eq!(
        cat(&basic(ADMIN.0, ADMIN.1)),
        serde_json::json!(["other/x", "team/app"])
    );
    // A token with only the metrics scope reads /metrics and nothing else.
    let scraper = format!(
        "Bearer {}",
        token(&s, "prometheus", r#"{"metrics":true}"#, None)
    );
    let h = [("authorization", scraper.as_str())];
    assert_eq!(s.request("GET", "/metrics", &h, b"").status, 200);
    assert_eq!(
        s.request("GET", "/v2/team/app/tags/list", &h, b"").status,
        403
    );
    assert_eq!(s.request("GET", "/api/v1/users", &h, b"").status, 403);

    // The two error shapes, and the challenge that starts the token flow.
    let r = s.get("/v2/team/app/manifests/v1");
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    let c = r.header("www-authenticate").expect("challenge");
    assert!(
        c.starts_with("Bearer realm=\"http://")
            && c.contains("/auth/token\",service=\"slipway\",scope=\"repository:team/app:pull\""),
        "{c}"
    );
    let r = s.request(
        "GET",
        "/v2/other/x/tags/list",
        &[("authorization", &format!("Bearer {scoped}"))],
        b"",
    );
    assert_eq!(r.error_code(), "DENIED");
    let r = s.get("/api/v1/containers");
    assert_eq!(r.json()["error"]["kind"], "unauthenticated");
    let r = s.request(
        "GET",
        "/api/v1/users",
        &[("authorization", &basic("reader", "reader-password"))],
        b"",
    );
    assert_eq!(r.json()["error"]["kind"], "permission_denied");
}

#[test]
fn registry_tokens_carry_only_the_asked_and_allowed_scopes() {
    let s = TestServer::start_secure(BIN, &[]);
    add_user(
        &s,
        "dev",
        r#"{"grants":[{"kind":"repository","glob":"team/*","role":"developer"}]}"#,
    );
    let auth = basic("dev", "dev-password");
    let r = s.request(
        "GET",
        "/auth/token?service=slipway&scope=repository:team/a:pull,push&scope=repository:other/b:pull&offline_token=true",
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let jwt = j["token"].as_str().expect("token").to_owned();
    assert_eq!(j["access_token"], j["token"]);
    assert!(
        j["refresh_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("slr_"))
    );
    let bearer = format!("Bearer {jwt}");
    let h = [("authorization", bearer.as_str())];
    assert_eq!(
        s.request("GET", "/v2/team/a/tags/list", &h, b"").status,
        404,
        "allowed: the repository is empty"
    );
    assert_eq!(
        s.request("GET", "/v2/team/b/tags/list", &h, b"").status,
        403,
        "a token for A cannot pull B"
    );
    assert_eq!(
        s.request("GET", "/v2/other/b/tags/list", &h, b"").status,
        403
    );
    // The OAuth2 form: password, then refresh.
    let form = "grant_type=password&username=dev&password=dev-password&service=slipway&scope=repository%3Ateam%2Fa%3Apull&access_type=offline&client_id=test";
    let r = s.request(
        "POST",
        "/auth/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let refresh = r.json()["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_owned();
    let form = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service=slipway&scope=repository%3Ateam%2Fa%3Apush&client_id=test"
    );
    let r = s.request(
        "POST",
        "/auth/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let bad = "grant_type=password&username=dev&password=wrong&service=slipway";
    let r = s.request(
        "POST",
        "/auth/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        bad.as_bytes(),
    );
    assert_eq!(r.status, 401);
    // The key is published.
    let jwks = s.get("/auth/jwks.json").json();
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    // A JWT with alg none made from a real one is refused.
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    parts[0] = "eyJhbGciOiJub25lIn0".into(); // {"alg":"none"}
    parts[2] = String::new();
    let forged = format!("Bearer {}", parts.join("."));
    assert_eq!(
        s.request(
            "GET",
            "/v2/team/a/tags/list",
            &[("authorization", &forged)],
            b""
        )
        .status,
        401
    );
}

#[test]
fn cli_login_stores_a_private_token_and_every_command_uses_it() {
    let s = TestServer::start_secure(BIN, &[]);
    let home = tempfile::tempdir().expect("tmp");
    let cfg = home.path().join("cfg");
    let cfg_s = cfg.to_str().expect("utf8");
    // No token: refused with the exit code of "denied".
    let env_none = [("XDG_CONFIG_HOME", cfg_s), ("SLIPWAY_TOKEN", "")];
    let (code, _, err) = cli_with(BIN, &s, &["ps"], &env_none, None);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("slipway login"), "{err}");
    let (code, _, err) = cli_with(
        BIN,
        &s,
        &["login", "-u", ADMIN.0, "--password-stdin"],
        &env_none,
        Some("wrong-password\n"),
    );
    assert_eq!(code, 77, "{err}");
    let (code, out, err) = cli_with(
        BIN,
        &s,
        &["login", "-u", ADMIN.0, "--password-stdin"],
        &env_none,
        Some(&format!("{}\n", ADMIN.1)),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("logged in"), "{out}");
    let file = cfg.join("slipway/credentials.json");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&file)
        .expect("stored")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let (code, out, err) = cli_with(BIN, &s, &["whoami"], &env_none, None);
    assert_eq!((code, out.trim()), (0, "admin (via login)"), "{err}");
    let (code, out, err) = cli_with(
        BIN,
        &s,
        &[
            "token",
            "create",
            "deployer-ci",
            "--service",
            "app=deployer",
            "--repo",
            "team/app=reader",
            "--expires",
            "1h",
        ],
        &env_none,
        None,
    );
    assert_eq!(code, 0, "{err}");
    let ci = out.trim().to_owned();
    assert!(ci.starts_with("slw_"), "{out}");
    // SLIPWAY_TOKEN overrides the stored login.
    let env_ci = [("XDG_CONFIG_HOME", cfg_s), ("SLIPWAY_TOKEN", ci.as_str())];
    let (code, out, _) = cli_with(BIN, &s, &["whoami"], &env_ci, None);
    assert_eq!((code, out.trim()), (0, "token:deployer-ci (via api-token)"));
    let (code, _, err) = cli_with(BIN, &s, &["scale", "other", "2"], &env_ci, None);
    assert_eq!(code, 77, "a deploy token for app cannot scale other: {err}");
    let (code, out, _) = cli_with(BIN, &s, &["user", "ls"], &env_none, None);
    assert_eq!(code, 0);
    assert!(out.contains("admin"), "{out}");
    let (code, out, _) = cli_with(BIN, &s, &["audit", "--principal", "admin"], &env_none, None);
    assert_eq!(code, 0);
    assert!(
        out.contains("token.create") && out.contains("token:deployer-ci"),
        "{out}"
    );
    let (code, _, _) = cli_with(BIN, &s, &["logout"], &env_none, None);
    assert_eq!(code, 0);
    let (code, _, _) = cli_with(BIN, &s, &["whoami"], &env_none, None);
    assert_eq!(code, 77);
    // docker's `-p` works too, with a warning.
    let (code, _, err) = cli_with(
        BIN,
        &s,
        &["login", "-u", ADMIN.0, "-p", ADMIN.1],
        &env_none,
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("prefer --password-stdin"), "{err}");
    // Nothing Slipway wrote holds the password or the token in clear.
    let mut hay = Vec::new();
    for entry in walk(&s.data) {
        hay.extend(std::fs::read(entry).unwrap_or_default());
    }
    hay.extend(s.log().join("\n").into_bytes());
    for secret in [ADMIN.1, ci.as_str(), "wrong-password"] {
        assert!(
            !contains(&hay, secret.as_bytes()),
            "{secret:?} was written somewhere"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_container_started_by_slipway_gets_401_from_the_admin_api_and_sees_no_credentials() {
    let s = TestServer::start_secure(BIN, &[]);
    let out = probe_admin_api_from_a_container(&s);
    let token = s.admin_token.clone().expect("token");
    assert!(
        !out.contains(&token) && !out.contains("SLIPWAY"),
        "the container saw the daemon's or the CLI's credentials: {out}"
    );
}

/// Runs a busybox container that prints its environment and then GETs
/// `/api/v1/containers`; asserts the API answered it 401; returns its output.
fn probe_admin_api_from_a_container(s: &TestServer) -> String {
    slipway_testkit::pack_busybox(BIN, s, "tools:1", &[]);
    let url = format!("http://{}/api/v1/containers", s.host());
    let script = format!("env; wget -q -O - {url} 2>&1; echo wget-exit=$?");
    let (code, out, err) = cli(
        BIN,
        s,
        &[
            "run",
            "--name",
            "probe",
            "tools:1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("401") && out.contains("wget-exit=1"), "{out}");
    let (code, _, _) = cli(BIN, s, &["rm", "probe"]);
    assert_eq!(code, 0);
    out
}

#[test]
fn a_push_by_a_developer_without_deploy_rights_does_not_roll_out_and_the_events_say_why() {
    let s = TestServer::start_secure(BIN, &[]);
    slipway_testkit::pack_hello(BIN, &s, "team/hello:1.0.0", "1.0.0");
    let dir = tempfile::tempdir().expect("tmp");
    let port = slipway_testkit::free_port();
    let spec = format!(
        "name = \"app\"\nimage = \"team/hello:1.0.0\"\nreplicas = 1\n[ingress]\nlisten = \"127.0.0.1:{port}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n[trigger]\nsemver = \"^1\"\n"
    );
    let path = dir.path().join("app.toml");
    std::fs::write(&path, spec).expect("write");
    let (code, _, err) = cli(BIN, &s, &["deploy", path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    let dev = token(
        &s,
        "dev-ci",
        r#"{"grants":[{"kind":"repository","glob":"team/*","role":"developer"}]}"#,
        None,
    );
    let ops = token(&s, "ops-ci", &everywhere("maintainer"), None);
    // Pushes through the CLI, as the given token.
    let push = |version: &str, as_token: &str| {
        let input = format!("{}:/hello", slipway_testkit::hello_bin().display());
        let env = format!("HELLO_VERSION={version}");
        let tag = format!("team/hello:{version}");
        let (code, _, err) = cli_with(
            BIN,
            &s,
            &[
                "image",
                "pack",
                "-q",
                "--tag",
                &tag,
                "--entrypoint",
                "/hello",
                "--env",
                &env,
                "--expose",
                "8080",
                &input,
            ],
            &[("SLIPWAY_TOKEN", as_token)],
            None,
        );
        assert_eq!(code, 0, "{err}");
    };
    push("1.1.0", &dev);
    let events = poll(Duration::from_secs(20), || {
        let (_, out, _) = cli(BIN, &s, &["events", "--service", "app"]);
        out.contains("not rolled out").then_some(out)
    })
    .expect("the refusal is in the events");
    assert!(
        events.contains("token:dev-ci may not deploy service \"app\""),
        "{events}"
    );
    let st = as_admin(&s, "GET", "/api/v1/services/app", "").json();
    assert_eq!(
        st["revisions"].as_array().map(Vec::len),
        Some(1),
        "no new revision: {st}"
    );
    // A maintainer's push rolls out.
    push("1.2.0", &ops);
    assert!(
        poll(Duration::from_secs(30), || {
            let st = as_admin(&s, "GET", "/api/v1/services/app", "").json();
            (st["revisions"].as_array().map(Vec::len) == Some(2)).then_some(())
        })
        .is_some(),
        "the maintainer's push rolls out: {}",
        as_admin(&s, "GET", "/api/v1/services/app", "").json()
    );
    let (code, _, _) = cli(BIN, &s, &["service", "rm", "app"]);
    assert_eq!(code, 0);
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo").args(args).output().expect("skopeo")
}

#[test]
fn skopeo_podman_and_oras_log_in_push_and_pull_and_are_refused_without_credentials() {
    let s = TestServer::start_secure(BIN, &[]);
    add_user(
        &s,
        "dev",
        r#"{"grants":[{"kind":"repository","glob":"*","role":"developer"}]}"#,
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = slipway_testkit::busybox_layout(tmp.path(), "v1");
    let src = format!("oci:{}:v1", layout.display());
    let dst = format!("docker://{}/tools/busybox:v1", s.host());
    // skopeo: refused without and with wrong credentials, then copy --creds.
    let out = skopeo(&["copy", "--dest-tls-verify=false", &src, &dst]);
    assert!(!out.status.success());
    let out = skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "dev:wrong-password",
        &src,
        &dst,
    ]);
    assert!(!out.status.success());
    let out = skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "dev:dev-password",
        &src,
        &dst,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // skopeo login stores the credentials in an auth file.
    let authfile = tmp.path().join("auth.json");
    let af = authfile.to_str().expect("utf8");
    let out = skopeo(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        af,
        "-u",
        "dev",
        "-p",
        "wrong-password",
        &s.host(),
    ]);
    assert!(!out.status.success(), "a wrong password is refused");
    let out = skopeo(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        af,
        "-u",
        "dev",
        "-p",
        "dev-password",
        &s.host(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = skopeo(&["inspect", "--tls-verify=false", "--authfile", af, &dst]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // podman login, pull, push.
    let proot = tmp.path().join("podman");
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(proot.join("root"))
            .arg("--runroot")
            .arg(proot.join("runroot"))
            .args(["--runtime", "runc", "--storage-driver", "vfs"])
            .args(args)
            .env("REGISTRY_AUTH_FILE", tmp.path().join("podman-auth.json"))
            .output()
            .expect("podman")
    };
    let image = format!("{}/tools/busybox:v1", s.host());
    assert!(
        !podman(&["pull", "-q", "--tls-verify=false", &image])
            .status
            .success(),
        "no credentials"
    );
    assert!(
        !podman(&[
            "login",
            "--tls-verify=false",
            "-u",
            "dev",
            "-p",
            "wrong-password",
            &s.host()
        ])
        .status
        .success()
    );
    let out = podman(&[
        "login",
        "--tls-verify=false",
        "-u",
        "dev",
        "-p",
        "dev-password",
        &s.host(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = podman(&["pull", "-q", "--tls-verify=false", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = format!("{}/pod/busybox:v1", s.host());
    assert!(podman(&["tag", &image, &target]).status.success());
    let out = podman(&["push", "-q", "--tls-verify=false", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = podman(&["rmi", "-a", "-f"]);

    // oras (Python) with credentials, refused without and with a wrong password.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/oras_login.py");
    let oras = |repo: &str, user: &str, pw: &str| {
        let work = tempfile::tempdir().expect("tmp");
        // oras-py retries a refused login with backoff for minutes: bound it.
        Command::new("timeout")
            .args(["15", "python3", script, &s.host(), repo, user, pw])
            .arg(work.path())
            .output()
            .expect("python3")
    };
    assert_eq!(
        oras("art/anon", "", "").status.code(),
        Some(3),
        "anonymous is refused"
    );
    let out = oras("art/note", "dev", "dev-password");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = oras("art/wrong", "dev", "wrong-password");
    assert!(!out.status.success(), "a wrong password is refused");
    let tags = as_admin(&s, "GET", "/v2/art/wrong/tags/list", "");
    assert_eq!(
        tags.status, 404,
        "nothing was pushed with the wrong password"
    );
}

#[test]
fn secrets_reach_the_container_as_file_and_env_appear_nowhere_else_and_a_new_value_rolls_out() {
    let s = TestServer::start_secure(BIN, &[]);
    slipway_testkit::pack_hello(BIN, &s, "hello:1", "unused");
    slipway_testkit::pack(
        BIN,
        &s,
        "files:1",
        "/bin/busybox",
        &[
            "--cmd",
            "sh",
            "--cmd=-c",
            "--cmd",
            "exec httpd -f -p $PORT -h /run/secrets",
        ],
        "/bin/busybox:/bin/busybox",
    );
    let set = |name: &str, value: &str| {
        let (code, out, err) = cli_with(BIN, &s, &["secret", "set", name], &[], Some(value));
        assert_eq!(code, 0, "{err}");
        out
    };
    set("greeting", "s3cr3t-greeting-one");
    set("db-password", "s3cr3t-db-pass");
    let dir = tempfile::tempdir().expect("tmp");
    let (p1, p2) = (slipway_testkit::free_port(), slipway_testkit::free_port());
    let web = format!(
        "name = \"web\"\nimage = \"hello:1\"\nreplicas = 2\ndrain_timeout = \"2s\"\n[env]\nHELLO_VERSION = {{ secret = \"greeting\" }}\n[ingress]\nlisten = \"127.0.0.1:{p1}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n"
    );
    let files = format!(
        "name = \"files\"\nimage = \"files:1\"\nsecrets = [\"db-password\"]\n[ingress]\nlisten = \"127.0.0.1:{p2}\"\n[health.readiness]\nhttp = \"/db-password\"\ninterval = \"100ms\"\n"
    );
    for (n, spec) in [("web", &web), ("files", &files)] {
        let path = dir.path().join(format!("{n}.toml"));
        std::fs::write(&path, spec).expect("write");
        let (code, out, err) = cli(BIN, &s, &["deploy", path.to_str().expect("utf8")]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let body = |port: u16, path: &str| {
        slipway_testkit::http_get(port, path)
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default()
    };
    assert!(
        body(p1, "/").starts_with("hello s3cr3t-greeting-one from"),
        "{}",
        body(p1, "/")
    );
    assert_eq!(
        body(p2, "/db-password"),
        "s3cr3t-db-pass",
        "the file is mounted"
    );
    // A new value rolls out a new revision, under load, with no failed request.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match slipway_testkit::http_get(p1, "/") {
                    Some(r) if r.status == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    let out = set("greeting", "s3cr3t-greeting-two");
    assert!(out.contains("rolling: web"), "{out}");
    let rolled = poll(Duration::from_secs(30), || {
        body(p1, "/")
            .starts_with("hello s3cr3t-greeting-two")
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load");
    assert!(rolled.is_some(), "the new value serves");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 10);
    let st = as_admin(&s, "GET", "/api/v1/services/web", "").json();
    assert_eq!(st["revisions"].as_array().map(Vec::len), Some(2), "{st}");
    // A secret in use cannot be removed.
    let (code, _, err) = cli(BIN, &s, &["secret", "rm", "greeting"]);
    assert_eq!(code, 6, "{err}");
    // The values appear nowhere Slipway writes or answers.
    // Everything but the workload's own output (hello prints its version,
    // which this test sets from a secret, when it starts listening).
    let mut hay = Vec::new();
    for f in walk(&s.data) {
        let own_output = f
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("container.log"));
        if !own_output {
            hay.extend(std::fs::read(&f).unwrap_or_default());
        }
    }
    hay.extend(s.log().join("\n").into_bytes());
    for path in [
        "/api/v1/services/web",
        "/api/v1/services/files",
        "/api/v1/services",
        "/api/v1/events",
        "/api/v1/audit",
        "/api/v1/secrets",
        "/api/v1/containers",
    ] {
        hay.extend(as_admin(&s, "GET", path, "").body);
    }
    for args in [
        &["status", "web", "-o", "json"][..],
        &["history", "web"],
        &["events"],
        &["secret", "ls"],
        &["ps"],
    ] {
        let (_, out, err) = cli(BIN, &s, args);
        hay.extend(out.into_bytes());
        hay.extend(err.into_bytes());
    }
    for secret in [
        "s3cr3t-greeting-one",
        "s3cr3t-greeting-two",
        "s3cr3t-db-pass",
    ] {
        assert!(!contains(&hay, secret.as_bytes()), "{secret} leaked");
    }
    for n in ["web", "files"] {
        let (code, _, _) = cli(BIN, &s, &["service", "rm", n]);
        assert_eq!(code, 0);
    }
}

#[test]
fn tls_init_makes_a_ca_the_cli_trusts_for_an_https_listener() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().to_str().expect("utf8");
    let out = Command::new(BIN)
        .args(["tls", "init", "--dir", d, "--host", "slipway.test"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join("server-key.pem"))
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = Command::new(BIN)
        .args(["tls", "init", "--dir", d])
        .output()
        .expect("run");
    assert!(
        !again.status.success(),
        "existing files are kept without --force"
    );
    let cert = format!("{d}/server.pem");
    let key = format!("{d}/server-key.pem");
    let s = TestServer::start_with(BIN, &["--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("https://127.0.0.1:{}", s.addr.port());
    let token = "unused";
    let whoami = |ca: Option<(&str, &str)>| {
        let mut c = Command::new(BIN);
        c.args(["--server", &url, "whoami"])
            .env("SLIPWAY_TOKEN", token)
            .env_remove("SLIPWAY_CA")
            .env_remove("SLIPWAY_CA_FILE");
        match ca {
            Some(("flag", path)) => {
                c.args(["--ca", path]);
            }
            Some((_, path)) => {
                c.env("SLIPWAY_CA", path);
            }
            None => {}
        }
        c.output().expect("run")
    };
    let ca = format!("{d}/ca.pem");
    let out = whoami(Some(("flag", &ca)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("authentication is off"),
        "{out:?}"
    );
    assert!(whoami(Some(("env", &ca))).status.success());
    assert!(
        !whoami(None).status.success(),
        "without the CA the certificate is not trusted"
    );
    let curl = Command::new("curl")
        .args(["-sS", "--cacert", &ca, &format!("{url}/v2/")])
        .output()
        .expect("curl");
    assert!(curl.status.success(), "curl trusts the CA: {curl:?}");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "{}");
}

#[test]
fn with_no_user_yet_the_host_may_use_the_api_but_a_container_is_refused() {
    let s = TestServer::start(BIN);
    assert_eq!(
        s.get("/api/v1/containers").status,
        200,
        "authentication is off"
    );
    probe_admin_api_from_a_container(&s);
}

#[test]
fn a_non_loopback_listener_requires_authentication_unless_explicitly_disabled() {
    let s = TestServer::start_with(BIN, &["--listen", "0.0.0.0:0"]);
    let port = s.addr.port();
    let local: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let r = slipway_testkit::request(local, "GET", "/api/v1/containers", &[], b"");
    assert_eq!(
        r.status, 401,
        "no user, but not loopback: authentication is on"
    );
    let s2 = TestServer::start_with(BIN, &["--listen", "0.0.0.0:0", "--insecure-no-auth"]);
    let local: std::net::SocketAddr = ([127, 0, 0, 1], s2.addr.port()).into();
    let r = slipway_testkit::request(local, "GET", "/api/v1/containers", &[], b"");
    assert_eq!(r.status, 200);
    assert!(
        s2.log()
            .iter()
            .any(|l| l.contains("--insecure-no-auth: authentication is OFF")),
        "a warning at start"
    );
}

#[test]
fn anonymous_policies_open_only_their_globs_and_htpasswd_users_import() {
    let cfg = tempfile::tempdir().expect("tmp");
    let file = cfg.path().join("slipway.toml");
    std::fs::write(
        &file,
        "[[auth.anonymous]]\nrepository = \"public/*\"\nrole = \"reader\"\n",
    )
    .expect("config");
    let s = TestServer::start_secure(BIN, &["--config", file.to_str().expect("utf8")]);
    slipway_testkit::pack_busybox(BIN, &s, "public/tool:1", &[]);
    slipway_testkit::pack_busybox(BIN, &s, "private/tool:1", &[]);
    assert_eq!(
        s.get("/v2/public/tool/manifests/1").status,
        200,
        "anonymous may pull public/*"
    );
    assert_eq!(s.get("/v2/private/tool/manifests/1").status, 401);
    let out = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/public/tool:1", s.host()),
    ]);
    assert!(
        out.status.success(),
        "an anonymous token flow works: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // htpasswd import works offline on a stopped server's data directory.
    let data = tempfile::tempdir().expect("tmp");
    let hash = "$2b$05$GFvenyah.jLdewECPRQZhO2TRrmddC9XsKNqqKvtYA7A.p70.f6SS"; // "imported-pw"
    let ht = data.path().join("htpasswd");
    std::fs::write(&ht, format!("carol:{hash}\n")).expect("htpasswd");
    let d = data.path().join("data");
    let out = Command::new(BIN)
        .args(["user", "import"])
        .arg(&ht)
        .args(["--role", "reader", "--data"])
        .arg(&d)
        .output()
        .expect("import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s2 = TestServer::start_on(BIN, &d, &[]);
    let r = s2.request(
        "GET",
        "/api/v1/whoami",
        &[("authorization", &basic("carol", "imported-pw"))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["name"], "carol");
    let r = s2.request(
        "GET",
        "/api/v1/whoami",
        &[("authorization", &basic("carol", "wrong-pw-1"))],
        b"",
    );
    assert_eq!(r.status, 401);
}

#[test]
fn repeated_failed_logins_from_one_address_are_answered_429_with_retry_after() {
    let cfg = tempfile::tempdir().expect("tmp");
    let file = cfg.path().join("slipway.toml");
    std::fs::write(&file, "[auth]\nlogin_failures = 3\nlogin_window = \"1m\"\n").expect("config");
    let s = TestServer::start_secure(BIN, &["--config", file.to_str().expect("utf8")]);
    let wrong = basic(ADMIN.0, "not-the-password");
    for _ in 0..3 {
        let r = s.request("GET", "/v2/", &[("authorization", &wrong)], b"");
        assert_eq!(r.status, 401);
    }
    for path in ["/v2/", "/api/v1/status", "/auth/token?service=slipway"] {
        let r = s.request("GET", path, &[("authorization", &wrong)], b"");
        assert_eq!(r.status, 429, "{path}");
        let wait: u64 = r
            .header("retry-after")
            .expect("retry-after")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // Even the right password waits: the address is over its limit.
    let r = s.request(
        "GET",
        "/v2/",
        &[("authorization", &basic(ADMIN.0, ADMIN.1))],
        b"",
    );
    assert_eq!(r.status, 429);
    // A valid API token is not held back (nothing to brute-force in 256 bits).
    let bearer = format!("Bearer {}", s.admin_token.clone().expect("token"));
    let r = s.request("GET", "/api/v1/status", &[("authorization", &bearer)], b"");
    assert_eq!(r.status, 200);
    // The audit log kept every refusal, without the password.
    let audit = std::fs::read_to_string(s.data.join("audit/audit.log")).expect("audit");
    assert!(
        audit.matches("\"action\":\"login\"").count() >= 6,
        "{audit}"
    );
    assert!(!audit.contains("not-the-password"));
}

#[test]
fn malformed_credentials_and_token_requests_get_precise_errors() {
    let s = TestServer::start_secure(BIN, &[]);
    let form = [("content-type", "application/x-www-form-urlencoded")];
    // (method, path, headers, body, status, a phrase the error must hold)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
        u16,
        &'a str,
    );
    let cases: &[Case] = &[
        (
            "GET",
            "/v2/",
            &[("authorization", "Digest abc")],
            "",
            401,
            "Basic or Bearer",
        ),
        (
            "GET",
            "/v2/",
            &[("authorization", "Basic !!!")],
            "",
            401,
            "base64",
        ),
        (
            "GET",
            "/api/v1/status",
            &[("authorization", "Bearer a.b.c")],
            "",
            401,
            "well-formed JWT",
        ),
        (
            "GET",
            "/api/v1/status",
            &[("authorization", "Bearer slw_nothex_x")],
            "",
            401,
            "invalid, expired or revoked",
        ),
        (
            "POST",
            "/auth/token",
            &form,
            "grant_type=client_credentials",
            400,
            "unsupported grant_type",
        ),
        (
            "POST",
            "/auth/token",
            &form,
            "grant_type=password&username=admin",
            400,
            "needs username and password",
        ),
        (
            "POST",
            "/auth/token",
            &form,
            "grant_type=refresh_token",
            400,
            "needs refresh_token",
        ),
        (
            "POST",
            "/auth/token",
            &form,
            "grant_type=refresh_token&refresh_token=slr_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            401,
            "invalid, expired or revoked",
        ),
        (
            "GET",
            "/auth/token?service=other",
            &[],
            "",
            400,
            "issues tokens for service",
        ),
        (
            "GET",
            "/auth/token?scope=Repository:x",
            &[],
            "",
            400,
            "invalid scope",
        ),
        ("DELETE", "/auth/token", &[], "", 405, "GET or POST"),
    ];
    for (method, path, headers, body, status, needle) in cases {
        let r = s.request(method, path, headers, body.as_bytes());
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, *status, "{method} {path}: {text}");
        assert!(text.contains(needle), "{method} {path}: {text}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok(),
            "JSON: {text}"
        );
    }
    // An 8 KiB+ header is refused, not parsed.
    let long = format!("Bearer {}", "a".repeat(9000));
    let r = s.request("GET", "/api/v1/status", &[("authorization", &long)], b"");
    assert_eq!(r.status, 401);
    // Bad rights in a user or token request name the field.
    let r = as_admin(
        &s,
        "POST",
        "/api/v1/users",
        r#"{"name":"x","password":"long-enough","rights":{"grants":[{"kind":"repository","glob":"a","role":"owner"}]}}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (400, Some("rights.grants"))
    );
    let r = as_admin(
        &s,
        "POST",
        "/api/v1/users",
        r#"{"name":"x","password":"short"}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (400, Some("password"))
    );
    let r = as_admin(&s, "POST", "/api/v1/tokens", r#"{"name":"../evil"}"#);
    assert_eq!(
        (r.status, r.json()["error"]["field"].as_str()),
        (400, Some("name"))
    );
    let r = as_admin(&s, "DELETE", "/api/v1/users/admin", "");
    assert_eq!(
        r.status,
        409,
        "the last admin stays: {}",
        String::from_utf8_lossy(&r.body)
    );
}
