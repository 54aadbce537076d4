//! Services driven through their actor against fakes, in paused time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use slipway_core::service::{Ingress, Probe, ServiceSpec};
use tokio::sync::broadcast;

use crate::actor::{Command, Service, spawn};
use crate::record::{Outcome, Phase, RevisionStatus, ServiceRecord};
use crate::state::{MemoryStore, StateStore};
use crate::{
    Candidate, Event, Gate, Images, Instance, InstanceError, InstanceSpec, InstanceState,
    Instances, Prober, ServiceDeps, Traffic, TrafficStats,
};

/// Instances whose behaviour comes from their image: `crash` dies at once,
/// `unready` never passes a probe, `slowstart` takes 5 s to start.
#[derive(Default)]
struct FakeInstances {
    next: AtomicU16,
    images: Mutex<HashMap<String, String>>,
    /// Every instance started, by id, with its service.
    started: Mutex<Vec<Instance>>,
    stopped: Mutex<Vec<String>>,
    dead: Mutex<Vec<String>>,
    unknown: Mutex<Vec<String>>,
    /// How long a stop takes (a process that ignores its stop signal).
    stop_takes: Mutex<Duration>,
    /// Instances failing every probe for now.
    unready: Mutex<Vec<String>>,
    /// Exit events, when the test asks for them (else healing polls).
    exit_events: Option<tokio::sync::watch::Sender<u64>>,
    /// Calls of `state`: what healing costs.
    state_calls: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Instances for FakeInstances {
    async fn start(&self, spec: &InstanceSpec) -> Result<Instance, InstanceError> {
        let delay = if spec.image.contains("slowstart") {
            5_000
        } else {
            50
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("i{n}");
        self.images
            .lock()
            .expect("lock")
            .insert(id.clone(), spec.image.clone());
        let i = Instance {
            id,
            revision: spec.revision,
            addr: SocketAddr::from(([127, 0, 0, 1], 10_000 + n)),
        };
        self.started.lock().expect("lock").push(i.clone());
        Ok(i)
    }

    async fn stop(&self, instance: &Instance, _grace: Duration) -> Result<(), InstanceError> {
        let takes = *self.stop_takes.lock().expect("lock");
        tokio::time::sleep(takes).await;
        self.stopped.lock().expect("lock").push(instance.id.clone());
        Ok(())
    }

    async fn state(&self, instance: &Instance) -> InstanceState {
        self.state_calls.fetch_add(1, Ordering::Relaxed);
        if self.unknown.lock().expect("lock").contains(&instance.id) {
            return InstanceState::Unknown;
        }
        let crashed = self
            .images
            .lock()
            .expect("lock")
            .get(&instance.id)
            .is_some_and(|i| i.contains("crash"));
        if crashed
            || self.stopped.lock().expect("lock").contains(&instance.id)
            || self.dead.lock().expect("lock").contains(&instance.id)
        {
            InstanceState::Exited
        } else {
            InstanceState::Running
        }
    }

    fn exits(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.exit_events
            .as_ref()
            .map(tokio::sync::watch::Sender::subscribe)
    }

    async fn list(&self, _service: &str) -> Result<Vec<Instance>, InstanceError> {
        let stopped = self.stopped.lock().expect("lock").clone();
        Ok(self
            .started
            .lock()
            .expect("lock")
            .iter()
            .filter(|i| !stopped.contains(&i.id))
            .cloned()
            .collect())
    }
}

struct FakeProber(Arc<FakeInstances>);

#[async_trait]
impl Prober for FakeProber {
    async fn check(&self, instance: &Instance, _probe: &Probe) -> bool {
        if self.0.unready.lock().expect("lock").contains(&instance.id) {
            return false;
        }
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
    configured: Mutex<Vec<Ingress>>,
    ejected: Mutex<Vec<SocketAddr>>,
    ejections: tokio::sync::watch::Sender<u64>,
}

#[async_trait]
impl Traffic for FakeTraffic {
    async fn configure(&self, ingress: &Ingress) -> Result<(), String> {
        self.configured.lock().expect("lock").push(ingress.clone());
        Ok(())
    }

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

    fn retain_stats(&self, _keep: &[u64]) {}

    fn ejections(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.ejections.subscribe())
    }

    fn ejected(&self) -> Vec<SocketAddr> {
        self.ejected.lock().expect("lock").clone()
    }

    fn readmit(&self, addr: SocketAddr) {
        self.ejected.lock().expect("lock").retain(|a| *a != addr);
    }

    fn close(&self) {}
}

/// Tags pin to `repo@tag`; `missing` images do not exist; `remote/…` images live in
/// another registry whose tags are `remote_tags`.
#[derive(Default)]
struct FakeImages {
    remote_tags: Mutex<Vec<String>>,
}

#[async_trait]
impl Images for FakeImages {
    async fn pin(&self, image: &str) -> Result<String, InstanceError> {
        if image.contains("missing") {
            return Err(InstanceError::Image(format!("{image} not found")));
        }
        Ok(image.replacen(':', "@", 1))
    }

    fn is_remote(&self, image: &str) -> bool {
        image.starts_with("remote/")
    }

    async fn tags(&self, _image: &str) -> Result<Vec<String>, String> {
        Ok(self.remote_tags.lock().expect("lock").clone())
    }
}

/// Refuses images whose name contains `arm`.
struct FakeGate;

#[async_trait]
impl Gate for FakeGate {
    async fn admit(&self, c: &Candidate<'_>) -> Result<(), String> {
        if c.image.contains("arm") {
            Err("the image has no linux/amd64 manifest".into())
        } else {
            Ok(())
        }
    }
}

struct Harness {
    svc: Service,
    inst: Arc<FakeInstances>,
    traffic: Arc<FakeTraffic>,
    images: Arc<FakeImages>,
    store: Arc<MemoryStore>,
    events: broadcast::Sender<Event>,
    deps: ServiceDeps,
}

fn harness() -> Harness {
    harness_with(
        Arc::new(FakeInstances::default()),
        Arc::new(MemoryStore::default()),
    )
}

fn harness_with(inst: Arc<FakeInstances>, store: Arc<MemoryStore>) -> Harness {
    let traffic = Arc::new(FakeTraffic::default());
    let images = Arc::new(FakeImages::default());
    let (events, _) = broadcast::channel(4096);
    let deps = ServiceDeps {
        instances: inst.clone(),
        prober: Arc::new(FakeProber(inst.clone())),
        traffic: traffic.clone(),
        images: images.clone(),
        gate: Arc::new(FakeGate),
        store: store.clone(),
        events: events.clone(),
    };
    let svc = spawn(ServiceRecord::new("web"), None, deps.clone(), false);
    Harness {
        svc,
        inst,
        traffic,
        images,
        store,
        events,
        deps,
    }
}

fn spec_of(image: &str, extra: &str) -> ServiceSpec {
    ServiceSpec::from_toml(&format!("name = \"web\"\nimage = \"{image}\"\nreplicas = 3\nprogress_deadline = \"30s\"\n{extra}\n[ingress]\nlisten = \"127.0.0.1:9\"\n")).expect("spec")
}

fn spec(extra: &str) -> ServiceSpec {
    spec_of("hello:1", extra)
}

impl Harness {
    /// Sends a command and waits for its outcome.
    async fn run(&self, command: Command) -> Outcome {
        let mut rx = self.events.subscribe();
        let accepted = match self.svc.send(command).await {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(format!("refused: {e}")),
        };
        wait_outcome(&mut rx, &accepted.command).await
    }

    async fn deploy(&self, spec: ServiceSpec) -> Outcome {
        self.run(Command::Deploy(Box::new(spec))).await
    }

    fn record(&self) -> ServiceRecord {
        self.svc.record()
    }

    fn served(&self) -> Vec<String> {
        self.traffic
            .published
            .lock()
            .expect("lock")
            .last()
            .map(|t| t.iter().flat_map(|(_, _, i)| i.clone()).collect())
            .unwrap_or_default()
    }
}

async fn wait_outcome(rx: &mut broadcast::Receiver<Event>, command: &str) -> Outcome {
    loop {
        let e = rx.recv().await.expect("event");
        if e.command.as_deref() == Some(command)
            && let Some(o) = e.outcome
        {
            return o;
        }
    }
}

/// Waits (in paused time) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn first_deploy_starts_every_replica_publishes_them_and_persists_the_record() {
    let h = harness();
    assert_eq!(h.deploy(spec("")).await, Outcome::Done);
    assert_eq!(h.served(), ["i1", "i2", "i3"]);
    let r = h.record();
    assert_eq!((r.active, r.phase), (Some(1), Phase::Idle));
    let stored = h
        .store
        .get("services/web")
        .await
        .expect("get")
        .expect("stored");
    let stored: ServiceRecord = serde_json::from_slice(&stored.value).expect("json");
    assert_eq!(
        stored.active,
        Some(1),
        "durable before the outcome was reported"
    );
    assert_eq!(stored.instances.len(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rolling_update_replaces_all_instances_without_dropping_below_capacity() {
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"rolling\"\nmax_surge = 1\nmax_unavailable = 0",
        )
    };
    h.deploy(s("hello:1")).await;
    assert_eq!(h.deploy(s("hello:2")).await, Outcome::Done);
    assert_eq!(h.served(), ["i4", "i5", "i6"]);
    for table in h.traffic.published.lock().expect("lock").iter().skip(1) {
        let n: usize = table.iter().map(|(_, _, i)| i.len()).sum();
        assert!(n >= 3, "capacity dropped to {n}: {table:?}");
    }
    until("old instances stopped", || {
        h.inst.stopped.lock().expect("lock").len() == 3
    })
    .await;
    let r = h.record();
    assert_eq!(r.active, Some(2));
    assert_eq!(r.revisions[0].status, RevisionStatus::Superseded);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_rollout_does_not_wait_for_replaced_instances_to_exit() {
    let h = harness();
    h.deploy(spec("")).await;
    // Old instances ignore their stop signal: each takes the whole 10 s grace.
    *h.inst.stop_takes.lock().expect("lock") = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    assert_eq!(h.deploy(spec_of("hello:2", "")).await, Outcome::Done);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the rollout waited on stops: {took:?}"
    );
    let r = h.record();
    assert_eq!(r.instances.len(), 3, "only the new set routes");
    assert_eq!(
        r.stopping.len(),
        3,
        "the old set is stopping in the background"
    );
    until("stops finished", || h.record().stopping.is_empty()).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_revision_that_never_becomes_ready_is_rolled_back() {
    let h = harness();
    h.deploy(spec("drain_timeout = \"5s\"")).await;
    let out = h
        .deploy(spec_of("hello:unready", "drain_timeout = \"5s\""))
        .await;
    assert!(
        matches!(&out, Outcome::RolledBack(m) if m.contains("never became ready")),
        "{out:?}"
    );
    assert_eq!(h.served(), ["i1", "i2", "i3"]);
    let r = h.record();
    assert_eq!(r.active, Some(1));
    assert_eq!(r.revisions[1].status, RevisionStatus::RolledBack);
    assert!(r.instances.iter().all(|i| i.revision == 1));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_revision_that_crashes_at_start_is_rolled_back() {
    let h = harness();
    h.deploy(spec("")).await;
    let out = h.deploy(spec_of("hello:crash", "")).await;
    assert!(
        matches!(&out, Outcome::RolledBack(m) if m.contains("exited while starting")),
        "{out:?}"
    );
    assert_eq!(h.served(), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn canary_with_errors_is_aborted_by_the_analysis() {
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"10s\" }, { weight = 60, pause = \"10s\" }]\n[analysis]\nmax_error_rate = 0.05\nmin_requests = 10",
        )
    };
    h.deploy(s("hello:1")).await;
    h.traffic.errors.lock().expect("lock").insert(
        2,
        TrafficStats {
            requests: 100,
            errors: 20,
            p99_ms: 5,
        },
    );
    let out = h.deploy(s("hello:2")).await;
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
    assert_eq!(h.served(), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn healthy_canary_steps_through_its_weights_and_promotes() {
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"5s\" }, { weight = 60, pause = \"5s\" }]",
        )
    };
    h.deploy(s("hello:1")).await;
    assert_eq!(h.deploy(s("hello:2")).await, Outcome::Done);
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
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"blue-green\"\nscale_down_delay = \"20s\"",
        )
    };
    h.deploy(s("hello:1")).await;
    let before = tokio::time::Instant::now();
    assert_eq!(h.deploy(s("hello:2")).await, Outcome::Done);
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
    until("old set stopped", || {
        h.inst.stopped.lock().expect("lock").len() == 3
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn scaling_and_healing_keep_the_replica_count() {
    let h = harness();
    h.deploy(spec("")).await;
    assert_eq!(h.run(Command::Scale(5)).await, Outcome::Done);
    assert_eq!(h.served().len(), 5);
    assert_eq!(h.run(Command::Scale(2)).await, Outcome::Done);
    assert_eq!(h.served().len(), 2);
    let victim = h.served()[0].clone();
    h.inst.dead.lock().expect("lock").push(victim.clone());
    until("the dead instance was replaced", || {
        let s = h.served();
        s.len() == 2 && !s.contains(&victim)
    })
    .await;
    let r = h.record();
    assert_eq!(r.revisions[0].spec.replicas, 2);
    assert_eq!(
        r.spec().map(|s| s.replicas),
        Some(2),
        "status reports the scaled count"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_instance_in_an_unknown_state_is_never_replaced() {
    let h = harness();
    h.deploy(spec("")).await;
    for id in ["i1", "i2", "i3"] {
        h.inst.unknown.lock().expect("lock").push(id.into());
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        h.served(),
        ["i1", "i2", "i3"],
        "a lost connection is not a crash"
    );
    assert_eq!(
        h.inst.started.lock().expect("lock").len(),
        3,
        "nothing started"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn after_a_rollback_status_and_triggers_use_the_rolled_back_to_spec() {
    let h = harness();
    let t = "[trigger]\nsemver = \"^1\"";
    let mut v1 = spec_of("hello:1.0.0", t);
    v1.replicas = 2;
    h.deploy(v1).await;
    h.deploy(spec_of("hello:1.1.0", t)).await;
    assert_eq!(h.record().spec().map(|s| s.replicas), Some(3));
    assert_eq!(h.run(Command::Rollback(None)).await, Outcome::Done);
    let r = h.record();
    assert_eq!(r.active, Some(3));
    assert_eq!(r.revisions[2].image, "hello@1.0.0");
    assert_eq!(
        r.spec().map(|s| s.replicas),
        Some(2),
        "the rolled-back-to spec"
    );
    assert_eq!(h.served().len(), 2);
    let mut rx = h.events.subscribe();
    assert!(h.svc.offer_push("hello", "1.2.0"));
    loop {
        let e = rx.recv().await.expect("event");
        if e.outcome.is_some() && e.revision == Some(4) {
            break;
        }
    }
    let r = h.record();
    assert_eq!(r.revisions[3].image, "hello@1.2.0");
    assert_eq!(
        r.revisions[3].spec.replicas, 2,
        "the trigger deployed from the live spec"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn pushes_of_1_2_then_1_1_during_a_rollout_end_on_1_2() {
    let h = harness();
    let t = "[trigger]\nsemver = \"^1\"";
    h.deploy(spec_of("hello:1.0.0", t)).await;
    // A slow rollout is in progress when two pipelines push out of order.
    let mut rx = h.events.subscribe();
    let slow = h
        .svc
        .send(Command::Deploy(Box::new(spec_of(
            "hello:1.0.1-slowstart",
            t,
        ))))
        .await
        .expect("accepted");
    assert!(h.svc.offer_push("hello", "1.2.0"));
    h.svc.offer_push("hello", "1.1.0");
    wait_outcome(&mut rx, &slow.command).await;
    until("the trigger rolled out", || {
        h.record()
            .revisions
            .iter()
            .any(|r| r.image == "hello@1.2.0" && r.status == RevisionStatus::Active)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = h.record();
    let images: Vec<&str> = r.revisions.iter().map(|x| x.image.as_str()).collect();
    assert_eq!(images.last(), Some(&"hello@1.2.0"), "{images:?}");
    assert!(
        !images.contains(&"hello@1.1.0"),
        "never downgraded: {images:?}"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_deploy_during_a_heal_is_queued_not_refused() {
    let h = harness();
    h.deploy(spec_of("hello:1-slowstart", "")).await;
    h.inst.dead.lock().expect("lock").push("i1".into());
    until("healing", || h.record().phase == Phase::Healing).await;
    let mut rx = h.events.subscribe();
    let a = h
        .svc
        .send(Command::Deploy(Box::new(spec_of("hello:2", ""))))
        .await
        .expect("a deploy during a heal is accepted");
    assert!(a.queued, "it waits behind the heal");
    assert_eq!(wait_outcome(&mut rx, &a.command).await, Outcome::Done);
    assert_eq!(h.record().active, Some(2));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_pause_during_a_heal_holds_the_next_rollout_until_resume() {
    let h = harness();
    h.deploy(spec_of("hello:1-slowstart", "")).await;
    h.inst.dead.lock().expect("lock").push("i1".into());
    until("healing", || h.record().phase == Phase::Healing).await;
    h.svc.send(Command::Pause).await.expect("pause accepted");
    until("healed", || h.record().phase == Phase::Idle).await;
    assert!(h.record().paused, "the pause outlived the heal");
    let mut rx = h.events.subscribe();
    let a = h
        .svc
        .send(Command::Deploy(Box::new(spec_of("hello:2", ""))))
        .await
        .expect("accepted");
    until("the rollout holds", || h.record().phase == Phase::Paused).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.record().phase, Phase::Paused, "still held");
    assert_eq!(h.record().active, Some(1));
    h.svc.send(Command::Resume).await.expect("resume");
    assert_eq!(wait_outcome(&mut rx, &a.command).await, Outcome::Done);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn rollback_redeploys_the_previous_revision() {
    let h = harness();
    h.deploy(spec("")).await;
    h.deploy(spec_of("hello:2", "")).await;
    assert_eq!(h.run(Command::Rollback(None)).await, Outcome::Done);
    let r = h.record();
    assert_eq!(r.active, Some(3));
    assert_eq!(r.revisions[2].image, "hello@1");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_paused_canary_waits_and_promote_skips_the_remaining_steps() {
    let h = harness();
    // The deadline (30 s) only counts unpaused time: the 60 s pause does not trip it.
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"10s\" }, { weight = 60, pause = \"1h\" }]",
        )
    };
    h.deploy(s("hello:1")).await;
    let mut rx = h.events.subscribe();
    let start = tokio::time::Instant::now();
    let a = h
        .svc
        .send(Command::Deploy(Box::new(s("hello:2"))))
        .await
        .expect("deploy");
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.svc.send(Command::Pause).await.expect("pause");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let at_20 = h
        .traffic
        .published
        .lock()
        .expect("lock")
        .last()
        .is_some_and(|t| t.iter().any(|(r, w, _)| *r == 2 && *w == 20));
    assert!(at_20, "paused at step 1");
    h.svc.send(Command::Resume).await.expect("resume");
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.svc.send(Command::Promote).await.expect("promote");
    assert_eq!(wait_outcome(&mut rx, &a.command).await, Outcome::Done);
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "the pause held the rollout"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3600),
        "promote skipped the 1 h step"
    );
    assert_eq!(h.served(), ["i4", "i5", "i6"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn abort_rolls_a_rollout_back_and_promote_without_one_is_refused() {
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"blue-green\"\nscale_down_delay = \"1h\"",
        )
    };
    h.deploy(s("hello:1")).await;
    assert!(
        h.svc.send(Command::Promote).await.is_err(),
        "no rollout in progress"
    );
    let mut rx = h.events.subscribe();
    let a = h
        .svc
        .send(Command::Deploy(Box::new(s("hello:2"))))
        .await
        .expect("deploy");
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.svc.send(Command::Abort).await.expect("abort");
    assert_eq!(
        wait_outcome(&mut rx, &a.command).await,
        Outcome::RolledBack("aborted by the user".into())
    );
    assert_eq!(h.served(), ["i1", "i2", "i3"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn remove_aborts_a_long_canary_and_reports_once_every_instance_is_gone() {
    let h = harness();
    let s = |img| {
        spec_of(
            img,
            "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 20, pause = \"1h\" }]",
        )
    };
    h.deploy(s("hello:1")).await;
    h.svc
        .send(Command::Deploy(Box::new(s("hello:2"))))
        .await
        .expect("deploy");
    until("canary at 20%", || h.record().weights.contains(&(2, 20))).await;
    let start = tokio::time::Instant::now();
    assert_eq!(h.run(Command::Remove).await, Outcome::Done);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "removal did not wait out the canary"
    );
    let started = h.inst.started.lock().expect("lock").len();
    assert_eq!(
        h.inst.stopped.lock().expect("lock").len(),
        started,
        "every instance is gone"
    );
    assert_eq!(started, 4, "the aborted rollout restored nothing");
    assert_eq!(
        h.store.get("services/web").await.expect("get"),
        None,
        "record deleted"
    );
    h.svc.gone().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_refused_revision_is_recorded_as_rejected_and_starts_nothing() {
    let h = harness();
    h.deploy(spec("")).await;
    let out = h.deploy(spec_of("hello:arm64-only", "")).await;
    assert!(
        matches!(&out, Outcome::Rejected(m) if m.contains("linux/amd64")),
        "{out:?}"
    );
    let r = h.record();
    assert_eq!(r.revisions[1].status, RevisionStatus::Rejected);
    assert_eq!(r.active, Some(1));
    assert_eq!(h.inst.started.lock().expect("lock").len(), 3);
    let refused = h
        .svc
        .send(Command::Deploy(Box::new(spec_of("hello:missing", ""))))
        .await;
    assert!(
        refused.is_err(),
        "an image that does not exist is refused at once"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ingress_changes_in_a_later_deploy_reach_the_ingress() {
    let h = harness();
    h.deploy(spec("")).await;
    let mut s = spec_of("hello:2", "");
    s.ingress.balance = slipway_core::service::BalanceKind::LeastRequests;
    s.ingress.hold_timeout = slipway_core::service::Dur(Duration::from_secs(3));
    h.deploy(s.clone()).await;
    let last = h.traffic.configured.lock().expect("lock").last().cloned();
    assert_eq!(last, Some(s.ingress));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_poll_trigger_added_by_a_later_deploy_polls() {
    let h = harness();
    h.deploy(spec_of("remote/hello:1.0.0", "")).await;
    h.deploy(spec_of(
        "remote/hello:1.0.0",
        "[trigger]\nsemver = \"^1\"\npoll_interval = \"5s\"",
    ))
    .await;
    h.images
        .remote_tags
        .lock()
        .expect("lock")
        .extend(["1.0.0".into(), "1.3.0".into()]);
    until("the poll found 1.3.0", || {
        h.record()
            .active_revision()
            .is_some_and(|r| r.image == "remote/hello@1.3.0")
    })
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn recovery_stops_what_the_record_does_not_route_and_restores_the_replicas() {
    let inst = Arc::new(FakeInstances::default());
    let store = Arc::new(MemoryStore::default());
    let h = harness_with(inst.clone(), store.clone());
    h.deploy(spec("")).await;
    // The daemon dies: one instance died with it, and one was being started.
    drop(h.svc);
    inst.dead.lock().expect("lock").push("i2".into());
    let orphan = inst
        .start(&InstanceSpec::of(&spec(""), 2, "hello@2"))
        .await
        .expect("start");
    let v = store
        .get("services/web")
        .await
        .expect("get")
        .expect("stored");
    let record: ServiceRecord = serde_json::from_slice(&v.value).expect("json");
    let svc = spawn(record, Some(v.version), h.deps.clone(), true);
    until("converged", || {
        let r = svc.record();
        r.phase == Phase::Idle
            && r.instances.len() == 3
            && r.stopping.is_empty()
            && !r.instances.iter().any(|i| i.id == "i2")
    })
    .await;
    let r = svc.record();
    assert!(
        !r.instances
            .iter()
            .any(|i| i.id == "i2" || i.id == orphan.id),
        "{r:?}"
    );
    assert!(
        inst.stopped.lock().expect("lock").contains(&orphan.id),
        "the orphan was stopped"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn with_exit_events_an_idle_service_does_not_poll_and_an_exit_is_healed_at_once() {
    let inst = Arc::new(FakeInstances {
        exit_events: Some(tokio::sync::watch::channel(0).0),
        ..FakeInstances::default()
    });
    let h = harness_with(inst.clone(), Arc::new(MemoryStore::default()));
    assert_eq!(h.deploy(spec("")).await, Outcome::Done);
    let before = inst.state_calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        inst.state_calls.load(Ordering::Relaxed),
        before,
        "nothing looked at the instances while nothing happened"
    );
    let victim = h.served()[0].clone();
    inst.dead.lock().expect("lock").push(victim.clone());
    let t0 = tokio::time::Instant::now();
    inst.exit_events
        .as_ref()
        .expect("events")
        .send_modify(|n| *n += 1);
    until("the dead instance was replaced", || {
        let s = h.served();
        s.len() == 3 && !s.contains(&victim)
    })
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "healed on the event, not on a timer: {:?}",
        t0.elapsed()
    );
    // Without an event, the resync still finds an exit within 30 s.
    let victim = h.served()[0].clone();
    inst.dead.lock().expect("lock").push(victim.clone());
    until("the resync replaced it", || !h.served().contains(&victim)).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_instance_that_failed_requests_is_readmitted_once_its_readiness_probe_passes() {
    let h = harness();
    assert_eq!(h.deploy(spec("")).await, Outcome::Done);
    let victim = h.record().instances.first().cloned().expect("an instance");
    h.inst.unready.lock().expect("lock").push(victim.id.clone());
    h.traffic.ejected.lock().expect("lock").push(victim.addr);
    h.traffic.ejections.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        h.traffic.ejected(),
        [victim.addr],
        "still out while its probe fails"
    );
    let mut rx = h.events.subscribe();
    h.inst.unready.lock().expect("lock").clear();
    until("readmitted", || h.traffic.ejected().is_empty()).await;
    let e = rx.recv().await.expect("event");
    assert!(e.message.contains("back in routing"), "{}", e.message);
}
