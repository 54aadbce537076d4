//! Starting a revision: admission, then the first deploy or a rollout with the
//! spec's strategy (rolling, blue-green, canary), and rolling back.

use std::time::Duration;

use slipway_core::now_ms;
use slipway_core::service::{ServiceSpec, Strategy};
use tokio::time::Instant;

use super::{Control, Engine};
use crate::actor::CommandError;
use crate::record::{Outcome, Phase, Revision, RevisionStatus};
use crate::{Candidate, Instance, InstanceError, InstanceSpec};

/// How asking for a revision went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Begun {
    /// Recorded as progressing; [`Engine::roll_out`] runs it.
    Started(u64),
    /// The same spec and image as the live revision: nothing to do.
    Unchanged(u64),
    /// A gate refused it; recorded as rejected.
    Rejected(u64, String),
}

/// A rollout in progress: the old set and the new.
struct Rollout {
    old_rev: u64,
    old_image: String,
    old_spec: ServiceSpec,
    old: Vec<Instance>,
    new: Vec<Instance>,
}

impl Engine {
    /// Admits a revision of `spec` running `image` (already pinned): the unchanged
    /// check, the gate, then the ingress. Only then is it recorded as progressing.
    pub(crate) async fn begin(
        &mut self,
        spec: ServiceSpec,
        image: String,
    ) -> Result<Begun, CommandError> {
        let (unchanged, number) = self.read(|r| {
            let newest = r.revisions.last();
            // The same spec and image as the live revision: nothing to roll out (as
            // `kubectl apply` of an unchanged manifest). After a rollback the newest
            // revision is not the live one, so deploying it again does retry.
            let unchanged = newest
                .filter(|x| r.active == Some(x.number) && x.spec == spec && x.image == image)
                .map(|x| x.number);
            (unchanged, r.next_number())
        });
        if let Some(n) = unchanged {
            return Ok(Begun::Unchanged(n));
        }
        let name = spec.name.clone();
        let admitted = self
            .deps
            .gate
            .admit(&Candidate {
                service: &name,
                revision: number,
                image: &image,
                spec: &spec,
            })
            .await;
        if let Err(reason) = admitted {
            self.update(|r| {
                r.revisions.push(Revision {
                    number,
                    image: image.clone(),
                    spec: spec.clone(),
                    status: RevisionStatus::Rejected,
                    message: Some(reason.clone()),
                    created_ms: now_ms(),
                    command: self.command.clone(),
                });
            });
            self.event(
                Some(number),
                format!("revision {number} rejected: {reason}"),
            );
            return Ok(Begun::Rejected(number, reason));
        }
        self.deps
            .traffic
            .configure(&spec.ingress)
            .await
            .map_err(|message| CommandError::Invalid {
                field: "ingress.listen".into(),
                message,
            })?;
        self.update(|r| {
            r.revisions.push(Revision {
                number,
                image: image.clone(),
                spec: spec.clone(),
                status: RevisionStatus::Progressing,
                message: None,
                created_ms: now_ms(),
                command: self.command.clone(),
            });
            if r.phase == Phase::New {
                r.phase = Phase::Idle;
            }
        });
        Ok(Begun::Started(number))
    }

    /// Rolls out a revision that [`Engine::begin`] started.
    pub(crate) async fn roll_out(&mut self, number: u64) -> Outcome {
        let Some(rev) = self.read(|r| r.revision(number).cloned()) else {
            return Outcome::Failed(format!("revision {number} does not exist"));
        };
        let (spec, image) = (rev.spec, rev.image);
        self.control.reset();
        self.set_phase(Phase::RollingOut);
        self.event(Some(number), format!("revision {number} started ({image})"));
        let deadline = Instant::now() + spec.progress_deadline.0;
        let inst = InstanceSpec::of(&spec, number, &image);
        let active = self.read(|r| r.active_revision().cloned());
        let outcome = match active {
            None => self.first_deploy(number, &inst, &spec, deadline).await,
            Some(old) => {
                let mut ctx = Rollout {
                    old_rev: old.number,
                    old_image: old.image.clone(),
                    old_spec: old.spec.clone(),
                    old: self.read(|r| r.instances_of(old.number)),
                    new: Vec::new(),
                };
                let result = self
                    .strategy(&mut ctx, number, &inst, &spec, deadline)
                    .await;
                match result {
                    Ok(()) => {
                        self.set_status(ctx.old_rev, RevisionStatus::Superseded, None);
                        self.set_status(number, RevisionStatus::Active, None);
                        self.update(|s| s.active = Some(number));
                        self.event(Some(number), format!("revision {number} is live"));
                        Outcome::Done
                    }
                    Err(reason) => {
                        self.event(Some(number), reason.clone());
                        self.roll_back(&mut ctx, number, &spec).await;
                        self.set_status(number, RevisionStatus::RolledBack, Some(reason.clone()));
                        if let Err(e) = self.deps.traffic.configure(&ctx.old_spec.ingress).await {
                            self.event(
                                Some(ctx.old_rev),
                                format!("cannot restore the ingress: {e}"),
                            );
                        }
                        self.event(
                            Some(ctx.old_rev),
                            format!("rolled back to revision {}", ctx.old_rev),
                        );
                        Outcome::RolledBack(reason)
                    }
                }
            }
        };
        self.prune_stats();
        self.set_phase(if self.read(|r| r.active.is_some()) {
            Phase::Idle
        } else {
            Phase::New
        });
        outcome
    }

    async fn strategy(
        &self,
        ctx: &mut Rollout,
        number: u64,
        inst: &InstanceSpec,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Result<(), String> {
        match &spec.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => {
                self.rolling(ctx, inst, spec, (*max_surge, *max_unavailable), deadline)
                    .await
            }
            Strategy::BlueGreen { scale_down_delay } => {
                self.blue_green(ctx, inst, spec, scale_down_delay.0, deadline)
                    .await
            }
            Strategy::Canary { steps } => {
                let steps: Vec<(u32, Duration)> =
                    steps.iter().map(|s| (s.weight, s.pause.0)).collect();
                self.canary(ctx, number, inst, spec, &steps, deadline).await
            }
        }
    }

    async fn first_deploy(
        &mut self,
        number: u64,
        inst: &InstanceSpec,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Outcome {
        let started = match self.checkpoint(number).await {
            Ok(()) => self.start_ready(spec.replicas, inst, spec, deadline).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(insts) => {
                self.publish(&[(number, 100, insts)]);
                self.set_status(number, RevisionStatus::Active, None);
                self.update(|s| s.active = Some(number));
                self.event(
                    Some(number),
                    format!("revision {number} is live with {} instances", spec.replicas),
                );
                Outcome::Done
            }
            Err(e) => {
                let stray = self.read(|r| r.instances_of(number));
                self.retire(&stray, Duration::from_secs(2));
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

    /// Takes one old instance out of routing, drains and retires it.
    async fn retire_one_old(&self, ctx: &mut Rollout, number: u64) {
        if let Some(victim) = ctx.old.pop() {
            self.publish_both(ctx, number, None);
            self.drain_and_retire(std::slice::from_ref(&victim), &ctx.old_spec)
                .await;
        }
    }

    async fn rolling(
        &self,
        ctx: &mut Rollout,
        inst: &InstanceSpec,
        spec: &ServiceSpec,
        (max_surge, max_unavailable): (u32, u32),
        deadline: Instant,
    ) -> Result<(), String> {
        let number = inst.revision;
        let replicas = spec.replicas as usize;
        let max_total = replicas + max_surge as usize;
        let min_available = replicas.saturating_sub(max_unavailable as usize);
        while ctx.new.len() < replicas {
            self.checkpoint(number).await?;
            if self.past(deadline) {
                return Err("progress deadline exceeded".into());
            }
            // Capacity counts only instances in routing: retired ones are gone from
            // `old` even while their processes are still stopping.
            let total = ctx.old.len() + ctx.new.len();
            let room = max_total
                .saturating_sub(total)
                .min(replicas - ctx.new.len());
            if room == 0 {
                if !ctx.old.is_empty() && total > min_available {
                    self.retire_one_old(ctx, number).await;
                    continue;
                }
                return Err("rollout cannot progress: raise max_surge or max_unavailable".into());
            }
            let batch = self
                .start_ready(u32::try_from(room).unwrap_or(1), inst, spec, deadline)
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
                self.retire_one_old(ctx, number).await;
            }
        }
        while !ctx.old.is_empty() {
            self.retire_one_old(ctx, number).await;
        }
        self.analyse(number, spec)
    }

    async fn blue_green(
        &self,
        ctx: &mut Rollout,
        inst: &InstanceSpec,
        spec: &ServiceSpec,
        delay: Duration,
        deadline: Instant,
    ) -> Result<(), String> {
        let number = inst.revision;
        self.checkpoint(number).await?;
        ctx.new = self
            .start_ready(spec.replicas, inst, spec, deadline)
            .await?;
        self.publish(&[(number, 100, ctx.new.clone())]);
        self.event(
            Some(number),
            format!("switched all traffic to revision {number}; old set kept for {delay:?}"),
        );
        self.observe(number, spec, &ctx.new.clone(), delay).await?;
        let old = std::mem::take(&mut ctx.old);
        self.drain_and_retire(&old, &ctx.old_spec).await;
        Ok(())
    }

    async fn canary(
        &self,
        ctx: &mut Rollout,
        number: u64,
        inst: &InstanceSpec,
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
            self.grow_new(ctx, want, inst, spec, deadline).await?;
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
        self.grow_new(ctx, replicas as usize, inst, spec, deadline)
            .await?;
        self.publish(&[(number, 100, ctx.new.clone())]);
        let old = std::mem::take(&mut ctx.old);
        self.drain_and_retire(&old, &ctx.old_spec).await;
        Ok(())
    }

    /// Starts (and waits for) new-revision instances until there are `want`.
    async fn grow_new(
        &self,
        ctx: &mut Rollout,
        want: usize,
        inst: &InstanceSpec,
        spec: &ServiceSpec,
        deadline: Instant,
    ) -> Result<(), String> {
        if ctx.new.len() < want {
            let n = u32::try_from(want - ctx.new.len()).unwrap_or(1);
            ctx.new
                .extend(self.start_ready(n, inst, spec, deadline).await?);
        }
        Ok(())
    }

    /// Restores the old revision to full strength and traffic, then retires the
    /// new revision's instances. A service being removed restores nothing.
    async fn roll_back(&self, ctx: &mut Rollout, number: u64, spec: &ServiceSpec) {
        let missing = (ctx.old_spec.replicas as usize).saturating_sub(ctx.old.len());
        if missing > 0 && !Control::is(&self.control.removing) {
            // Abort was what brought us here: restoring must not stop at it.
            self.control
                .abort
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let deadline = Instant::now() + ctx.old_spec.progress_deadline.0;
            let inst = InstanceSpec::of(&ctx.old_spec, ctx.old_rev, &ctx.old_image);
            match self
                .start_ready(
                    u32::try_from(missing).unwrap_or(1),
                    &inst,
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
        self.drain_and_retire(&new, spec).await;
        let stray = self.read(|r| r.instances_of(number));
        self.drain_and_retire(&stray, spec).await;
    }
}

impl From<InstanceError> for CommandError {
    fn from(e: InstanceError) -> Self {
        match e {
            InstanceError::Image(m) => CommandError::NotFound(format!("image: {m}")),
            InstanceError::Invalid(m) => CommandError::Invalid {
                field: "image".into(),
                message: m,
            },
            InstanceError::Capacity(m) => CommandError::Exhausted(m),
            InstanceError::Unreachable(m) | InstanceError::Failed(m) => {
                CommandError::Unavailable(m)
            }
        }
    }
}
