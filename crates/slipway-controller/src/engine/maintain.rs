//! Keeping a service as its active revision says: scale, heal, autoscale, recover
//! after a restart, and remove.

use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use crate::record::{Phase, Revision, RevisionStatus};
use crate::{Instance, InstanceSpec, InstanceState};

impl Engine {
    /// The revision a rollback goes to: `to`, or the newest superseded one before
    /// the active revision.
    pub(crate) fn rollback_target(&self, to: Option<u64>) -> Result<Revision, String> {
        self.read(|s| {
            let Some(active) = s.active else {
                return Err("the service has no active revision to roll back from".into());
            };
            match to {
                Some(n) if n == active => Err(format!("revision {n} is already active")),
                Some(n) => s
                    .revision(n)
                    .filter(|r| r.status != RevisionStatus::Rejected)
                    .cloned()
                    .ok_or_else(|| format!("no revision {n} to roll back to")),
                None => s
                    .revisions
                    .iter()
                    .rev()
                    .find(|r| r.number < active && r.status == RevisionStatus::Superseded)
                    .cloned()
                    .ok_or_else(|| "no earlier revision to roll back to".into()),
            }
        })
    }

    /// Changes the number of instances of the active revision, without downtime.
    pub(crate) async fn scale(&mut self, replicas: u32) -> Result<(), String> {
        let Some(rev) = self.read(|s| s.active_revision().cloned()) else {
            return Err("the service has no active revision".into());
        };
        let active = rev.number;
        self.set_phase(Phase::Scaling);
        let mut spec = rev.spec.clone();
        spec.replicas = replicas;
        let mut current = self.read(|s| s.instances_of(active));
        let result = if current.len() < replicas as usize {
            let deadline = Instant::now() + spec.progress_deadline.0;
            let inst = InstanceSpec::of(&spec, active, &rev.image);
            match self
                .start_ready(
                    replicas - u32::try_from(current.len()).unwrap_or(0),
                    &inst,
                    &spec,
                    deadline,
                )
                .await
            {
                Ok(more) => {
                    current.extend(more);
                    self.publish(&[(active, 100, current.clone())]);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            let extra = current.split_off(replicas as usize);
            self.publish(&[(active, 100, current.clone())]);
            self.drain_and_retire(&extra, &spec).await;
            Ok(())
        };
        if result.is_ok() {
            self.update(|s| {
                if let Some(r) = s.revisions.iter_mut().find(|r| r.number == active) {
                    r.spec.replicas = replicas;
                }
            });
            self.event(Some(active), format!("scaled to {replicas} instances"));
        }
        self.set_phase(Phase::Idle);
        result
    }

    /// Moves the active revision's instances named in `ids` elsewhere without
    /// dropping a request: their replacements start and become ready first,
    /// then they leave routing, drain and stop.
    pub(crate) async fn replace(&mut self, ids: &[String]) -> Result<(), String> {
        let Some(rev) = self.read(|s| s.active_revision().cloned()) else {
            return Ok(());
        };
        let active = rev.number;
        let moving: Vec<Instance> = self
            .read(|s| s.instances_of(active))
            .into_iter()
            .filter(|i| ids.contains(&i.id))
            .collect();
        if moving.is_empty() {
            return Ok(());
        }
        self.set_phase(Phase::Healing);
        self.event(
            Some(active),
            format!("moving {} instance(s) elsewhere", moving.len()),
        );
        let inst_spec = InstanceSpec::of(&rev.spec, active, &rev.image);
        let deadline = Instant::now() + rev.spec.progress_deadline.0;
        let n = u32::try_from(moving.len()).unwrap_or(1);
        let result = self
            .start_ready(n, &inst_spec, &rev.spec, deadline)
            .await
            .map(|_| ());
        if result.is_ok() {
            let current: Vec<Instance> = self
                .read(|s| s.instances_of(active))
                .into_iter()
                .filter(|i| !ids.contains(&i.id))
                .collect();
            self.publish(&[(active, 100, current)]);
            self.drain_and_retire(&moving, &rev.spec).await;
        }
        self.set_phase(Phase::Idle);
        result
    }

    /// One self-healing pass: instances that exited or fail liveness are replaced
    /// (the replacement is ready before the failed one leaves routing), and the
    /// active revision is brought back to its replica count. An instance whose
    /// state is unknown is left alone. Returns whether it changed anything.
    pub(crate) async fn heal_once(&mut self) -> bool {
        let Some(rev) = self.read(|s| s.active_revision().cloned()) else {
            return false;
        };
        let active = rev.number;
        let insts = self.read(|s| s.instances_of(active));
        let mut failed = Vec::new();
        let mut exited = Vec::new();
        for inst in &insts {
            let state = self.deps.instances.state(inst).await;
            if state == InstanceState::Exited {
                exited.push(inst.id.clone());
            }
            let live = match (&rev.spec.health.liveness, state) {
                (_, InstanceState::Exited) => false,
                (_, InstanceState::Unknown) => {
                    if !self.unknown.contains(&inst.id) {
                        self.unknown.push(inst.id.clone());
                        self.event(
                            Some(active),
                            format!("instance {} is in an unknown state; keeping it", inst.id),
                        );
                    }
                    true
                }
                (None, InstanceState::Running) => true,
                (Some(p), InstanceState::Running) => {
                    let ok = tokio::time::timeout(p.timeout.0, self.deps.prober.check(inst, p))
                        .await
                        .unwrap_or(false);
                    let n = self.liveness_failures.entry(inst.id.clone()).or_default();
                    *n = if ok { 0 } else { *n + 1 };
                    *n < p.failure_threshold
                }
            };
            if state != InstanceState::Unknown {
                self.unknown.retain(|u| u != &inst.id);
            }
            if !live {
                failed.push(inst.clone());
            }
        }
        let missing = (rev.spec.replicas as usize).saturating_sub(insts.len());
        let extra = insts.len().saturating_sub(rev.spec.replicas as usize);
        if failed.is_empty() && missing == 0 && extra == 0 {
            return false;
        }
        self.set_phase(Phase::Healing);
        if extra > 0 {
            let mut keep = insts.clone();
            let surplus = keep.split_off(rev.spec.replicas as usize);
            self.publish(&[(active, 100, keep)]);
            self.drain_and_retire(&surplus, &rev.spec).await;
        }
        // An exited instance (or one on a node that is down) serves nothing: it
        // leaves routing now, not after its replacement is ready.
        if !exited.is_empty() && exited.len() < insts.len() {
            let serving: Vec<Instance> = insts
                .iter()
                .filter(|i| !exited.contains(&i.id))
                .cloned()
                .collect();
            self.publish(&[(active, 100, serving)]);
        }
        let inst_spec = InstanceSpec::of(&rev.spec, active, &rev.image);
        // Exited ones are replaced together (a node that died takes several).
        let (gone, unhealthy): (Vec<Instance>, Vec<Instance>) =
            failed.into_iter().partition(|i| exited.contains(&i.id));
        if !gone.is_empty() {
            for inst in &gone {
                self.liveness_failures.remove(&inst.id);
            }
            let names: Vec<&str> = gone.iter().map(|i| i.id.as_str()).collect();
            self.event(
                Some(active),
                format!("instance(s) {} exited; replacing them", names.join(", ")),
            );
            let deadline = Instant::now() + rev.spec.progress_deadline.0;
            let n = u32::try_from(gone.len()).unwrap_or(1);
            if let Err(e) = self.start_ready(n, &inst_spec, &rev.spec, deadline).await {
                self.event(Some(active), format!("replacement failed: {e}"));
            }
            let current: Vec<Instance> = self
                .read(|s| s.instances_of(active))
                .into_iter()
                .filter(|i| !exited.contains(&i.id))
                .collect();
            self.publish(&[(active, 100, current)]);
            self.drain_and_retire(&gone, &rev.spec).await;
        }
        for inst in &unhealthy {
            self.liveness_failures.remove(&inst.id);
            self.event(
                Some(active),
                format!("instance {} failed; replacing it", inst.id),
            );
            let deadline = Instant::now() + rev.spec.progress_deadline.0;
            if let Err(e) = self.start_ready(1, &inst_spec, &rev.spec, deadline).await {
                self.event(Some(active), format!("replacement failed: {e}"));
            }
            let current: Vec<Instance> = self
                .read(|s| s.instances_of(active))
                .into_iter()
                .filter(|i| i.id != inst.id && !exited.contains(&i.id))
                .collect();
            self.publish(&[(active, 100, current)]);
            self.drain_and_retire(std::slice::from_ref(inst), &rev.spec)
                .await;
        }
        if missing > 0 {
            self.event(
                Some(active),
                format!("{missing} instance(s) of revision {active} missing; starting them"),
            );
            let deadline = Instant::now() + rev.spec.progress_deadline.0;
            let n = u32::try_from(missing).unwrap_or(1);
            match self.start_ready(n, &inst_spec, &rev.spec, deadline).await {
                Ok(_) => {
                    let current = self.read(|s| s.instances_of(active));
                    self.publish(&[(active, 100, current)]);
                }
                Err(e) => self.event(Some(active), format!("could not start them: {e}")),
            }
        }
        self.set_phase(Phase::Idle);
        true
    }

    /// Probes the instances the ingress took out of routing after they failed
    /// requests, and puts back each whose readiness probe passes. Returns how
    /// long to wait before the next pass, or `None` when none is left out.
    pub(crate) async fn readmit_once(&mut self) -> Option<Duration> {
        let ejected = self.deps.traffic.ejected();
        if ejected.is_empty() {
            return None;
        }
        let (insts, specs) = self.read(|s| {
            let insts: Vec<Instance> = s
                .instances
                .iter()
                .filter(|i| ejected.contains(&i.addr))
                .cloned()
                .collect();
            let specs: Vec<_> = insts
                .iter()
                .map(|i| {
                    s.revision(i.revision)
                        .map(|r| r.spec.health.readiness.clone())
                })
                .collect();
            (insts, specs)
        });
        let default = super::default_readiness();
        let mut next: Option<Duration> = None;
        let mut left = false;
        for (inst, readiness) in insts.iter().zip(specs) {
            let probe = readiness.flatten().unwrap_or_else(|| default.clone());
            let ok = tokio::time::timeout(probe.timeout.0, self.deps.prober.check(inst, &probe))
                .await
                .unwrap_or(false);
            if ok {
                self.deps.traffic.readmit(inst.addr);
                self.event(
                    Some(inst.revision),
                    format!(
                        "instance {} passed its readiness probe after failing requests; back in routing",
                        inst.id
                    ),
                );
            } else {
                left = true;
                // At least 100 ms apart, whatever the probe's interval.
                let wait = probe.interval.0.max(Duration::from_millis(100));
                next = Some(next.map_or(wait, |n| n.min(wait)));
            }
        }
        // Addresses the record does not know (already retired) stay as they are:
        // nothing routes to them once the next table is published.
        if left { next } else { None }
    }

    /// One autoscaling decision: from the active revision's requests/s since the last
    /// call, the instance count that puts each near `target_rps`, within min..max,
    /// at most once per cooldown. Returns the new count when it scaled.
    pub(crate) async fn autoscale_once(&mut self) -> Option<u32> {
        let (active, spec, current) = self.read(|s| {
            let rev = s.active_revision();
            (
                s.active,
                rev.map(|r| r.spec.clone()),
                s.active.map_or(0, |a| s.instances_of(a).len()),
            )
        });
        let (active, spec) = (active?, spec?);
        let auto = spec.autoscale.clone()?;
        let now = Instant::now();
        let requests = self.deps.traffic.stats(active).requests;
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
    /// back, instances the record does not route (ones being started or stopped
    /// when the daemon died, or of another revision) are stopped, the active
    /// revision's live instances serve again, and missing ones are started.
    pub(crate) async fn recover(&mut self) {
        self.set_phase(Phase::Recovering);
        // The ingress listens again before anything is routed.
        if let Some(ingress) = self.read(|r| r.spec().map(|s| s.ingress.clone()))
            && let Err(e) = self.deps.traffic.configure(&ingress).await
        {
            self.event(None, format!("ingress.listen: {e}"));
        }
        let (name, active, insts, interrupted) = self.read(|s| {
            let interrupted: Vec<u64> = s
                .revisions
                .iter()
                .filter(|r| r.status == RevisionStatus::Progressing)
                .map(|r| r.number)
                .collect();
            (s.name.clone(), s.active, s.instances.clone(), interrupted)
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
            let state = self.deps.instances.state(&i).await;
            if Some(i.revision) == active && state != InstanceState::Exited {
                live.push(i);
            } else {
                stray.push(i);
            }
        }
        // What exists but the record does not route: started, or being stopped,
        // when the daemon died.
        match self.deps.instances.list(&name).await {
            Ok(all) => {
                for i in all {
                    if !live.iter().any(|l| l.id == i.id) && !stray.iter().any(|s| s.id == i.id) {
                        stray.push(i);
                    }
                }
            }
            Err(e) => self.event(None, format!("cannot list instances: {e}")),
        }
        if let Some(a) = active {
            self.publish(&[(a, 100, live.clone())]);
        }
        self.update(|s| {
            s.instances.retain(|i| live.iter().any(|l| l.id == i.id));
            s.stopping.clear();
        });
        self.retire(&stray, Duration::from_secs(2));
        self.prune_stats();
        if let Some(a) = active {
            self.event(
                Some(a),
                format!("recovered revision {a} with {} live instances", live.len()),
            );
            self.heal_once().await;
        }
        self.set_phase(if active.is_some() {
            Phase::Idle
        } else {
            Phase::New
        });
    }

    /// Stops every instance and waits until they are gone (the service is being
    /// removed).
    pub(crate) async fn remove(&mut self) {
        self.set_phase(Phase::Removing);
        self.publish(&[]);
        self.deps.traffic.close();
        let (insts, spec) = self.read(|s| (s.instances.clone(), s.spec().cloned()));
        let grace = spec.map_or(Duration::from_secs(10), |s| s.stop_timeout.0);
        self.retire(&insts, grace);
        self.stopped().await;
        self.event(None, "every instance is gone");
    }
}
