//! The engine under a service's actor: the record and its writer, and the steps
//! every operation is made of (start and wait for ready, publish, drain, retire in
//! the background). Strategies are in `strategy.rs`; scale, heal, autoscale,
//! recover and remove in `maintain.rs`.

mod maintain;
mod strategy;

pub(crate) use strategy::Begun;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use slipway_core::now_ms;
use slipway_core::service::{Probe, ServiceSpec};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::record::{Outcome, Phase, RevisionStatus, ServiceRecord};
use crate::state::{StateError, StateStore};
use crate::{
    Event, Gate, Images, Instance, InstanceSpec, InstanceState, Instances, Prober, Traffic,
};

/// Everything a service's actor acts through.
#[derive(Clone)]
pub struct ServiceDeps {
    /// Starts and stops instances.
    pub instances: Arc<dyn Instances>,
    /// Health checks.
    pub prober: Arc<dyn Prober>,
    /// The service's ingress.
    pub traffic: Arc<dyn Traffic>,
    /// Pins images, lists remote tags.
    pub images: Arc<dyn Images>,
    /// Admits revisions.
    pub gate: Arc<dyn Gate>,
    /// Where the record persists.
    pub store: Arc<dyn StateStore>,
    /// Where events go.
    pub events: broadcast::Sender<Event>,
}

/// The state-store key of a service's record.
pub(crate) fn record_key(name: &str) -> String {
    format!("services/{name}")
}

/// Manual control of a rollout in progress. Shared outside the engine, since a
/// rollout holds the engine while the actor takes commands.
#[derive(Debug, Default)]
pub(crate) struct Control {
    paused: AtomicBool,
    /// Milliseconds spent paused in this rollout: the progress deadline stops too.
    paused_ms: AtomicU64,
    promote: AtomicBool,
    abort: AtomicBool,
    /// The service is being removed: an aborted rollout restores nothing.
    removing: AtomicBool,
}

impl Control {
    pub(crate) fn set_paused(&self, on: bool) {
        self.paused.store(on, Ordering::SeqCst);
    }
    pub(crate) fn promote(&self) {
        self.promote.store(true, Ordering::SeqCst);
    }
    pub(crate) fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }
    pub(crate) fn removing(&self) {
        self.removing.store(true, Ordering::SeqCst);
        self.abort();
    }
    /// A new rollout starts: promote and abort apply to one rollout only (pause
    /// belongs to the service and stays).
    fn reset(&self) {
        self.promote.store(false, Ordering::SeqCst);
        self.abort.store(false, Ordering::SeqCst);
        self.paused_ms.store(0, Ordering::SeqCst);
    }
    fn is(flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst)
    }
}

/// The record's writer: a task that persists the latest snapshot, in order, so
/// rollouts never wait on an fsync; [`Engine::flush`] waits for it before anything
/// is reported.
struct Writer {
    written: watch::Receiver<u64>,
    /// The record as last made durable: what readers are shown.
    durable: watch::Receiver<ServiceRecord>,
    version: Arc<tokio::sync::Mutex<Option<u64>>>,
    fenced: Arc<AtomicBool>,
}

impl Writer {
    fn spawn(
        store: Arc<dyn StateStore>,
        key: String,
        version: Option<u64>,
        mut rx: watch::Receiver<(u64, ServiceRecord)>,
    ) -> Self {
        let (written_tx, written) = watch::channel(rx.borrow().0);
        let (durable_tx, durable) = watch::channel(rx.borrow().1.clone());
        let version = Arc::new(tokio::sync::Mutex::new(version));
        let fenced = Arc::new(AtomicBool::new(false));
        let (v, f) = (version.clone(), fenced.clone());
        let mut last: Option<Vec<u8>> = None;
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let (generation, bytes, record) = {
                    let snap = rx.borrow_and_update();
                    (
                        snap.0,
                        serde_json::to_vec(&snap.1).unwrap_or_default(),
                        snap.1.clone(),
                    )
                };
                // Write only on change.
                if last.as_ref() != Some(&bytes) && !f.load(Ordering::SeqCst) {
                    let mut backoff = Duration::from_millis(50);
                    loop {
                        let mut current = v.lock().await;
                        match store.put(&key, bytes.clone(), *current).await {
                            Ok(new) => {
                                *current = Some(new);
                                break;
                            }
                            Err(e @ (StateError::Conflict { .. } | StateError::Fenced(_))) => {
                                // Another writer owns the record now: stop writing.
                                tracing::error!(key = %key, "{e}; this controller stops writing");
                                f.store(true, Ordering::SeqCst);
                                break;
                            }
                            Err(e) => {
                                drop(current);
                                tracing::warn!(key = %key, "{e}; retrying in {backoff:?}");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                            }
                        }
                    }
                    last = Some(bytes);
                }
                if !f.load(Ordering::SeqCst) {
                    durable_tx.send_replace(record);
                }
                written_tx.send_replace(generation);
            }
        });
        Self {
            written,
            durable,
            version,
            fenced,
        }
    }
}

/// One service's engine: its record, its dependencies and rollout bookkeeping.
pub(crate) struct Engine {
    deps: ServiceDeps,
    record: Arc<watch::Sender<(u64, ServiceRecord)>>,
    writer: Writer,
    control: Arc<Control>,
    liveness_failures: HashMap<String, u32>,
    /// Autoscaling: the last (time, request count) sample and the last scaling time.
    rps_sample: Option<(Instant, u64)>,
    last_scaled: Option<Instant>,
    /// The command being worked on, for events.
    command: Option<String>,
    /// Instances already reported as unknown (reported once, never replaced).
    unknown: Vec<String>,
}

fn default_readiness() -> Probe {
    Probe {
        http: None,
        tcp: true,
        exec: None,
        interval: slipway_core::service::Dur(Duration::from_millis(100)),
        timeout: slipway_core::service::Dur(Duration::from_secs(1)),
        success_threshold: 1,
        failure_threshold: 3,
    }
}

impl Engine {
    /// An engine over `record`, persisted at `version` (`None`: not yet stored).
    pub(crate) fn new(
        record: ServiceRecord,
        version: Option<u64>,
        deps: ServiceDeps,
        control: Arc<Control>,
    ) -> Self {
        control.set_paused(record.paused);
        let key = record_key(&record.name);
        let (tx, rx) = watch::channel((0, record));
        let writer = Writer::spawn(deps.store.clone(), key, version, rx);
        Self {
            deps,
            record: Arc::new(tx),
            writer,
            control,
            liveness_failures: HashMap::new(),
            rps_sample: None,
            last_scaled: None,
            command: None,
            unknown: Vec::new(),
        }
    }

    /// The record as last made durable, for readers: nothing they are shown can
    /// be lost by a crash.
    pub(crate) fn durable(&self) -> watch::Receiver<ServiceRecord> {
        self.writer.durable.clone()
    }

    pub(crate) fn deps(&self) -> &ServiceDeps {
        &self.deps
    }

    /// The record's sender, for the actor's mailbox (pause flag, notes).
    pub(crate) fn record_handle(&self) -> Arc<watch::Sender<(u64, ServiceRecord)>> {
        self.record.clone()
    }

    pub(crate) fn command(&self) -> Option<&str> {
        self.command.as_deref()
    }

    pub(crate) fn set_command(&mut self, id: Option<String>) {
        self.command = id;
    }

    /// Changes the record; the writer persists it.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut ServiceRecord) -> T) -> T {
        let mut out = None;
        self.record.send_modify(|(generation, r)| {
            out = Some(f(r));
            *generation += 1;
        });
        match out {
            Some(v) => v,
            None => unreachable!("send_modify runs its closure"),
        }
    }

    /// Reads the record.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ServiceRecord) -> T) -> T {
        f(&self.record.borrow().1)
    }

    /// Waits until every change so far is durable (or the store gave up on us).
    pub(crate) async fn flush(&self) {
        let want = self.record.borrow().0;
        let mut written = self.writer.written.clone();
        let done =
            tokio::time::timeout(Duration::from_secs(30), written.wait_for(|w| *w >= want)).await;
        if done.is_err() {
            tracing::error!(service = %self.name(), "the state store did not persist the record within 30 s");
        }
    }

    /// Whether another writer took the record over.
    pub(crate) fn fenced(&self) -> bool {
        self.writer.fenced.load(Ordering::SeqCst)
    }

    /// Deletes the persisted record (after [`Engine::flush`]).
    pub(crate) async fn delete_record(&self) -> Result<(), StateError> {
        let version = *self.writer.version.lock().await;
        match version {
            Some(v) => self.deps.store.delete(&record_key(&self.name()), v).await,
            None => Ok(()),
        }
    }

    pub(crate) fn name(&self) -> String {
        self.read(|r| r.name.clone())
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        if self.read(|r| r.phase != phase) {
            self.update(|r| r.phase = phase);
        }
    }

    /// Records and broadcasts an event.
    pub(crate) fn event(&self, revision: Option<u64>, message: impl Into<String>) {
        self.emit(revision, message.into(), None);
    }

    fn emit(&self, revision: Option<u64>, message: String, outcome: Option<Outcome>) {
        // The record keeps the last thing that happened; an outcome only restates it.
        let service = if outcome.is_none() {
            self.update(|r| {
                r.message.clone_from(&message);
                r.name.clone()
            })
        } else {
            self.name()
        };
        tracing::info!(service = %service, ?revision, "{message}");
        let _ = self.deps.events.send(Event {
            at_ms: now_ms(),
            service,
            revision,
            command: self.command.clone(),
            message,
            outcome,
        });
    }

    /// Reports how the current command ended, once the record is durable.
    pub(crate) async fn finish(&self, revision: Option<u64>, outcome: Outcome) {
        self.flush().await;
        let message = match &outcome {
            Outcome::Done => "done".to_owned(),
            Outcome::RolledBack(m) => format!("rolled back: {m}"),
            Outcome::Failed(m) => format!("failed: {m}"),
            Outcome::Rejected(m) => format!("rejected: {m}"),
        };
        self.emit(revision, message, Some(outcome));
    }

    fn set_status(&self, revision: u64, status: RevisionStatus, message: Option<String>) {
        self.update(|s| {
            if let Some(r) = s.revisions.iter_mut().find(|r| r.number == revision) {
                r.status = status;
                r.message = message;
            }
        });
    }

    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]) {
        self.deps.traffic.publish(routes);
        self.update(|s| s.weights = routes.iter().map(|(r, w, _)| (*r, *w)).collect());
    }

    /// Whether the progress deadline has passed, not counting time spent paused.
    fn past(&self, deadline: Instant) -> bool {
        let paused = Duration::from_millis(self.control.paused_ms.load(Ordering::SeqCst));
        Instant::now() >= deadline + paused
    }

    fn add_paused(&self, d: Duration) {
        self.control
            .paused_ms
            .fetch_add(u64::try_from(d.as_millis()).unwrap_or(0), Ordering::SeqCst);
    }

    /// Waits while paused; fails when aborted or fenced.
    async fn checkpoint(&self, revision: u64) -> Result<(), String> {
        let mut announced = false;
        loop {
            if Control::is(&self.control.abort) {
                return Err(if Control::is(&self.control.removing) {
                    "the service is being removed".into()
                } else {
                    "aborted by the user".into()
                });
            }
            if self.fenced() {
                return Err("another controller took the service over".into());
            }
            if !Control::is(&self.control.paused) {
                if announced {
                    self.set_phase(Phase::RollingOut);
                    self.event(
                        Some(revision),
                        format!("rollout of revision {revision} resumed"),
                    );
                }
                return Ok(());
            }
            if !announced {
                self.set_phase(Phase::Paused);
                self.event(
                    Some(revision),
                    format!("rollout of revision {revision} paused"),
                );
                announced = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.add_paused(Duration::from_millis(100));
        }
    }

    /// Waits until an instance passes startup and readiness, or fails: it exited,
    /// or the deadline passed. An instance in an unknown state is waited for.
    async fn wait_ready(
        &self,
        inst: &Instance,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Result<(), String> {
        let default = default_readiness();
        let probes: Vec<&Probe> = spec
            .health
            .startup
            .iter()
            .chain([spec.health.readiness.as_ref().unwrap_or(&default)])
            .collect();
        for probe in probes {
            let mut passes = 0;
            loop {
                if self.past(deadline) {
                    return Err(format!(
                        "instance {} never became ready before the progress deadline",
                        inst.id
                    ));
                }
                if Control::is(&self.control.abort) {
                    return Err("aborted".into());
                }
                if self.deps.instances.state(inst).await == InstanceState::Exited {
                    return Err(format!("instance {} exited while starting", inst.id));
                }
                let ok = tokio::time::timeout(probe.timeout.0, self.deps.prober.check(inst, probe))
                    .await
                    .unwrap_or(false);
                passes = if ok { passes + 1 } else { 0 };
                if passes >= probe.success_threshold {
                    break;
                }
                tokio::time::sleep(probe.interval.0.min(Duration::from_millis(200))).await;
            }
        }
        Ok(())
    }

    /// Starts `n` instances of a revision and waits for all to be ready. On failure
    /// the ones started are retired.
    async fn start_ready(
        &self,
        n: u32,
        spec: &InstanceSpec,
        service: &ServiceSpec,
        deadline: Instant,
    ) -> Result<Vec<Instance>, String> {
        let mut started = Vec::new();
        let mut failure = None;
        for _ in 0..n {
            match self.deps.instances.start(spec).await {
                Ok(i) => {
                    self.update(|r| r.instances.push(i.clone()));
                    started.push(i);
                }
                Err(e) => {
                    failure = Some(format!("cannot start an instance: {e}"));
                    break;
                }
            }
        }
        if failure.is_none() {
            for i in &started {
                if let Err(e) = self.wait_ready(i, service, deadline).await {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => Ok(started),
            Some(e) => {
                self.retire(&started, Duration::from_secs(2));
                Err(e)
            }
        }
    }

    /// Moves instances that left routing to `stopping` and stops them in the
    /// background: nothing waits for a process to exit. Each leaves `stopping`
    /// once it is gone.
    fn retire(&self, insts: &[Instance], grace: Duration) {
        if insts.is_empty() {
            return;
        }
        self.update(|r| {
            r.instances.retain(|i| !insts.iter().any(|x| x.id == i.id));
            for i in insts {
                if !r.stopping.iter().any(|s| s.id == i.id) {
                    r.stopping.push(i.clone());
                }
            }
        });
        for i in insts {
            let (instances, record, inst) =
                (self.deps.instances.clone(), self.record.clone(), i.clone());
            tokio::spawn(async move {
                if let Err(e) = instances.stop(&inst, grace).await {
                    tracing::warn!(instance = %inst.id, "cannot stop instance: {e}");
                }
                record.send_modify(|(generation, r)| {
                    r.stopping.retain(|s| s.id != inst.id);
                    *generation += 1;
                });
            });
        }
    }

    /// Waits until every instance being stopped is gone.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.record.subscribe();
        let _ = rx.wait_for(|(_, r)| r.stopping.is_empty()).await;
    }

    /// Waits for unpublished instances to finish their requests (up to the drain
    /// timeout), then retires them.
    async fn drain_and_retire(&self, insts: &[Instance], spec: &ServiceSpec) {
        if insts.is_empty() {
            return;
        }
        let deadline = Instant::now() + spec.drain_timeout.0;
        while insts.iter().any(|i| self.deps.traffic.in_flight(i) > 0) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.retire(insts, spec.stop_timeout.0);
    }

    /// Checks the analysis limits against a revision's live traffic.
    fn analyse(&self, revision: u64, spec: &ServiceSpec) -> Result<(), String> {
        let s = self.deps.traffic.stats(revision);
        if s.requests < spec.analysis.min_requests {
            return Ok(());
        }
        #[expect(clippy::cast_precision_loss, reason = "ratio of counters")]
        let rate = s.errors as f64 / s.requests as f64;
        if rate > spec.analysis.max_error_rate {
            return Err(format!(
                "analysis failed: error rate {:.1}% > {:.1}% over {} requests",
                rate * 100.0,
                spec.analysis.max_error_rate * 100.0,
                s.requests
            ));
        }
        if let Some(max) = spec.analysis.max_p99 {
            let max_ms = u64::try_from(max.0.as_millis()).unwrap_or(u64::MAX);
            if s.p99_ms > max_ms {
                return Err(format!(
                    "analysis failed: p99 latency {} ms > {max_ms} ms",
                    s.p99_ms
                ));
            }
        }
        Ok(())
    }

    /// Holds for `pause`, analysing every 200 ms; fails early on a bad verdict or a
    /// crashed instance of `revision`.
    async fn observe(
        &self,
        revision: u64,
        spec: &ServiceSpec,
        new: &[Instance],
        pause: Duration,
    ) -> Result<(), String> {
        let mut end = Instant::now() + pause;
        loop {
            self.analyse(revision, spec)?;
            for i in new {
                if self.deps.instances.state(i).await == InstanceState::Exited {
                    return Err(format!("instance {} of revision {revision} crashed", i.id));
                }
            }
            if Control::is(&self.control.abort) {
                return self.checkpoint(revision).await;
            }
            if Control::is(&self.control.promote) || Instant::now() >= end {
                return Ok(());
            }
            let tick = Duration::from_millis(200).min(end - Instant::now());
            tokio::time::sleep(tick).await;
            if Control::is(&self.control.paused) {
                // A paused hold does not count down, nor does the progress deadline.
                end += tick;
                self.add_paused(tick);
            }
        }
    }

    /// Forgets traffic counters of revisions that no longer serve or roll out.
    fn prune_stats(&self) {
        let keep: Vec<u64> = self.read(|r| {
            r.revisions
                .iter()
                .filter(|x| {
                    matches!(
                        x.status,
                        RevisionStatus::Active | RevisionStatus::Progressing
                    )
                })
                .map(|x| x.number)
                .collect()
        });
        self.deps.traffic.retain_stats(&keep);
    }
}

#[cfg(test)]
mod tests;
