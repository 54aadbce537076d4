//! Rollouts against fakes, in paused time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use slipway_core::service::{Probe, ServiceSpec};

use super::*;
use crate::{Instance, Instances, Prober, Traffic, TrafficStats};

/// Instances whose behaviour comes from their image name: `crash` dies at once,
/// `unready` never passes a probe, `errors` serves 5xx (see [`FakeTraffic`]).
#[derive(Default)]
struct FakeInstances {
    next: AtomicU16,
    images: Mutex<HashMap<String, String>>,
    stopped: Mutex<Vec<String>>,
    dead: Mutex<Vec<String>>,
}

#[async_trait]
impl Instances for FakeInstances {
    async fn start(
        &self,
        _spec: &ServiceSpec,
        revision: u64,
        image: &str,
    ) -> Result<Instance, String> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("i{n}");
        self.images
            .lock()
            .expect("lock")
            .insert(id.clone(), image.to_owned());
        Ok(Instance {
            id,
            revision,
            addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + n)),
        })
    }

    async fn stop(&self, instance: &Instance, _grace: Duration) {
        self.stopped.lock().expect("lock").push(instance.id.clone());
    }

    async fn alive(&self, instance: &Instance) -> bool {
        let crashed = self
            .images
            .lock()
            .expect("lock")
            .get(&instance.id)
            .is_some_and(|i| i.contains("crash"));
        !crashed
            && !self.stopped.lock().expect("lock").contains(&instance.id)
            && !self.dead.lock().expect("lock").contains(&instance.id)
    }
}

struct FakeProber(Arc<FakeInstances>);

#[async_trait]
impl Prober for FakeProber {
    async fn check(&self, instance: &Instance, _probe: &Probe) -> bool {
        !self
            .0
            .images
            .lock()
            .expect("lock")
            .get(&instance.id)
            .is_some_and(|i| i.contains("unready"))
    }
}

/// One published route table: (revision, weight, instance ids).
type Table = Vec<(u64, u32, Vec<String>)>;

#[derive(Default)]
struct FakeTraffic {
    published: Mutex<Vec<Table>>,
    errors: Mutex<HashMap<u64, TrafficStats>>,
}

impl Traffic for FakeTraffic {
    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]) {
        self.published.lock().expect("lock").push(
            routes
                .iter()
                .map(|(r, w, i)| (*r, *w, i.iter().map(|i| i.id.clone()).collect()))
                .collect(),
        );
    }

    fn in_flight(&self, _instance: &Instance) -> u64 {
        0
    }

    fn stats(&self, revision: u64) -> TrafficStats {
        self.errors
            .lock()
            .expect("lock")
            .get(&revision)
            .copied()
            .unwrap_or_default()
    }
}

struct Harness {
    ctl: Controller,
    inst: Arc<FakeInstances>,
    traffic: Arc<FakeTraffic>,
}

fn harness() -> Harness {
    let inst = Arc::new(FakeInstances::default());
    let traffic = Arc::new(FakeTraffic::default());
    let (tx, _) = tokio::sync::broadcast::channel(64);
    let ctl = Controller::new(
        Controller::empty_state("web"),
        inst.clone(),
        Arc::new(FakeProber(inst.clone())),
        traffic.clone(),
        tx,
    );
    Harness { ctl, inst, traffic }
}

fn spec(extra: &str) -> ServiceSpec {
    ServiceSpec::from_toml(&format!("name = \"web\"\nimage = \"hello:1\"\nreplicas = 3\nprogress_deadline = \"30s\"\n{extra}\n[ingress]\nlisten = \"127.0.0.1:9\"\n")).expect("spec")
}

fn served(h: &Harness) -> Vec<String> {
    h.traffic
        .published
        .lock()
        .expect("lock")
        .last()
        .map(|t| t.iter().flat_map(|(_, _, i)| i.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn first_deploy_starts_every_replica_and_publishes_them() {
    let mut h = harness();
    assert_eq!(
        h.ctl.deploy(spec(""), "hello@v1".into()).await,
        Outcome::Done
    );
    assert_eq!(served(&h), ["i1", "i2", "i3"]);
    assert_eq!(h.ctl.state().lock().expect("lock").active, Some(1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rolling_update_replaces_all_instances_without_dropping_below_capacity() {
    let mut h = harness();
    let s = spec("[strategy]\ntype = \"rolling\"\nmax_surge = 1\nmax_unavailable = 0");
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    assert_eq!(h.ctl.deploy(s, "hello@v2".into()).await, Outcome::Done);
    assert_eq!(served(&h).len(), 3);
    assert!(
        served(&h)
            .iter()
            .all(|i| ["i4", "i5", "i6"].contains(&i.as_str()))
    );
    for table in h.traffic.published.lock().expect("lock").iter().skip(1) {
        let n: usize = table.iter().map(|(_, _, i)| i.len()).sum();
        assert!(n >= 3, "capacity dropped to {n}: {table:?}");
    }
    // Old instances were stopped only after leaving every later table.
    let stopped = h.inst.stopped.lock().expect("lock").clone();
    assert_eq!(
        stopped,
        ["i1", "i2", "i3"]
            .map(str::to_owned)
            .iter()
            .rev()
            .cloned()
            .collect::<Vec<_>>()
    );
    let st = h.ctl.state();
    let st = st.lock().expect("lock");
    assert_eq!(st.active, Some(2));
    assert_eq!(st.revisions[0].status, RevisionStatus::Superseded);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_revision_that_never_becomes_ready_is_rolled_back() {
    let mut h = harness();
    h.ctl
        .deploy(spec("drain_timeout = \"5s\""), "hello@v1".into())
        .await;
    let out = h
        .ctl
        .deploy(spec("drain_timeout = \"5s\""), "hello@unready".into())
        .await;
    assert!(
        matches!(&out, Outcome::RolledBack(m) if m.contains("never became ready")),
        "{out:?}"
    );
    assert_eq!(served(&h), ["i1", "i2", "i3"]);
    let st = h.ctl.state();
    let st = st.lock().expect("lock");
    assert_eq!(st.active, Some(1));
    assert_eq!(st.revisions[1].status, RevisionStatus::RolledBack);
    assert!(st.instances.iter().all(|i| i.revision == 1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_revision_that_crashes_at_start_is_rolled_back() {
    let mut h = harness();
    h.ctl.deploy(spec(""), "hello@v1".into()).await;
    let out = h.ctl.deploy(spec(""), "hello@crash".into()).await;
    assert!(
        matches!(&out, Outcome::RolledBack(m) if m.contains("exited while starting")),
        "{out:?}"
    );
    assert_eq!(served(&h), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn canary_with_errors_is_aborted_by_the_analysis() {
    let mut h = harness();
    let s = spec(
        "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"10s\" }, { weight = 60, pause = \"10s\" }]\n[analysis]\nmax_error_rate = 0.05\nmin_requests = 10",
    );
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    h.traffic.errors.lock().expect("lock").insert(
        2,
        TrafficStats {
            requests: 100,
            errors: 20,
            p99_ms: 5,
        },
    );
    let out = h.ctl.deploy(s, "hello@v2".into()).await;
    assert!(
        matches!(&out, Outcome::RolledBack(m) if m.contains("error rate 20.0% > 5.0%")),
        "{out:?}"
    );
    let tables = h.traffic.published.lock().expect("lock").clone();
    assert!(
        tables
            .iter()
            .any(|t| t.iter().any(|(r, w, _)| *r == 2 && *w == 20)),
        "the canary got 20%: {tables:?}"
    );
    assert!(
        !tables
            .iter()
            .any(|t| t.iter().any(|(r, w, _)| *r == 2 && *w == 60)),
        "it never reached step 2"
    );
    assert_eq!(served(&h), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn healthy_canary_steps_through_its_weights_and_promotes() {
    let mut h = harness();
    let s = spec(
        "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"5s\" }, { weight = 60, pause = \"5s\" }]",
    );
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    assert_eq!(h.ctl.deploy(s, "hello@v2".into()).await, Outcome::Done);
    let weights: Vec<u32> = h
        .traffic
        .published
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|t| t.iter().find(|(r, _, _)| *r == 2).map(|(_, w, _)| *w))
        .collect();
    assert_eq!(weights.first(), Some(&20));
    assert!(
        weights.contains(&60) && weights.last() == Some(&100),
        "{weights:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn blue_green_switches_at_once_and_retires_the_old_set_after_the_delay() {
    let mut h = harness();
    let s = spec("[strategy]\ntype = \"blue-green\"\nscale_down_delay = \"20s\"");
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    let before = tokio::time::Instant::now();
    assert_eq!(h.ctl.deploy(s, "hello@v2".into()).await, Outcome::Done);
    assert!(before.elapsed() >= Duration::from_secs(20));
    let tables = h.traffic.published.lock().expect("lock").clone();
    assert_eq!(
        tables.last().expect("table"),
        &vec![(
            2,
            100,
            vec!["i4".to_owned(), "i5".to_owned(), "i6".to_owned()]
        )]
    );
    assert_eq!(
        tables.len(),
        2,
        "one switch, no intermediate mix: {tables:?}"
    );
    assert_eq!(h.inst.stopped.lock().expect("lock").len(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn scaling_and_healing_keep_the_replica_count() {
    let mut h = harness();
    h.ctl.deploy(spec(""), "hello@v1".into()).await;
    h.ctl.scale(5).await.expect("scale up");
    assert_eq!(served(&h).len(), 5);
    h.ctl.scale(2).await.expect("scale down");
    assert_eq!(served(&h).len(), 2);
    let victim = served(&h)[0].clone();
    h.inst.dead.lock().expect("lock").push(victim.clone());
    h.ctl.heal_once().await;
    let now = served(&h);
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&victim));
    let st = h.ctl.state();
    assert_eq!(st.lock().expect("lock").revisions[0].spec.replicas, 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rollback_redeploys_the_previous_revision() {
    let mut h = harness();
    h.ctl.deploy(spec(""), "hello@v1".into()).await;
    h.ctl.deploy(spec(""), "hello@v2".into()).await;
    assert_eq!(h.ctl.rollback(None).await, Outcome::Done);
    let st = h.ctl.state();
    let st = st.lock().expect("lock");
    assert_eq!(st.active, Some(3));
    assert_eq!(st.revisions[2].image, "hello@v1");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_paused_canary_waits_and_promote_skips_the_remaining_steps() {
    let mut h = harness();
    // The deadline (30 s) only counts unpaused time: the 60 s pause does not trip it.
    let s = spec(
        "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"10s\" }, { weight = 60, pause = \"1h\" }]",
    );
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    let control = h.ctl.control();
    let traffic = h.traffic.clone();
    let driver = tokio::spawn(async move {
        // Pause during step 1; 60 s later the canary is still at 20%.
        tokio::time::sleep(Duration::from_secs(2)).await;
        control.pause();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let at_20 = traffic
            .published
            .lock()
            .expect("lock")
            .last()
            .is_some_and(|t| t.iter().any(|(r, w, _)| *r == 2 && *w == 20));
        control.resume();
        // The 1 h step would never end in this test: promote instead, early.
        tokio::time::sleep(Duration::from_secs(5)).await;
        control.promote();
        at_20
    });
    let start = tokio::time::Instant::now();
    assert_eq!(h.ctl.deploy(s, "hello@v2".into()).await, Outcome::Done);
    assert!(driver.await.expect("join"), "paused at step 1");
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "the pause held the rollout"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3600),
        "promote skipped the 1 h step"
    );
    assert!(
        served(&h)
            .iter()
            .all(|i| ["i4", "i5", "i6"].contains(&i.as_str()))
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn abort_rolls_a_rollout_back() {
    let mut h = harness();
    let s = spec("[strategy]\ntype = \"blue-green\"\nscale_down_delay = \"1h\"");
    h.ctl.deploy(s.clone(), "hello@v1".into()).await;
    let control = h.ctl.control();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        control.abort();
    });
    let out = h.ctl.deploy(s, "hello@v2".into()).await;
    assert_eq!(out, Outcome::RolledBack("aborted by the user".into()));
    assert_eq!(served(&h), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn autoscaling_follows_requests_per_instance_within_bounds_and_cooldown() {
    let mut h = harness();
    let s = spec("[autoscale]\nmin = 1\nmax = 4\ntarget_rps = 20\ncooldown = \"60s\"").clone();
    let mut s = s;
    s.replicas = 2;
    h.ctl.deploy(s, "hello@v1".into()).await;
    let set = |h: &Harness, n: u64| {
        h.traffic.errors.lock().expect("lock").insert(
            1,
            TrafficStats {
                requests: n,
                errors: 0,
                p99_ms: 1,
            },
        )
    };
    set(&h, 0);
    assert_eq!(
        h.ctl.autoscale_once().await,
        None,
        "the first call only takes a sample"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    set(&h, 1000); // 100 req/s over 10 s: 5 instances wanted, 4 allowed
    assert_eq!(h.ctl.autoscale_once().await, Some(4));
    assert_eq!(served(&h).len(), 4);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        h.ctl.autoscale_once().await,
        None,
        "no traffic, but the cooldown holds"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.ctl.autoscale_once().await, Some(1), "idle: down to min");
    assert_eq!(served(&h).len(), 1);
}
