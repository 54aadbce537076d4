//! The service spec: what `slipway deploy FILE` reads (TOML), and its validation.
//!
//! Parsing errors carry toml's line and column; semantic errors name the dotted
//! field path (`strategy.steps[1].weight`) and say how to fix it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{format_duration, parse_duration};

/// A duration written as `"30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// One environment value of a service: text, or a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvValue {
    /// The value itself.
    Plain(String),
    /// `{ secret = "NAME" }`: the secret's value, set when the instance starts.
    Secret {
        /// The secret's name.
        secret: String,
    },
}

impl From<&str> for EnvValue {
    fn from(s: &str) -> Self {
        Self::Plain(s.to_owned())
    }
}

/// Whether `s` can name a secret (and a file under `/run/secrets/`).
pub fn valid_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl ServiceSpec {
    /// Every secret the spec uses, as a file or in the environment.
    pub fn secret_refs(&self) -> std::collections::BTreeSet<String> {
        let mut out: std::collections::BTreeSet<String> = self.secrets.iter().cloned().collect();
        for v in self.env.values() {
            if let EnvValue::Secret { secret } = v {
                out.insert(secret.clone());
            }
        }
        out
    }
}

/// A service: a named set of identical instances of one image behind an ingress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Service name: `[a-z0-9][a-z0-9-]{0,40}`.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Instances to keep healthy.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Environment for every instance: text, or `{ secret = "NAME" }`.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    /// Secrets mounted read-only at `/run/secrets/NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The version of each secret this revision uses; set by the server at
    /// deploy, so that a changed value makes a new revision.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_versions: BTreeMap<String, u64>,
    /// Memory limit per instance, e.g. `64m`.
    #[serde(default)]
    pub memory: Option<String>,
    /// CPU limit per instance.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Named volumes `NAME:/path`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Where the proxy listens.
    pub ingress: Ingress,
    /// Health checks.
    #[serde(default)]
    pub health: Health,
    /// How new revisions replace old ones.
    #[serde(default)]
    pub strategy: Strategy,
    /// How long a removed instance may finish its requests.
    #[serde(default = "thirty_seconds")]
    pub drain_timeout: Dur,
    /// A rollout that has not finished by then is rolled back.
    #[serde(default = "five_minutes")]
    pub progress_deadline: Dur,
    /// Limits the new revision's live traffic must meet.
    #[serde(default)]
    pub analysis: Analysis,
    /// Which pushed tags roll out by themselves.
    #[serde(default)]
    pub trigger: Option<Trigger>,
    /// Scale on requests per second per instance.
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
    /// The signal that asks an instance to stop (`SIGQUIT`, `QUIT`, `3`); default:
    /// the image's `StopSignal`, else SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL.
    #[serde(default = "ten_seconds")]
    pub stop_timeout: Dur,
    /// Capabilities added to the default set (Docker's), e.g. `["NET_ADMIN"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities dropped from it, e.g. `["NET_RAW"]` or `["ALL"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Run instances in a user namespace (root inside is an unprivileged host
    /// uid; each instance gets a private, shifted copy of the image).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub userns: bool,
    /// Where instances go when there are several nodes.
    #[serde(
        default,
        skip_serializing_if = "crate::placement::Placement::is_default"
    )]
    pub placement: crate::placement::Placement,
}

/// `[autoscale]`: keep requests/s per instance near a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// Fewest instances.
    pub min: u32,
    /// Most instances.
    pub max: u32,
    /// Requests per second one instance should carry.
    pub target_rps: f64,
    /// Time between two scaling decisions.
    #[serde(default = "thirty_seconds")]
    pub cooldown: Dur,
}

/// `[ingress]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    /// Listen address of the service's proxy, e.g. `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Requests wait this long for a healthy backend before failing with 503.
    #[serde(default = "ten_seconds")]
    pub hold_timeout: Dur,
    /// Balancing within a revision.
    #[serde(default)]
    pub balance: BalanceKind,
    /// Methods the proxy may send again to another instance when the one it sent
    /// the request to failed before answering (reset, closed). Only idempotent
    /// methods may be listed; default GET, HEAD and OPTIONS. Add PUT and DELETE
    /// only when the service makes them idempotent.
    #[serde(default = "default_retry_methods")]
    pub retry_methods: Vec<String>,
}

/// The methods retried by default: the safe ones (RFC 9110 §9.2.1).
pub fn default_retry_methods() -> Vec<String> {
    ["GET", "HEAD", "OPTIONS"].map(String::from).to_vec()
}

/// Methods that may be listed in `ingress.retry_methods`: the idempotent ones
/// (RFC 9110 §9.2.2) a proxy can replay.
pub const RETRYABLE_METHODS: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];

/// How the proxy picks among a revision's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceKind {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The instance with the fewest requests in flight.
    LeastRequests,
}

/// `[health]`: readiness gates traffic, liveness restarts, startup delays both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Gates traffic. Default: TCP connect to the instance's port.
    #[serde(default)]
    pub readiness: Option<Probe>,
    /// A failing instance is replaced.
    #[serde(default)]
    pub liveness: Option<Probe>,
    /// Must pass once before readiness and liveness apply.
    #[serde(default)]
    pub startup: Option<Probe>,
}

/// One health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// HTTP GET of this path must answer 2xx or 3xx.
    #[serde(default)]
    pub http: Option<String>,
    /// A TCP connect must succeed.
    #[serde(default)]
    pub tcp: bool,
    /// This command must exit 0 inside the instance.
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default = "one_second")]
    pub interval: Dur,
    /// Time one check may take.
    #[serde(default = "one_second")]
    pub timeout: Dur,
    /// Consecutive successes to pass.
    #[serde(default = "one")]
    pub success_threshold: u32,
    /// Consecutive failures to fail.
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

/// `[strategy]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    /// Replace instances a few at a time.
    Rolling {
        /// Extra instances allowed during the update.
        #[serde(default = "one")]
        max_surge: u32,
        /// Instances allowed to be missing during the update.
        #[serde(default)]
        max_unavailable: u32,
    },
    /// Start the whole new set, switch at once, keep the old set for a while.
    BlueGreen {
        /// How long the old set stays up (for instant rollback).
        #[serde(default = "thirty_seconds")]
        scale_down_delay: Dur,
    },
    /// Shift traffic step by step, analysing the new revision at each step.
    Canary {
        /// Increasing weights (percent of traffic), each followed by a pause.
        steps: Vec<CanaryStep>,
    },
}

impl Default for Strategy {
    fn default() -> Self {
        Self::Rolling {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

/// One canary step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryStep {
    /// Percent of traffic for the new revision.
    pub weight: u32,
    /// How long to hold (and analyse) before the next step.
    #[serde(default = "thirty_seconds")]
    pub pause: Dur,
}

/// `[analysis]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// Highest acceptable fraction of 5xx and failed requests, e.g. 0.01.
    #[serde(default = "one_percent")]
    pub max_error_rate: f64,
    /// Highest acceptable p99 latency.
    #[serde(default)]
    pub max_p99: Option<Dur>,
    /// Requests needed before a verdict.
    #[serde(default = "twenty")]
    pub min_requests: u64,
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            max_error_rate: 0.01,
            max_p99: None,
            min_requests: 20,
        }
    }
}

/// `[trigger]`: pushes of matching tags to the service's repository roll out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Follow this exact tag as its digest moves.
    #[serde(default)]
    pub tag: Option<String>,
    /// The highest tag matching this semver range (`^1`, `~1.2`, `>=2 <3`).
    #[serde(default)]
    pub semver: Option<String>,
    /// Tags matching this regular expression.
    #[serde(default)]
    pub regex: Option<String>,
    /// For an image in another registry: how often to look for a new digest or tag.
    #[serde(default = "thirty_seconds")]
    pub poll_interval: Dur,
}

/// Signal names by number (1-31); real-time signals are `RTMIN+n` or numbers.
const SIGNALS: [&str; 31] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

/// Parses a signal as images and users write it (`SIGTERM`, `term`, `15`,
/// `SIGRTMIN+3`) into its Linux number.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let err = || {
        format!("{s:?} is not a signal: use a name such as SIGTERM or SIGQUIT, or a number 1-64")
    };
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(err())
        };
    }
    let upper = t.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(pos) = SIGNALS.iter().position(|n| *n == name) {
        return i32::try_from(pos + 1).map_err(|_| err());
    }
    match name {
        "IOT" => return Ok(6),
        "POLL" => return Ok(29),
        "RTMIN" => return Ok(34),
        "RTMAX" => return Ok(64),
        _ => {}
    }
    let rt = |prefix: &str, base: i32, sign: i32| {
        name.strip_prefix(prefix)
            .and_then(|n| n.parse::<i32>().ok())
            .map(|n| base + sign * n)
            .filter(|n| (34..=64).contains(n))
    };
    rt("RTMIN+", 34, 1)
        .or_else(|| rt("RTMAX-", 64, -1))
        .ok_or_else(err)
}

fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn twenty() -> u64 {
    20
}
fn one_percent() -> f64 {
    0.01
}
fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}
fn ten_seconds() -> Dur {
    Dur(Duration::from_secs(10))
}
fn thirty_seconds() -> Dur {
    Dur(Duration::from_secs(30))
}
fn five_minutes() -> Dur {
    Dur(Duration::from_secs(300))
}

/// A spec problem: which field, and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// TOML syntax or schema (with line and column).
    #[error("{0}")]
    Parse(String),
    /// A value that parses but is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted field path.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl ServiceSpec {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text)
            .map_err(|e| SpecError::Parse(e.to_string().trim_end().to_owned()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; the first problem is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        let n = self.name.as_bytes();
        if n.is_empty()
            || n.len() > 40
            || !n[0].is_ascii_lowercase()
            || !n
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Err(invalid(
                "name",
                format!(
                    "{:?} must be 1-40 characters of [a-z0-9-], starting with a letter",
                    self.name
                ),
            ));
        }
        if self.image.trim().is_empty() {
            return Err(invalid("image", "must name an image, e.g. hello:1.0.0"));
        }
        for m in &self.ingress.retry_methods {
            if !RETRYABLE_METHODS.contains(&m.as_str()) {
                return Err(invalid(
                    "ingress.retry_methods",
                    format!(
                        "{m:?} cannot be retried: list only idempotent methods ({}), in capitals; a replayed {m} could take effect twice",
                        RETRYABLE_METHODS.join(", ")
                    ),
                ));
            }
        }
        if self.replicas == 0 || self.replicas > 100 {
            return Err(invalid(
                "replicas",
                format!("{} must be between 1 and 100", self.replicas),
            ));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k == "PORT" {
                return Err(invalid(
                    format!("env.{k}"),
                    "names must be non-empty, without '=', and not PORT (Slipway sets it)",
                ));
            }
            if let EnvValue::Secret { secret } = v
                && !valid_secret_name(secret)
            {
                return Err(invalid(
                    format!("env.{k}.secret"),
                    format!(
                        "{secret:?} is not a secret name: use letters, digits, '.', '_' or '-'"
                    ),
                ));
            }
        }
        for s in &self.secrets {
            if !valid_secret_name(s) {
                return Err(invalid(
                    "secrets",
                    format!("{s:?} is not a secret name: use letters, digits, '.', '_' or '-'"),
                ));
            }
        }
        if let Some(sig) = &self.stop_signal
            && let Err(e) = parse_signal(sig)
        {
            return Err(invalid("stop_signal", e));
        }
        if self.stop_timeout.0 > Duration::from_secs(3600) {
            return Err(invalid("stop_timeout", "must be at most 1h"));
        }
        if let Some(Err(e)) = self
            .memory
            .as_deref()
            .map(crate::placement::parse_memory_limit)
        {
            return Err(invalid("memory", e));
        }
        if let Err(e) = self.placement.parsed_constraints() {
            return Err(invalid("placement.constraints", e));
        }
        if self.placement.max_per_node == Some(0) {
            return Err(invalid(
                "placement.max_per_node",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && (0.01..=1024.0).contains(&c))
        {
            return Err(invalid(
                "cpus",
                format!("{c} must be between 0.01 and 1024"),
            ));
        }
        for (name, p) in [
            ("health.readiness", &self.health.readiness),
            ("health.liveness", &self.health.liveness),
            ("health.startup", &self.health.startup),
        ] {
            if let Some(p) = p {
                let kinds = usize::from(p.http.is_some())
                    + usize::from(p.tcp)
                    + usize::from(p.exec.is_some());
                if kinds != 1 {
                    return Err(invalid(
                        name,
                        "set exactly one of http = \"/path\", tcp = true, exec = [\"cmd\", …]",
                    ));
                }
                if p.http.as_ref().is_some_and(|h| !h.starts_with('/')) {
                    return Err(invalid(
                        format!("{name}.http"),
                        "must be a path starting with '/'",
                    ));
                }
                if p.exec.as_ref().is_some_and(Vec::is_empty) {
                    return Err(invalid(format!("{name}.exec"), "must not be empty"));
                }
                if p.interval.0.is_zero() || p.timeout.0.is_zero() {
                    return Err(invalid(
                        format!("{name}.interval"),
                        "interval and timeout must be greater than zero",
                    ));
                }
                if p.success_threshold == 0 || p.failure_threshold == 0 {
                    return Err(invalid(
                        format!("{name}.failure_threshold"),
                        "thresholds must be at least 1",
                    ));
                }
            }
        }
        match &self.strategy {
            Strategy::Rolling {
                max_surge,
                max_unavailable,
            } => {
                if *max_surge == 0 && *max_unavailable == 0 {
                    return Err(invalid(
                        "strategy.max_surge",
                        "max_surge and max_unavailable cannot both be 0: nothing could move",
                    ));
                }
                if *max_unavailable >= self.replicas && self.replicas > 0 && *max_surge == 0 {
                    return Err(invalid(
                        "strategy.max_unavailable",
                        "must be less than replicas",
                    ));
                }
            }
            Strategy::BlueGreen { .. } => {}
            Strategy::Canary { steps } => {
                if steps.is_empty() {
                    return Err(invalid(
                        "strategy.steps",
                        "a canary needs at least one step, e.g. steps = [{ weight = 20, pause = \"30s\" }]",
                    ));
                }
                let mut last = 0;
                for (i, s) in steps.iter().enumerate() {
                    if s.weight <= last || s.weight > 100 {
                        return Err(invalid(
                            format!("strategy.steps[{i}].weight"),
                            format!(
                                "{} must increase step by step and stay within 1-100",
                                s.weight
                            ),
                        ));
                    }
                    last = s.weight;
                }
            }
        }
        if self.drain_timeout.0.is_zero() {
            return Err(invalid("drain_timeout", "must be greater than zero"));
        }
        if self.progress_deadline.0 < Duration::from_secs(1) {
            return Err(invalid("progress_deadline", "must be at least 1s"));
        }
        if !(0.0..=1.0).contains(&self.analysis.max_error_rate) {
            return Err(invalid(
                "analysis.max_error_rate",
                "must be a fraction between 0 and 1, e.g. 0.01",
            ));
        }
        if let Some(a) = &self.autoscale {
            if a.min == 0 || a.min > a.max || a.max > 100 {
                return Err(invalid(
                    "autoscale.max",
                    format!("need 1 <= min ({}) <= max ({}) <= 100", a.min, a.max),
                ));
            }
            if !(a.target_rps.is_finite() && a.target_rps > 0.0) {
                return Err(invalid(
                    "autoscale.target_rps",
                    "must be a positive number of requests per second",
                ));
            }
        }
        if let Some(t) = &self.trigger {
            let kinds = usize::from(t.tag.is_some())
                + usize::from(t.semver.is_some())
                + usize::from(t.regex.is_some());
            if kinds != 1 {
                return Err(invalid(
                    "trigger",
                    "set exactly one of tag, semver or regex",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_with_or_without_sig_and_by_number() {
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert_eq!(parse_signal("quit"), Ok(3));
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("SIGRTMIN+3"), Ok(37));
        assert_eq!(parse_signal("SIGWINCH"), Ok(28));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        let e = ServiceSpec::from_toml(
            "name = \"web\"\nimage = \"hello:1\"\nstop_signal = \"SIGBOGUS\"\n[ingress]\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect_err("a bad signal is refused");
        assert!(e.to_string().starts_with("stop_signal: "), "{e}");
    }

    #[test]
    fn only_idempotent_methods_may_be_retried() {
        let base = "name = \"web\"\nimage = \"hello:1\"\n[ingress]\nlisten = \"127.0.0.1:1\"\n";
        let spec = ServiceSpec::from_toml(base).expect("defaults");
        assert_eq!(spec.ingress.retry_methods, ["GET", "HEAD", "OPTIONS"]);
        let spec = ServiceSpec::from_toml(&format!(
            "{base}retry_methods = [\"GET\", \"PUT\", \"DELETE\"]\n"
        ))
        .expect("PUT and DELETE on request");
        assert_eq!(spec.ingress.retry_methods, ["GET", "PUT", "DELETE"]);
        for bad in ["POST", "PATCH", "get"] {
            let e = ServiceSpec::from_toml(&format!("{base}retry_methods = [\"{bad}\"]\n"))
                .expect_err("refused");
            assert!(
                e.to_string().starts_with("ingress.retry_methods: ") && e.to_string().contains(bad),
                "{e}"
            );
        }
    }

    const FULL: &str = r#"
name = "web"
image = "hello:1.0.0"
replicas = 3
env = { HELLO_VERSION = "1.0.0" }
memory = "64m"
[ingress]
listen = "127.0.0.1:8080"
[health.readiness]
http = "/healthz"
interval = "200ms"
[strategy]
type = "canary"
steps = [{ weight = 10, pause = "10s" }, { weight = 50 }]
[analysis]
max_error_rate = 0.05
max_p99 = "250ms"
[trigger]
semver = "^1"
"#;

    #[test]
    fn a_full_spec_parses_with_defaults_filled_in() {
        let s = ServiceSpec::from_toml(FULL).expect("valid");
        assert_eq!(s.replicas, 3);
        assert_eq!(s.drain_timeout, Dur(Duration::from_secs(30)));
        assert!(
            matches!(&s.strategy, Strategy::Canary { steps } if steps[1].pause == Dur(Duration::from_secs(30)))
        );
        let minimal = ServiceSpec::from_toml(
            "name = \"a\"\nimage = \"x:1\"\n[ingress]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .expect("valid");
        assert_eq!(
            minimal.strategy,
            Strategy::Rolling {
                max_surge: 1,
                max_unavailable: 0
            }
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (
                FULL.replace("replicas = 3", "replicas = 3\nreplicaz = 1"),
                "unknown field `replicaz`",
            ),
            (FULL.replace("\"200ms\"", "\"soon\""), "line"),
            (
                FULL.replace("{ weight = 50 }", "{ weight = 5 }"),
                "strategy.steps[1].weight",
            ),
            (
                FULL.replace("{ weight = 50 }", "{ weight = 150 }"),
                "strategy.steps[1].weight",
            ),
            (FULL.replace("name = \"web\"", "name = \"Web_1\""), "name:"),
            (
                FULL.replace("http = \"/healthz\"", "http = \"/healthz\"\ntcp = true"),
                "health.readiness",
            ),
            (
                FULL.replace("semver = \"^1\"", "semver = \"^1\"\ntag = \"x\""),
                "trigger",
            ),
            (
                FULL.replace("max_error_rate = 0.05", "max_error_rate = 5.0"),
                "analysis.max_error_rate",
            ),
            (
                FULL.replace("listen = \"127.0.0.1:8080\"", "listen = \"nowhere\""),
                "listen",
            ),
            (
                FULL.to_owned() + "[autoscale]\nmin = 3\nmax = 2\ntarget_rps = 10\n",
                "autoscale.max",
            ),
            (
                FULL.to_owned() + "[autoscale]\nmin = 1\nmax = 2\ntarget_rps = 0\n",
                "autoscale.target_rps",
            ),
        ];
        for (text, want) in cases {
            let e = ServiceSpec::from_toml(&text).expect_err(want).to_string();
            assert!(e.contains(want), "expected {want:?} in {e}");
        }
    }
}
