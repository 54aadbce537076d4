//! One actor per service: the only owner of its record. Every change arrives as a
//! command on its queue; image triggers wait in one latest-wins slot; heal and poll
//! run on its own timers. Commands answer as soon as they are accepted, and their
//! work finishes whatever happens to the caller.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use slipway_core::service::ServiceSpec;
use slipway_core::{ErrorKind, now_ms};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub use crate::engine::ServiceDeps;
use crate::engine::{Begun, Control, Engine};
use crate::record::{Outcome, ServiceRecord};
use crate::trigger::{self, Offer, TriggerSlot};
use crate::{Event, StateError};

/// A change asked of a service.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Roll out this spec (its image is pinned when the actor takes it).
    Deploy(Box<ServiceSpec>),
    /// Go back to revision `to` (default: the one before the active revision).
    Rollback(Option<u64>),
    /// Change the number of instances of the active revision.
    Scale(u32),
    /// Move these instances (by id) elsewhere: replacements start and become
    /// ready, then these leave routing, drain and stop (a node being drained).
    Replace(Vec<String>),
    /// Hold rollouts at their next step until resumed.
    Pause,
    /// Let held rollouts go on.
    Resume,
    /// Skip a rollout's remaining steps and holds.
    Promote,
    /// Roll the rollout in progress back now.
    Abort,
    /// Abort what runs, stop every instance, forget the service.
    Remove,
}

impl Command {
    fn verb(&self) -> &'static str {
        match self {
            Self::Deploy(_) => "deploy",
            Self::Rollback(_) => "rollback",
            Self::Scale(_) => "scale",
            Self::Replace(_) => "replace",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Abort => "abort",
            Self::Remove => "remove",
        }
    }
}

/// What the actor answers when it accepts a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The command's id: its events carry it, and the last one its outcome.
    pub command: String,
    /// The revision it started, when it started one at once.
    pub revision: Option<u64>,
    /// Whether it waits behind the operation in progress.
    pub queued: bool,
    /// A deploy of the spec and image already live: nothing to do.
    pub unchanged: bool,
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A field of the request is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, dotted.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Not now: the service is not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// No capacity left.
    #[error("{0}")]
    Exhausted(String),
    /// Something it needs cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The service was removed.
    #[error("the service was removed")]
    Gone,
}

impl CommandError {
    /// How the error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid { .. } => ErrorKind::InvalidArgument,
            Self::NotFound(_) | Self::Gone => ErrorKind::NotFound,
            Self::Conflict(_) => ErrorKind::FailedPrecondition,
            Self::Exhausted(_) => ErrorKind::ResourceExhausted,
            Self::Unavailable(_) => ErrorKind::Unavailable,
        }
    }

    /// The request field it is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl From<StateError> for CommandError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Conflict { .. } | StateError::Fenced(_) => Self::Conflict(e.to_string()),
            StateError::Unavailable(_) => Self::Unavailable(e.to_string()),
        }
    }
}

struct Envelope {
    id: String,
    command: Command,
    /// `None` once the caller was told the command is queued.
    reply: Option<oneshot::Sender<Result<Accepted, CommandError>>>,
}

impl Envelope {
    fn answer(&mut self, r: Result<Accepted, CommandError>) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

/// A handle on a service's actor; cheap to clone.
#[derive(Clone)]
pub struct Service {
    name: String,
    tx: mpsc::UnboundedSender<Envelope>,
    record: watch::Receiver<ServiceRecord>,
    triggers: Arc<TriggerSlot>,
    done: watch::Receiver<bool>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn command_id(service: &str, verb: &str) -> String {
    format!(
        "{service}-{verb}-{:x}{:02x}",
        now_ms(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed) % 256
    )
}

impl Service {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a command; answers once the actor accepted (or queued) it.
    pub async fn send(&self, command: Command) -> Result<Accepted, CommandError> {
        let (reply, rx) = oneshot::channel();
        let id = command_id(&self.name, command.verb());
        self.tx
            .send(Envelope {
                id,
                command,
                reply: Some(reply),
            })
            .map_err(|_| CommandError::Gone)?;
        rx.await.unwrap_or(Err(CommandError::Gone))
    }

    /// The record as last made durable.
    pub fn record(&self) -> ServiceRecord {
        self.record.borrow().clone()
    }

    /// Offers a pushed tag of `repo`: it waits in the trigger slot when the
    /// service's trigger wants it. Returns whether it was offered.
    pub fn offer_push(&self, repo: &str, tag: &str) -> bool {
        self.offer_push_if(repo, tag, || Ok(())) == Ok(true)
    }

    /// As [`offer_push`](Self::offer_push), but a matching push is offered only
    /// if `admit` agrees (the pusher may deploy this service): `Ok(false)` for
    /// no match, `Err(reason)` for a match that `admit` refused.
    pub fn offer_push_if(
        &self,
        repo: &str,
        tag: &str,
        admit: impl FnOnce() -> Result<(), String>,
    ) -> Result<bool, String> {
        if !self.push_matches(repo, tag) {
            return Ok(false);
        }
        admit()?;
        let record = self.record();
        let Some(t) = record.spec().and_then(|s| s.trigger.clone()) else {
            return Ok(false);
        };
        self.triggers.offer(
            &t,
            Offer {
                tag: tag.to_owned(),
                image: format!("{repo}:{tag}"),
            },
        );
        Ok(true)
    }

    fn push_matches(&self, repo: &str, tag: &str) -> bool {
        let record = self.record();
        let Some(spec) = record.spec() else {
            return false;
        };
        let Some(t) = &spec.trigger else {
            return false;
        };
        if trigger::repo_of(&spec.image) != repo {
            return false;
        }
        let current = record
            .active_revision()
            .and_then(|r| trigger::tag_of(&r.spec.image).map(str::to_owned));
        trigger::matches(t, tag, current.as_deref())
    }

    /// Resolves once the actor has ended (the service was removed).
    pub async fn gone(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Whether the actor has ended.
    pub fn is_gone(&self) -> bool {
        *self.done.borrow()
    }
}

/// Starts the actor of a service from its record (persisted at `version`, or new).
/// With `recover`, it first converges after a daemon restart.
pub fn spawn(
    record: ServiceRecord,
    version: Option<u64>,
    deps: ServiceDeps,
    recover: bool,
) -> Service {
    let name = record.name.clone();
    let control = Arc::new(Control::default());
    let engine = Engine::new(record, version, deps.clone(), control.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(false);
    let triggers = Arc::new(TriggerSlot::default());
    let service = Service {
        name: name.clone(),
        tx,
        record: engine.durable(),
        triggers: triggers.clone(),
        done,
    };
    let actor = Actor {
        inbox: Inbox {
            rx,
            pending: VecDeque::new(),
            control,
            record: engine.record_handle(),
            events: deps.events,
            name,
            rollout: false,
        },
        engine,
        triggers,
    };
    tokio::spawn(async move {
        actor.run(recover).await;
        done_tx.send_replace(true);
    });
    service
}

/// The actor's mailbox while an operation holds the engine.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Envelope>,
    pending: VecDeque<Envelope>,
    control: Arc<Control>,
    record: Arc<watch::Sender<(u64, ServiceRecord)>>,
    events: tokio::sync::broadcast::Sender<Event>,
    name: String,
    /// Whether the operation in progress is a rollout (promote and abort apply).
    rollout: bool,
}

impl Inbox {
    fn note(&self, command: &str, message: String) {
        self.record.send_modify(|(generation, r)| {
            r.message.clone_from(&message);
            *generation += 1;
        });
        let _ = self.events.send(Event {
            at_ms: now_ms(),
            service: self.name.clone(),
            revision: None,
            command: Some(command.to_owned()),
            message,
            outcome: Some(Outcome::Done),
        });
    }

    fn set_paused(&self, on: bool) {
        self.control.set_paused(on);
        self.record.send_modify(|(generation, r)| {
            r.paused = on;
            *generation += 1;
        });
    }

    /// A command that arrives while an operation runs: controls act on it at once,
    /// the rest wait their turn.
    fn during(&mut self, mut env: Envelope) {
        let accepted = |queued| Accepted {
            command: env.id.clone(),
            revision: None,
            queued,
            unchanged: false,
        };
        match env.command {
            Command::Pause | Command::Resume => {
                let on = env.command == Command::Pause;
                self.set_paused(on);
                let a = accepted(false);
                env.answer(Ok(a));
                self.note(
                    &env.id,
                    format!("{} {}", self.name, if on { "paused" } else { "resumed" }),
                );
            }
            Command::Promote | Command::Abort if self.rollout => {
                if env.command == Command::Promote {
                    self.control.promote();
                } else {
                    self.control.abort();
                }
                let a = accepted(false);
                env.answer(Ok(a));
                self.note(&env.id, format!("{}: {}", self.name, env.command.verb()));
            }
            Command::Promote | Command::Abort => {
                env.answer(Err(CommandError::Conflict(format!(
                    "{}: no rollout is in progress",
                    self.name
                ))));
            }
            Command::Remove => {
                // Abort first: removal never waits out a rollout.
                self.control.removing();
                let a = accepted(true);
                env.answer(Ok(a));
                self.pending.push_front(env);
            }
            Command::Deploy(_) | Command::Rollback(_) | Command::Scale(_) | Command::Replace(_) => {
                let a = accepted(true);
                env.answer(Ok(a));
                self.pending.push_back(env);
            }
        }
    }
}

/// Runs `op` while taking commands.
async fn busy<T>(inbox: &mut Inbox, rollout: bool, op: impl Future<Output = T>) -> T {
    inbox.rollout = rollout;
    let mut op = std::pin::pin!(op);
    let out = loop {
        tokio::select! {
            out = &mut op => break out,
            Some(env) = inbox.rx.recv() => inbox.during(env),
        }
    };
    inbox.rollout = false;
    out
}

struct Actor {
    engine: Engine,
    inbox: Inbox,
    triggers: Arc<TriggerSlot>,
}

enum Work {
    Command(Envelope),
    Trigger,
    Heal,
    Readmit,
    Poll,
}

/// How often healing runs when the instances cannot report exits.
const HEAL_EVERY: Duration = Duration::from_secs(1);
/// How often healing runs when they can and nothing else asks for it sooner: a
/// resync, in case an event was missed.
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Resolves when `rx` changes; never when there is none or its sender is gone.
async fn changed(rx: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

impl Actor {
    /// When healing should next run: every second without exit events;
    /// otherwise at the liveness probe's interval, every second while
    /// autoscaling (its samples), and at the resync interval at most.
    fn heal_period(&self, events: bool) -> Duration {
        if !events {
            return HEAL_EVERY;
        }
        self.engine.read(|r| {
            let Some(spec) = r.active_revision().map(|a| &a.spec) else {
                return RESYNC_EVERY;
            };
            let mut every = RESYNC_EVERY;
            if let Some(p) = &spec.health.liveness {
                every = every.min(p.interval.0.max(Duration::from_millis(100)));
            }
            if spec.autoscale.is_some() {
                every = every.min(HEAL_EVERY);
            }
            every
        })
    }

    async fn run(mut self, recover: bool) {
        if recover {
            busy(&mut self.inbox, false, self.engine.recover()).await;
        }
        // Exits and ejections wake the actor; with neither, nothing wakes it more
        // than once per resync (or per liveness interval, when it has one).
        let mut exits = self.engine.deps().instances.exits();
        let events = exits.is_some();
        let mut ejections = None;
        let mut next_heal = Instant::now() + self.heal_period(events);
        let mut next_readmit: Option<Instant> = None;
        let mut last_poll = Instant::now();
        loop {
            if ejections.is_none() {
                ejections = self.engine.deps().traffic.ejections();
            }
            let poll_every = self.poll_interval();
            let work = if let Some(env) = self.inbox.pending.pop_front() {
                Work::Command(env)
            } else {
                let next_poll = last_poll + poll_every.unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    biased;
                    env = self.inbox.rx.recv() => match env {
                        Some(env) => Work::Command(env),
                        // Every handle is gone: the daemon is shutting down.
                        None => return,
                    },
                    () = self.triggers.offered() => Work::Trigger,
                    () = tokio::time::sleep_until(next_poll), if poll_every.is_some() => Work::Poll,
                    () = changed(&mut exits) => Work::Heal,
                    () = changed(&mut ejections) => Work::Readmit,
                    () = tokio::time::sleep_until(next_readmit.unwrap_or(next_heal)), if next_readmit.is_some() => Work::Readmit,
                    () = tokio::time::sleep_until(next_heal) => Work::Heal,
                }
            };
            match work {
                Work::Command(env) => {
                    if self.command(env).await {
                        return;
                    }
                    // The new spec may ask for healing sooner (a liveness probe).
                    next_heal = next_heal.min(Instant::now() + self.heal_period(events));
                }
                Work::Trigger => self.trigger().await,
                Work::Poll => {
                    last_poll = Instant::now();
                    self.poll().await;
                }
                Work::Readmit => {
                    if self.engine.fenced() {
                        next_readmit = None;
                        continue;
                    }
                    next_readmit = busy(&mut self.inbox, false, self.engine.readmit_once())
                        .await
                        .map(|wait| Instant::now() + wait);
                }
                Work::Heal => {
                    next_heal = Instant::now() + self.heal_period(events);
                    if self.engine.fenced() {
                        continue;
                    }
                    busy(&mut self.inbox, false, self.engine.heal_once()).await;
                    busy(&mut self.inbox, false, self.engine.autoscale_once()).await;
                }
            }
        }
    }

    /// Runs one command; returns true when the service is gone.
    async fn command(&mut self, mut env: Envelope) -> bool {
        self.engine.set_command(Some(env.id.clone()));
        let gone = match env.command.clone() {
            Command::Deploy(spec) => {
                self.deploy(&mut env, *spec).await;
                false
            }
            Command::Rollback(to) => {
                match self.engine.rollback_target(to) {
                    Ok(target) => {
                        self.start(&mut env, target.spec, target.image).await;
                    }
                    Err(e) => self.refuse(&mut env, CommandError::Conflict(e)).await,
                }
                false
            }
            Command::Scale(n) => {
                if self.engine.read(|r| r.active.is_none()) {
                    let e = CommandError::Conflict("the service has no active revision".into());
                    self.refuse(&mut env, e).await;
                } else {
                    env.answer(Ok(self.accepted(&env, None)));
                    let result = busy(&mut self.inbox, false, self.engine.scale(n)).await;
                    let outcome = result.map_or_else(Outcome::Failed, |()| Outcome::Done);
                    self.engine.finish(None, outcome).await;
                }
                false
            }
            Command::Replace(ids) => {
                env.answer(Ok(self.accepted(&env, None)));
                let result = busy(&mut self.inbox, false, self.engine.replace(&ids)).await;
                let outcome = result.map_or_else(Outcome::Failed, |()| Outcome::Done);
                self.engine.finish(None, outcome).await;
                false
            }
            Command::Pause | Command::Resume => {
                let on = env.command == Command::Pause;
                self.inbox.set_paused(on);
                env.answer(Ok(self.accepted(&env, None)));
                let name = self.engine.name();
                self.inbox.note(
                    &env.id,
                    format!("{name} {}", if on { "paused" } else { "resumed" }),
                );
                false
            }
            Command::Promote | Command::Abort => {
                let name = self.engine.name();
                env.answer(Err(CommandError::Conflict(format!(
                    "{name}: no rollout is in progress"
                ))));
                false
            }
            Command::Remove => {
                env.answer(Ok(self.accepted(&env, None)));
                self.inbox.control.removing();
                busy(&mut self.inbox, false, self.engine.remove()).await;
                self.engine.flush().await;
                if let Err(e) = self.engine.delete_record().await {
                    tracing::error!(service = %self.engine.name(), "cannot delete the record: {e}");
                }
                self.engine.finish_removed();
                // Whatever waited behind the removal is refused.
                for mut env in self.inbox.pending.drain(..) {
                    env.answer(Err(CommandError::Gone));
                }
                true
            }
        };
        self.engine.set_command(None);
        if !gone && self.engine.read(|r| r.revisions.is_empty()) {
            // A new service whose first deploy was refused: nothing was written,
            // and there is nothing to keep.
            return true;
        }
        gone
    }

    fn accepted(&self, env: &Envelope, revision: Option<u64>) -> Accepted {
        Accepted {
            command: env.id.clone(),
            revision,
            queued: false,
            unchanged: false,
        }
    }

    /// Refuses a command: to its caller, or (when it was queued) in its events.
    async fn refuse(&mut self, env: &mut Envelope, e: CommandError) {
        if env.reply.is_some() {
            env.answer(Err(e));
        } else {
            self.engine
                .finish(None, Outcome::Failed(e.to_string()))
                .await;
        }
    }

    async fn deploy(&mut self, env: &mut Envelope, spec: ServiceSpec) {
        match self.engine.deps().images.pin(&spec.image).await {
            Ok(image) => self.start(env, spec, image).await,
            Err(e) => self.refuse(env, e.into()).await,
        }
    }

    /// Admits and rolls out a revision of `spec` running the pinned `image`.
    async fn start(&mut self, env: &mut Envelope, spec: ServiceSpec, image: String) {
        match self.engine.begin(spec, image).await {
            Err(e) => self.refuse(env, e).await,
            Ok(Begun::Unchanged(n)) => {
                let mut a = self.accepted(env, Some(n));
                a.unchanged = true;
                env.answer(Ok(a));
                self.engine.finish(Some(n), Outcome::Done).await;
            }
            Ok(Begun::Rejected(n, reason)) => {
                self.engine.flush().await;
                env.answer(Ok(self.accepted(env, Some(n))));
                self.engine.finish(Some(n), Outcome::Rejected(reason)).await;
            }
            Ok(Begun::Started(n)) => {
                self.engine.flush().await;
                env.answer(Ok(self.accepted(env, Some(n))));
                let outcome = busy(&mut self.inbox, true, self.engine.roll_out(n)).await;
                self.engine.finish(Some(n), outcome).await;
            }
        }
    }

    /// Takes what waits in the trigger slot, checks it again against what runs
    /// now, and rolls it out.
    async fn trigger(&mut self) {
        let Some(offer) = self.triggers.take() else {
            return;
        };
        let (spec, current, active_image) = self.engine.read(|r| {
            (
                r.spec().cloned(),
                r.active_revision()
                    .and_then(|x| trigger::tag_of(&x.spec.image).map(str::to_owned)),
                r.active_revision().map(|x| x.image.clone()),
            )
        });
        let Some(spec) = spec else { return };
        let Some(t) = spec.trigger.clone() else {
            return;
        };
        if !trigger::matches(&t, &offer.tag, current.as_deref()) {
            tracing::info!(service = %spec.name, tag = %offer.tag, "trigger no longer applies; skipped");
            return;
        }
        let image = match self.engine.deps().images.pin(&offer.image).await {
            Ok(image) => image,
            Err(e) => {
                tracing::warn!(service = %spec.name, "trigger: cannot pin {}: {e}", offer.image);
                return;
            }
        };
        if active_image.as_deref() == Some(image.as_str()) {
            return;
        }
        let mut next = spec.clone();
        next.image = offer.image.clone();
        let id = command_id(&spec.name, "trigger");
        self.engine.set_command(Some(id.clone()));
        self.engine.event(
            None,
            format!("{} matches the trigger; rolling out", offer.image),
        );
        let mut env = Envelope {
            id,
            command: Command::Deploy(Box::new(next.clone())),
            reply: None,
        };
        self.start(&mut env, next, image).await;
        self.engine.set_command(None);
    }

    /// How often to poll another registry for the service's image, if at all.
    fn poll_interval(&self) -> Option<Duration> {
        let spec = self.engine.read(|r| r.spec().cloned())?;
        let t = spec.trigger.as_ref()?;
        self.engine
            .deps()
            .images
            .is_remote(&spec.image)
            .then_some(t.poll_interval.0)
    }

    /// Looks for a new digest or tag in the image's registry; what it finds goes
    /// through the trigger slot like a push.
    async fn poll(&mut self) {
        let Some(spec) = self.engine.read(|r| r.spec().cloned()) else {
            return;
        };
        let Some(t) = spec.trigger.clone() else {
            return;
        };
        let base = spec.image.split('@').next().unwrap_or(&spec.image);
        let base = match trigger::tag_of(base) {
            Some(tag) => &base[..base.len() - tag.len() - 1],
            None => base,
        };
        let tag = match &t.tag {
            Some(tag) => Some(tag.clone()),
            None => {
                let current = self.engine.read(|r| {
                    r.active_revision()
                        .and_then(|x| trigger::tag_of(&x.spec.image).map(str::to_owned))
                });
                match self.engine.deps().images.tags(&spec.image).await {
                    Ok(tags) => {
                        trigger::best(&t, tags.iter().map(String::as_str), current.as_deref())
                    }
                    Err(e) => {
                        tracing::warn!(service = %spec.name, "poll: cannot list tags: {e}");
                        None
                    }
                }
            }
        };
        if let Some(tag) = tag {
            self.triggers.offer(
                &t,
                Offer {
                    image: format!("{base}:{tag}"),
                    tag,
                },
            );
        }
    }
}

impl Engine {
    /// The last event of a removal, sent after the record is gone.
    pub(crate) fn finish_removed(&self) {
        let name = self.name();
        tracing::info!(service = %name, "removed");
        let _ = self.deps().events.send(Event {
            at_ms: now_ms(),
            service: name.clone(),
            revision: None,
            command: self.command().map(str::to_owned),
            message: format!("service {name} removed"),
            outcome: Some(Outcome::Done),
        });
    }
}
