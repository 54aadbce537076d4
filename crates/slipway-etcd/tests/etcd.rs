//! The etcd state store against a real etcd (Debian's `etcd-server`) that the
//! test starts on loopback ports with its data in a temp dir.

use std::time::Duration;

use slipway_controller::state::{StateError, StateStore, WatchEvent, behaviour_suite};
use slipway_etcd::{EtcdState, parse_endpoints};
use slipway_testkit::Etcd;

async fn store(etcd: &Etcd, namespace: &str) -> EtcdState {
    let endpoints = parse_endpoints(&etcd.url()).expect("endpoints");
    EtcdState::connect(&endpoints, namespace)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_passes_the_behaviour_suite() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    behaviour_suite(&store(&etcd, "/slipway/").await).await;
    // Another namespace on the same etcd sees none of it.
    let other = store(&etcd, "/elsewhere/").await;
    assert_eq!(other.load_all("svc/").await, Ok(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_etcd_restart_the_store_reconnects_and_its_watch_misses_nothing() {
    let mut etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let s = store(&etcd, "/slipway/").await;
    let mut watch = s.watch("svc/");
    let v1 = s.put("svc/a", b"1".to_vec(), None).await.expect("put");
    assert!(etcd.restart(), "etcd restarts");
    // Writes go through again once the client has reconnected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let v2 = loop {
        match s.put("svc/a", b"2".to_vec(), Some(v1)).await {
            Ok(v) => break v,
            Err(StateError::Unavailable(e)) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after the restart: {e}"),
        }
    };
    assert!(v2 > v1);
    let got = s
        .get("svc/a")
        .await
        .expect("get")
        .expect("kept across the restart");
    assert_eq!((got.value, got.version), (b"2".to_vec(), v2));
    let mut versions = Vec::new();
    while versions.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), watch.recv()).await {
            Ok(Some(WatchEvent::Put(v))) => versions.push(v.version),
            other => panic!("watch event: {other:?}"),
        }
    }
    assert_eq!(versions, [v1, v2], "the watch resumed where it stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_clear_error() {
    let port = slipway_testkit::free_port();
    let endpoints = parse_endpoints(&format!("etcd://127.0.0.1:{port}")).expect("endpoints");
    let err = EtcdState::connect(&endpoints, "/slipway/")
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(&err, StateError::Unavailable(m) if m.starts_with("etcd:")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_control_plane_leads_a_deposed_leaders_late_write_is_refused_and_another_takes_over() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let (a, b) = (
        store(&etcd, "/slipway/").await,
        store(&etcd, "/slipway/").await,
    );
    let ttl = Duration::from_secs(3);
    let leader_a = a.lead("control-plane", "a", ttl).await.expect("a leads");
    let v1 = a
        .put("svc/x", b"a1".to_vec(), None)
        .await
        .expect("the leader writes");
    // b campaigns too, and waits while a leads.
    let b2 = b.clone();
    let mut campaign = tokio::spawn(async move { b2.lead("control-plane", "b", ttl).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(800), &mut campaign)
            .await
            .is_err(),
        "only one leads at a time"
    );
    // a's lease ends behind its back (a frozen process, a partition): revoked
    // from another client, as its expiry would.
    let other = etcd_client::Client::connect([format!("http://{}", etcd.host)], None)
        .await
        .expect("client");
    let taken_at = tokio::time::Instant::now();
    other
        .lease_client()
        .revoke(leader_a.lease())
        .await
        .expect("revoke");
    let leader_b = tokio::time::timeout(ttl, campaign)
        .await
        .expect("b leads within the lease TTL")
        .expect("join")
        .expect("b leads");
    assert!(taken_at.elapsed() < ttl);
    // a still thinks it leads; its late write is refused, and b's goes through.
    let late = a.put("svc/x", b"a2".to_vec(), Some(v1)).await;
    assert!(
        matches!(&late, Err(StateError::Fenced(m)) if m.contains("another control plane")),
        "{late:?}"
    );
    let v2 = b
        .put("svc/x", b"b1".to_vec(), Some(v1))
        .await
        .expect("the new leader writes");
    assert!(v2 > v1);
    // a learns it lost within a TTL, from its own keep-alive.
    let mut lost = leader_a.lost();
    tokio::time::timeout(ttl * 2, lost.wait_for(|l| *l))
        .await
        .expect("a notices within two TTLs")
        .expect("watch");
    // b resigns: a new campaign wins at once.
    drop(leader_b);
    b.resign().await.expect("resign");
    tokio::time::timeout(ttl, a.lead("control-plane", "a", ttl))
        .await
        .expect("a leads again at once")
        .expect("lead");
    assert_eq!(
        a.put("svc/x", b"a3".to_vec(), Some(v2))
            .await
            .map(|v| v > v2),
        Ok(true)
    );
}
