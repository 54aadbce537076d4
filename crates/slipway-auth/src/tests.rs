use super::*;

fn auth() -> (tempfile::TempDir, Auth) {
    let dir = tempfile::tempdir().expect("tmp");
    let auth = Auth::open(dir.path(), AuthConfig::default()).expect("open");
    (dir, auth)
}

const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn basic(user: &str, password: &str) -> Credentials {
    Credentials::Basic {
        user: user.into(),
        password: password.into(),
    }
}

fn perms(repo: &[&str], svc: &[&str]) -> Permissions {
    Permissions {
        grants: repo
            .iter()
            .map(|g| Grant::parse(Kind::Repository, g).expect("grant"))
            .chain(
                svc.iter()
                    .map(|g| Grant::parse(Kind::Service, g).expect("grant")),
            )
            .collect(),
        ..Permissions::default()
    }
}

#[test]
fn the_dummy_hash_is_a_real_argon2id_hash_so_unknown_users_cost_the_same() {
    let parsed = argon2::password_hash::PasswordHash::new(DUMMY_HASH).expect("parses");
    assert_eq!(parsed.algorithm.as_str(), "argon2id");
}

#[test]
fn users_log_in_with_their_password_and_unknown_users_get_the_same_answer() {
    let (_d, a) = auth();
    a.add_user("alice", "alice-password", perms(&["team/*=developer"], &[]))
        .expect("add");
    let p = a
        .authenticate(&basic("alice", "alice-password"), IP)
        .expect("login");
    assert_eq!(p.name, "alice");
    assert!(p.allows(Kind::Repository, "team/app", Action::Push));
    // Cached the second time; still right.
    assert!(
        a.authenticate(&basic("alice", "alice-password"), IP)
            .is_ok()
    );
    let wrong = a
        .authenticate(&basic("alice", "nope-nope"), IP)
        .expect_err("wrong");
    let unknown = a
        .authenticate(&basic("mallory", "nope-nope"), IP)
        .expect_err("unknown");
    assert_eq!(wrong.to_string(), unknown.to_string());
    a.set_password("alice", "another-password").expect("passwd");
    assert!(
        a.authenticate(&basic("alice", "alice-password"), IP)
            .is_err(),
        "the cache does not outlive a password change"
    );
    assert!(matches!(
        a.add_user("alice", "whatever-pass", Permissions::default()),
        Err(AuthError::Exists(_))
    ));
    assert!(matches!(
        a.add_user("../x", "whatever-pass", Permissions::default()),
        Err(AuthError::Invalid("name", _))
    ));
}

#[test]
fn failed_logins_are_limited_per_address_and_user() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = Auth::open(
        dir.path(),
        AuthConfig {
            limit_failures: 3,
            ..AuthConfig::default()
        },
    )
    .expect("open");
    a.add_user("bob", "bob-password", Permissions::default())
        .expect("add");
    for _ in 0..3 {
        assert!(matches!(
            a.authenticate(&basic("bob", "guess-guess"), IP),
            Err(AuthError::Unauthenticated(_))
        ));
    }
    assert!(matches!(
        a.authenticate(&basic("bob", "bob-password"), IP),
        Err(AuthError::RateLimited(_))
    ));
}

#[test]
fn api_tokens_carry_their_scopes_until_revoked_or_expired() {
    let (_d, a) = auth();
    let (rec, token) = a
        .create_token(
            TokenRequest {
                name: "ci".into(),
                permissions: perms(&["team/app=developer"], &["app=deployer"]),
                ttl: None,
            },
            "admin",
        )
        .expect("create");
    assert!(!token.contains(&rec.hash));
    let p = a
        .authenticate(&Credentials::Bearer(token.clone()), IP)
        .expect("token");
    assert_eq!(p.name, "token:ci");
    assert!(p.allows(Kind::Repository, "team/app", Action::Push));
    assert!(!p.allows(Kind::Repository, "team/other", Action::Pull));
    assert!(p.allows(Kind::Service, "app", Action::Deploy));
    assert!(!p.allows(Kind::Service, "web", Action::Scale));
    // As a Basic password too (docker login -p TOKEN).
    assert!(a.authenticate(&basic("ci", &token), IP).is_ok());
    a.revoke_token("ci").expect("revoke");
    assert!(a.authenticate(&Credentials::Bearer(token), IP).is_err());
    let (_, short) = a
        .create_token(
            TokenRequest {
                name: "short".into(),
                permissions: Permissions::default(),
                ttl: Some(Duration::from_millis(1)),
            },
            "admin",
        )
        .expect("create");
    std::thread::sleep(Duration::from_millis(5));
    assert!(
        a.authenticate(&Credentials::Bearer(short), IP).is_err(),
        "expired"
    );
}

#[test]
fn registry_tokens_grant_the_intersection_of_asked_and_allowed() {
    let (_d, a) = auth();
    a.add_user(
        "dev",
        "dev-password",
        perms(&["team/*=developer", "vendor/*=reader"], &[]),
    )
    .expect("add");
    let p = a
        .authenticate(&basic("dev", "dev-password"), IP)
        .expect("login");
    let asked = scope::parse("repository:team/app:pull,push,delete repository:vendor/x:pull,push repository:secret/y:pull registry:catalog:*")
        .expect("scopes");
    let issued = a.issue(&p, &asked);
    assert_eq!(issued.access.len(), 2);
    assert_eq!(issued.access[0].actions, ["pull", "push"]);
    assert_eq!(issued.access[1].actions, ["pull"]);
    let jp = a
        .authenticate(&Credentials::Bearer(issued.token), IP)
        .expect("jwt");
    assert_eq!(jp.name, "dev");
    assert!(jp.allows(Kind::Repository, "team/app", Action::Push));
    assert!(
        !jp.allows(Kind::Repository, "team/other", Action::Pull),
        "only what the token names"
    );
    assert!(!jp.allows(Kind::Repository, "vendor/x", Action::Push));
    let refresh = a.refresh_token(&p).expect("refresh");
    let rp = a
        .authenticate(&Credentials::Bearer(refresh), IP)
        .expect("refresh");
    assert_eq!(rp.name, "dev");
    a.remove_user("dev").expect("rm");
    a.add_user("root", "root-password", Permissions::admin())
        .expect("admin");
    assert!(
        matches!(a.remove_user("root"), Err(AuthError::Refused(_))),
        "the last admin stays"
    );
    a.add_user("root2", "root-password", Permissions::admin())
        .expect("admin");
    a.remove_user("root").expect("another admin exists");
    assert!(a.principal_named("dev").expect("lookup").is_none());
}

#[test]
fn secrets_are_sealed_at_rest_and_open_for_allowed_services_only() {
    let (d, a) = auth();
    let v1 = a
        .set_secret("db-password", b"s3cr3t-value", vec!["api*".into()])
        .expect("set");
    let v2 = a
        .set_secret("db-password", b"s3cr3t-value2", vec!["api*".into()])
        .expect("set");
    assert_eq!((v1, v2), (1, 2));
    assert_eq!(
        a.open_secret("db-password", "api-1").expect("open"),
        (b"s3cr3t-value2".to_vec(), 2)
    );
    assert!(matches!(
        a.open_secret("db-password", "web"),
        Err(AuthError::Invalid("secrets", _))
    ));
    drop(a);
    let db = std::fs::read(d.path().join("auth.redb")).expect("read");
    assert!(
        !db.windows(12).any(|w| w == b"s3cr3t-value"),
        "no plaintext in the database"
    );
}
