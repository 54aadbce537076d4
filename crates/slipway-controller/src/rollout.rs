//! One service's controller: first deploys, rollouts with each strategy, rollback,
//! scaling and self-healing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slipway_core::service::{Probe, ServiceSpec, Strategy};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{Event, Instance, Instances, Prober, Traffic};

/// How a deploy ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "message", rename_all = "kebab-case")]
pub enum Outcome {
    /// The new revision serves all traffic.
    Done,
    /// The new revision failed; the previous one serves again.
    RolledBack(String),
    /// The new revision failed and there was nothing to roll back to.
    Failed(String),
}

/// What happened to a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevisionStatus {
    /// Being rolled out.
    Progressing,
    /// Serving.
    Active,
    /// Replaced by a newer revision.
    Superseded,
    /// Rolled back.
    RolledBack,
    /// Failed with nothing to roll back to.
    Failed,
}

/// One revision of a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revision {
    /// 1, 2, 3, …
    pub number: u64,
    /// The pinned image it runs.
    pub image: String,
    /// The spec it was deployed with.
    pub spec: ServiceSpec,
    /// Its fate.
    pub status: RevisionStatus,
    /// Why, for failures.
    pub message: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
}

/// Everything `slipway status` and `history` show; persisted by the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    /// The service name.
    pub name: String,
    /// Revisions, oldest first.
    pub revisions: Vec<Revision>,
    /// The revision serving traffic.
    pub active: Option<u64>,
    /// Running instances (any revision).
    pub instances: Vec<Instance>,
    /// A one-line description of what is happening.
    pub phase: String,
    /// Traffic weights per revision, as last published.
    pub weights: Vec<(u64, u32)>,
}

/// A service's controller.
pub struct Controller {
    instances: Arc<dyn Instances>,
    prober: Arc<dyn Prober>,
    traffic: Arc<dyn Traffic>,
    events: broadcast::Sender<Event>,
    state: Arc<Mutex<ServiceState>>,
    liveness_failures: HashMap<String, u32>,
    persist: Option<Persist>,
    control: Arc<Control>,
    /// Autoscaling: the last (time, request count) sample and the last scaling time.
    rps_sample: Option<(Instant, u64)>,
    last_scaled: Option<Instant>,
}

/// Manual control of a rollout in progress (`slipway pause | resume | promote |
/// abort`). It is shared outside the controller's lock, since a rollout holds it.
#[derive(Debug, Default)]
pub struct Control {
    paused: std::sync::atomic::AtomicBool,
    /// Milliseconds spent paused in this rollout: the progress deadline stops too.
    paused_ms: std::sync::atomic::AtomicU64,
    promote: std::sync::atomic::AtomicBool,
    abort: std::sync::atomic::AtomicBool,
}

impl Control {
    /// Holds the rollout at its next step (a canary's pause stops counting).
    pub fn pause(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets a paused rollout go on.
    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Skips the remaining steps and holds: the new revision takes all traffic.
    pub fn promote(&self) {
        self.promote
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.resume();
    }

    /// Rolls the rollout back now.
    pub fn abort(&self) {
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn reset(&self) {
        for f in [&self.paused, &self.promote, &self.abort] {
            f.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        self.paused_ms.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    fn is(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Called with the state after every change, so a crash mid-rollout loses nothing.
pub type Persist = Arc<dyn Fn(&ServiceState) + Send + Sync>;

use slipway_core::now_ms;

/// Grace between SIGTERM and SIGKILL when stopping a drained instance.
const STOP_GRACE: Duration = Duration::from_secs(10);

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

impl Controller {
    /// A controller for a service, with its persisted state (or a fresh one).
    pub fn new(
        state: ServiceState,
        instances: Arc<dyn Instances>,
        prober: Arc<dyn Prober>,
        traffic: Arc<dyn Traffic>,
        events: broadcast::Sender<Event>,
    ) -> Self {
        Self {
            instances,
            prober,
            traffic,
            events,
            state: Arc::new(Mutex::new(state)),
            liveness_failures: HashMap::new(),
            persist: None,
            control: Arc::default(),
            rps_sample: None,
            last_scaled: None,
        }
    }

    /// A fresh state for a new service.
    pub fn empty_state(name: &str) -> ServiceState {
        ServiceState {
            name: name.to_owned(),
            revisions: Vec::new(),
            active: None,
            instances: Vec::new(),
            phase: "new".into(),
            weights: Vec::new(),
        }
    }

    /// Persists the state after every change.
    #[must_use]
    pub fn with_persist(mut self, persist: Persist) -> Self {
        self.persist = Some(persist);
        self
    }

    /// The rollout's manual controls.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Whether the progress deadline has passed, not counting time spent paused.
    fn past(&self, deadline: Instant) -> bool {
        let paused = Duration::from_millis(
            self.control
                .paused_ms
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        Instant::now() >= deadline + paused
    }

    fn add_paused(&self, d: Duration) {
        self.control.paused_ms.fetch_add(
            u64::try_from(d.as_millis()).unwrap_or(0),
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Waits while paused; fails when aborted.
    async fn checkpoint(&self, revision: u64) -> Result<(), String> {
        let mut announced = false;
        loop {
            if Control::is(&self.control.abort) {
                return Err("aborted by the user".into());
            }
            if !Control::is(&self.control.paused) {
                return Ok(());
            }
            if !announced {
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

    /// Shared handle on the state, for status readers.
    pub fn state(&self) -> Arc<Mutex<ServiceState>> {
        self.state.clone()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut ServiceState) -> T) -> T {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = f(&mut s);
        // Persisted under the lock, so snapshots reach the disk in order.
        if let Some(p) = &self.persist {
            p(&s);
        }
        out
    }

    /// Reads the state without persisting it.
    fn read_state<T>(&self, f: impl FnOnce(&ServiceState) -> T) -> T {
        f(&self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn event(&self, revision: Option<u64>, message: impl Into<String>) {
        let message = message.into();
        let service = self.with_state(|s| {
            s.phase.clone_from(&message);
            s.name.clone()
        });
        tracing::info!(service = %service, ?revision, "{message}");
        let _ = self.events.send(Event {
            at_ms: now_ms(),
            service,
            revision,
            message,
        });
    }

    fn set_status(&self, revision: u64, status: RevisionStatus, message: Option<String>) {
        self.with_state(|s| {
            if let Some(r) = s.revisions.iter_mut().find(|r| r.number == revision) {
                r.status = status;
                r.message = message;
            }
        });
    }

    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]) {
        self.traffic.publish(routes);
        self.with_state(|s| s.weights = routes.iter().map(|(r, w, _)| (*r, *w)).collect());
    }

    fn track(&self, add: &[Instance], remove: &[Instance]) {
        self.with_state(|s| {
            s.instances.retain(|i| !remove.iter().any(|r| r.id == i.id));
            s.instances.extend(add.iter().cloned());
        });
    }

    /// Waits until an instance passes startup and readiness, or fails: it died, or
    /// the deadline passed.
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
                if !self.instances.alive(inst).await {
                    return Err(format!("instance {} exited while starting", inst.id));
                }
                let ok = tokio::time::timeout(probe.timeout.0, self.prober.check(inst, probe))
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
    /// the ones started are stopped.
    async fn start_ready(
        &self,
        n: u32,
        revision: u64,
        image: &str,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Result<Vec<Instance>, String> {
        let mut started = Vec::new();
        let mut failure = None;
        for _ in 0..n {
            match self.instances.start(spec, revision, image).await {
                Ok(i) => {
                    self.track(std::slice::from_ref(&i), &[]);
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
                if let Err(e) = self.wait_ready(i, spec, deadline).await {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => Ok(started),
            Some(e) => {
                for i in &started {
                    self.instances.stop(i, Duration::from_secs(2)).await;
                }
                self.track(&[], &started);
                Err(e)
            }
        }
    }

    /// Waits for unpublished instances to finish their requests (up to the drain
    /// timeout), then stops them.
    async fn drain_and_stop(&self, insts: &[Instance], spec: &ServiceSpec) {
        if insts.is_empty() {
            return;
        }
        let deadline = Instant::now() + spec.drain_timeout.0;
        while insts.iter().any(|i| self.traffic.in_flight(i) > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for i in insts {
            self.instances.stop(i, STOP_GRACE).await;
        }
        self.track(&[], insts);
    }

    /// Checks the analysis limits against a revision's live traffic.
    fn analyse(&self, revision: u64, spec: &ServiceSpec) -> Result<(), String> {
        let s = self.traffic.stats(revision);
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
                if !self.instances.alive(i).await {
                    return Err(format!("instance {} of revision {revision} crashed", i.id));
                }
            }
            if Control::is(&self.control.abort) {
                return Err("aborted by the user".into());
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

    /// Deploys `spec` running `image` (pinned by digest) as a new revision.
    pub async fn deploy(&mut self, spec: ServiceSpec, image: String) -> Outcome {
        let number = self.read_state(|s| s.revisions.last().map_or(1, |r| r.number + 1));
        self.with_state(|s| {
            s.revisions.push(Revision {
                number,
                image: image.clone(),
                spec: spec.clone(),
                status: RevisionStatus::Progressing,
                message: None,
                created_ms: now_ms(),
            });
        });
        self.control.reset();
        self.event(Some(number), format!("revision {number} started ({image})"));
        let active = self.read_state(|s| s.active);
        let deadline = Instant::now() + spec.progress_deadline.0;
        let Some(old_rev) = active else {
            return self.first_deploy(number, &image, &spec, deadline).await;
        };
        let (old, old_spec) = self.read_state(|s| {
            let old: Vec<Instance> = s
                .instances
                .iter()
                .filter(|i| i.revision == old_rev)
                .cloned()
                .collect();
            let spec = s
                .revisions
                .iter()
                .find(|r| r.number == old_rev)
                .map(|r| r.spec.clone());
            (old, spec)
        });
        let old_spec = old_spec.unwrap_or_else(|| spec.clone());
        let old_image = self
            .with_state(|s| {
                s.revisions
                    .iter()
                    .find(|r| r.number == old_rev)
                    .map(|r| r.image.clone())
            })
            .unwrap_or_default();
        let mut ctx = Rollout {
            old_rev,
            old_image,
            old_spec,
            old,
            new: Vec::new(),
        };
        let result = match &spec.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => {
                self.rolling(
                    &mut ctx,
                    number,
                    &image,
                    &spec,
                    *max_surge,
                    *max_unavailable,
                    deadline,
                )
                .await
            }
            Strategy::BlueGreen { scale_down_delay } => {
                self.blue_green(
                    &mut ctx,
                    number,
                    &image,
                    &spec,
                    scale_down_delay.0,
                    deadline,
                )
                .await
            }
            Strategy::Canary { steps } => {
                let steps: Vec<(u32, Duration)> =
                    steps.iter().map(|s| (s.weight, s.pause.0)).collect();
                self.canary(&mut ctx, number, &image, &spec, &steps, deadline)
                    .await
            }
        };
        match result {
            Ok(()) => {
                self.set_status(old_rev, RevisionStatus::Superseded, None);
                self.set_status(number, RevisionStatus::Active, None);
                self.with_state(|s| s.active = Some(number));
                self.event(Some(number), format!("revision {number} is live"));
                Outcome::Done
            }
            Err(reason) => {
                self.event(Some(number), reason.clone());
                self.roll_back(&mut ctx, number, &spec).await;
                self.set_status(number, RevisionStatus::RolledBack, Some(reason.clone()));
                self.event(Some(old_rev), format!("rolled back to revision {old_rev}"));
                Outcome::RolledBack(reason)
            }
        }
    }

    async fn first_deploy(
        &mut self,
        number: u64,
        image: &str,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Outcome {
        match self
            .start_ready(spec.replicas, number, image, spec, deadline)
            .await
        {
            Ok(insts) => {
                self.publish(&[(number, 100, insts)]);
                self.set_status(number, RevisionStatus::Active, None);
                self.with_state(|s| s.active = Some(number));
                self.event(
                    Some(number),
                    format!("revision {number} is live with {} instances", spec.replicas),
                );
                Outcome::Done
            }
            Err(e) => {
                self.set_status(number, RevisionStatus::Failed, Some(e.clone()));
                self.event(Some(number), format!("revision {number} failed: {e}"));
                Outcome::Failed(e)
            }
        }
    }

    fn publish_both(&self, ctx: &Rollout, number: u64, new_weight: Option<u32>) {
        let (o, n) = (ctx.old.len(), ctx.new.len());
        // Without explicit weights each instance gets an equal share.
        let (wo, wn) = match new_weight {
            Some(w) => (100 - w, w),
            None => (
                u32::try_from(o).unwrap_or(u32::MAX),
                u32::try_from(n).unwrap_or(u32::MAX),
            ),
        };
        let mut routes = Vec::new();
        if o > 0 {
            routes.push((ctx.old_rev, wo, ctx.old.clone()));
        }
        if n > 0 {
            routes.push((number, wn, ctx.new.clone()));
        }
        self.publish(&routes);
    }

    /// Takes one old instance out of routing, drains and stops it.
    async fn retire_one_old(&self, ctx: &mut Rollout, number: u64, spec: &ServiceSpec) {
        if let Some(victim) = ctx.old.pop() {
            self.publish_both(ctx, number, None);
            self.drain_and_stop(std::slice::from_ref(&victim), spec)
                .await;
        }
    }

    #[expect(clippy::too_many_arguments, reason = "one rollout's parameters")]
    async fn rolling(
        &self,
        ctx: &mut Rollout,
        number: u64,
        image: &str,
        spec: &ServiceSpec,
        max_surge: u32,
        max_unavailable: u32,
        deadline: Instant,
    ) -> Result<(), String> {
        let replicas = spec.replicas as usize;
        let max_total = replicas + max_surge as usize;
        let min_available = replicas.saturating_sub(max_unavailable as usize);
        while ctx.new.len() < replicas {
            self.checkpoint(number).await?;
            if self.past(deadline) {
                return Err("progress deadline exceeded".into());
            }
            let total = ctx.old.len() + ctx.new.len();
            let room = max_total
                .saturating_sub(total)
                .min(replicas - ctx.new.len());
            if room == 0 {
                if !ctx.old.is_empty() && total > min_available {
                    self.retire_one_old(ctx, number, spec).await;
                    continue;
                }
                return Err("rollout cannot progress: raise max_surge or max_unavailable".into());
            }
            let batch = self
                .start_ready(
                    u32::try_from(room).unwrap_or(1),
                    number,
                    image,
                    spec,
                    deadline,
                )
                .await?;
            ctx.new.extend(batch);
            self.publish_both(ctx, number, None);
            self.event(
                Some(number),
                format!(
                    "{}/{} instances of revision {number} ready",
                    ctx.new.len(),
                    replicas
                ),
            );
            self.analyse(number, spec)?;
            while ctx.old.len() + ctx.new.len() > replicas && !ctx.old.is_empty() {
                self.retire_one_old(ctx, number, spec).await;
            }
        }
        while !ctx.old.is_empty() {
            self.retire_one_old(ctx, number, spec).await;
        }
        self.analyse(number, spec)
    }

    async fn blue_green(
        &self,
        ctx: &mut Rollout,
        number: u64,
        image: &str,
        spec: &ServiceSpec,
        delay: Duration,
        deadline: Instant,
    ) -> Result<(), String> {
        ctx.new = self
            .start_ready(spec.replicas, number, image, spec, deadline)
            .await?;
        self.publish(&[(number, 100, ctx.new.clone())]);
        self.event(
            Some(number),
            format!("switched all traffic to revision {number}; old set kept for {delay:?}"),
        );
        self.observe(number, spec, &ctx.new.clone(), delay).await?;
        let old = std::mem::take(&mut ctx.old);
        self.drain_and_stop(&old, spec).await;
        Ok(())
    }

    async fn canary(
        &self,
        ctx: &mut Rollout,
        number: u64,
        image: &str,
        spec: &ServiceSpec,
        steps: &[(u32, Duration)],
        deadline: Instant,
    ) -> Result<(), String> {
        let replicas = spec.replicas;
        for (i, (weight, pause)) in steps.iter().enumerate() {
            self.checkpoint(number).await?;
            if Control::is(&self.control.promote) {
                self.event(
                    Some(number),
                    format!("revision {number} promoted by the user"),
                );
                break;
            }
            if self.past(deadline) {
                return Err("progress deadline exceeded".into());
            }
            let want = (replicas * weight).div_ceil(100).clamp(1, replicas) as usize;
            self.grow_new(ctx, want, number, image, spec, deadline)
                .await?;
            self.publish_both(ctx, number, Some(*weight));
            self.event(
                Some(number),
                format!(
                    "canary step {}/{}: {weight}% of traffic on revision {number}",
                    i + 1,
                    steps.len()
                ),
            );
            self.observe(number, spec, &ctx.new.clone(), *pause).await?;
        }
        // Promote: the full new set, all traffic, then retire the old set.
        self.grow_new(ctx, replicas as usize, number, image, spec, deadline)
            .await?;
        self.publish(&[(number, 100, ctx.new.clone())]);
        let old = std::mem::take(&mut ctx.old);
        self.drain_and_stop(&old, spec).await;
        Ok(())
    }

    /// Starts (and waits for) new-revision instances until there are `want`.
    async fn grow_new(
        &self,
        ctx: &mut Rollout,
        want: usize,
        number: u64,
        image: &str,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Result<(), String> {
        if ctx.new.len() < want {
            let n = u32::try_from(want - ctx.new.len()).unwrap_or(1);
            ctx.new
                .extend(self.start_ready(n, number, image, spec, deadline).await?);
        }
        Ok(())
    }

    /// Restores the old revision to full strength and traffic, then removes the new
    /// revision's instances.
    async fn roll_back(&self, ctx: &mut Rollout, number: u64, spec: &ServiceSpec) {
        let missing = (ctx.old_spec.replicas as usize).saturating_sub(ctx.old.len());
        if missing > 0 {
            let deadline = Instant::now() + ctx.old_spec.progress_deadline.0;
            match self
                .start_ready(
                    u32::try_from(missing).unwrap_or(1),
                    ctx.old_rev,
                    &ctx.old_image.clone(),
                    &ctx.old_spec.clone(),
                    deadline,
                )
                .await
            {
                Ok(more) => ctx.old.extend(more),
                Err(e) => self.event(
                    Some(ctx.old_rev),
                    format!("could not restore revision {}: {e}", ctx.old_rev),
                ),
            }
        }
        if !ctx.old.is_empty() {
            self.publish(&[(ctx.old_rev, 100, ctx.old.clone())]);
        }
        let new = std::mem::take(&mut ctx.new);
        self.drain_and_stop(&new, spec).await;
        let stray: Vec<Instance> = self.read_state(|s| {
            s.instances
                .iter()
                .filter(|i| i.revision == number)
                .cloned()
                .collect()
        });
        self.drain_and_stop(&stray, spec).await;
    }

    /// Rolls back to `to` (default: the revision before the active one) by deploying
    /// its image and spec again as a new revision.
    pub async fn rollback(&mut self, to: Option<u64>) -> Outcome {
        let target = self.read_state(|s| {
            let active = s.active?;
            match to {
                Some(n) => s
                    .revisions
                    .iter()
                    .find(|r| r.number == n && n != active)
                    .cloned(),
                None => s
                    .revisions
                    .iter()
                    .rev()
                    .find(|r| r.number < active && matches!(r.status, RevisionStatus::Superseded))
                    .cloned(),
            }
        });
        match target {
            Some(r) => self.deploy(r.spec, r.image).await,
            None => Outcome::Failed("no earlier revision to roll back to".into()),
        }
    }

    /// Changes the number of instances of the active revision, without downtime.
    pub async fn scale(&mut self, replicas: u32) -> Result<(), String> {
        let (active, rev) = self.read_state(|s| {
            (
                s.active,
                s.active
                    .and_then(|a| s.revisions.iter().find(|r| r.number == a).cloned()),
            )
        });
        let (Some(active), Some(rev)) = (active, rev) else {
            return Err("the service has no active revision".into());
        };
        let mut spec = rev.spec.clone();
        spec.replicas = replicas;
        let mut current: Vec<Instance> = self.read_state(|s| {
            s.instances
                .iter()
                .filter(|i| i.revision == active)
                .cloned()
                .collect()
        });
        if current.len() < replicas as usize {
            let deadline = Instant::now() + spec.progress_deadline.0;
            let more = self
                .start_ready(
                    replicas - u32::try_from(current.len()).unwrap_or(0),
                    active,
                    &rev.image,
                    &spec,
                    deadline,
                )
                .await?;
            current.extend(more);
            self.publish(&[(active, 100, current.clone())]);
        } else {
            let extra = current.split_off(replicas as usize);
            self.publish(&[(active, 100, current.clone())]);
            self.drain_and_stop(&extra, &spec).await;
        }
        self.with_state(|s| {
            if let Some(r) = s.revisions.iter_mut().find(|r| r.number == active) {
                r.spec.replicas = replicas;
            }
        });
        self.event(Some(active), format!("scaled to {replicas} instances"));
        Ok(())
    }

    /// One self-healing pass: instances that died or fail liveness are replaced
    /// (the replacement is ready before the failed one leaves routing).
    pub async fn heal_once(&mut self) {
        let (active, rev, insts) = self.read_state(|s| {
            let rev = s
                .active
                .and_then(|a| s.revisions.iter().find(|r| r.number == a).cloned());
            (s.active, rev, s.instances.clone())
        });
        let (Some(active), Some(rev)) = (active, rev) else {
            return;
        };
        for inst in insts.iter().filter(|i| i.revision == active) {
            let alive = self.instances.alive(inst).await;
            let live = match (&rev.spec.health.liveness, alive) {
                (_, false) => false,
                (None, true) => true,
                (Some(p), true) => {
                    let ok = tokio::time::timeout(p.timeout.0, self.prober.check(inst, p))
                        .await
                        .unwrap_or(false);
                    let n = self.liveness_failures.entry(inst.id.clone()).or_default();
                    *n = if ok { 0 } else { *n + 1 };
                    *n < p.failure_threshold
                }
            };
            if live {
                continue;
            }
            self.liveness_failures.remove(&inst.id);
            self.event(
                Some(active),
                format!("instance {} failed; replacing it", inst.id),
            );
            let deadline = Instant::now() + rev.spec.progress_deadline.0;
            let replacement = self
                .start_ready(1, active, &rev.image, &rev.spec, deadline)
                .await;
            let mut current: Vec<Instance> = self.read_state(|s| {
                s.instances
                    .iter()
                    .filter(|i| i.revision == active && i.id != inst.id)
                    .cloned()
                    .collect()
            });
            if let Err(e) = &replacement {
                self.event(Some(active), format!("replacement failed: {e}"));
            }
            current.retain(|i| i.id != inst.id);
            self.publish(&[(active, 100, current)]);
            self.drain_and_stop(std::slice::from_ref(inst), &rev.spec)
                .await;
        }
    }

    /// One autoscaling decision: from the active revision's requests/s since the last
    /// call, the instance count that puts each near `target_rps`, within min..max,
    /// at most once per cooldown. Returns the new count when it scaled.
    pub async fn autoscale_once(&mut self) -> Option<u32> {
        let (active, spec, current) = self.read_state(|s| {
            let rev = s
                .active
                .and_then(|a| s.revisions.iter().find(|r| r.number == a));
            (
                s.active,
                rev.map(|r| r.spec.clone()),
                s.instances
                    .iter()
                    .filter(|i| Some(i.revision) == s.active)
                    .count(),
            )
        });
        let (active, spec) = (active?, spec?);
        let auto = spec.autoscale.clone()?;
        let now = Instant::now();
        let requests = self.traffic.stats(active).requests;
        let previous = self.rps_sample.replace((now, requests));
        let (then, before) = previous?;
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        #[expect(clippy::cast_precision_loss, reason = "request counts")]
        let rps = requests.saturating_sub(before) as f64 / secs;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to 1..=100"
        )]
        let desired = ((rps / auto.target_rps).ceil() as u32).clamp(auto.min, auto.max);
        let cooled = self
            .last_scaled
            .is_none_or(|t| now.duration_since(t) >= auto.cooldown.0);
        if desired as usize == current || !cooled {
            return None;
        }
        self.event(
            Some(active),
            format!("autoscaling from {current} to {desired} instances ({rps:.0} req/s)"),
        );
        self.last_scaled = Some(now);
        self.scale(desired).await.ok().map(|()| desired)
    }

    /// Converges after a daemon restart: a rollout that was interrupted is rolled
    /// back, the active revision's live instances serve again, and the next
    /// [`Controller::heal_once`] replaces the ones that are gone.
    pub async fn recover(&mut self) {
        let (active, insts, interrupted) = self.read_state(|s| {
            let interrupted: Vec<u64> = s
                .revisions
                .iter()
                .filter(|r| r.status == RevisionStatus::Progressing)
                .map(|r| r.number)
                .collect();
            (s.active, s.instances.clone(), interrupted)
        });
        for n in &interrupted {
            let status = if active.is_some() {
                RevisionStatus::RolledBack
            } else {
                RevisionStatus::Failed
            };
            self.set_status(
                *n,
                status,
                Some("the daemon restarted during the rollout".into()),
            );
        }
        let mut live = Vec::new();
        let mut stray = Vec::new();
        for i in insts {
            if Some(i.revision) == active && self.instances.alive(&i).await {
                live.push(i);
            } else {
                stray.push(i);
            }
        }
        if let Some(a) = active {
            self.publish(&[(a, 100, live.clone())]);
        }
        let spec = self.read_state(|s| s.revisions.last().map(|r| r.spec.clone()));
        if let Some(spec) = spec {
            self.drain_and_stop(&stray, &spec).await;
        }
        if let Some(a) = active {
            let want = self.read_state(|s| {
                s.revisions
                    .iter()
                    .find(|r| r.number == a)
                    .map_or(0, |r| r.spec.replicas as usize)
            });
            if live.len() < want
                && let Err(e) = self.scale(u32::try_from(want).unwrap_or(1)).await
            {
                self.event(Some(a), format!("could not restore {want} instances: {e}"));
            }
            self.event(
                Some(a),
                format!("recovered revision {a} with {} live instances", live.len()),
            );
        }
    }

    /// Stops every instance (the service is being removed).
    pub async fn remove(&mut self) {
        self.publish(&[]);
        let (insts, spec) = self.read_state(|s| {
            (
                s.instances.clone(),
                s.revisions.last().map(|r| r.spec.clone()),
            )
        });
        if let Some(spec) = spec {
            self.drain_and_stop(&insts, &spec).await;
        }
    }
}

struct Rollout {
    old_rev: u64,
    old_image: String,
    old_spec: ServiceSpec,
    old: Vec<Instance>,
    new: Vec<Instance>,
}

#[cfg(test)]
mod tests;
