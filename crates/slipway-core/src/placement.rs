//! Where a service's instances may run when there are several nodes: the spec's
//! `[placement]` section, node-label constraints, and sizes in bytes.

use serde::{Deserialize, Serialize};

/// `[placement]`: how replicas are spread over nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `spread` (the default: replicas of one service on different nodes first)
    /// or `binpack` (fill the fullest node that fits first).
    #[serde(default)]
    pub strategy: PlacementStrategy,
    /// Node labels an instance's node must have: `zone=a`, or `disk!=hdd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// At most this many replicas of the service on one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_node: Option<u32>,
}

impl Placement {
    /// Whether it is all defaults (so that it is left out of serialised specs).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The constraints, parsed; the first bad one is named in the error.
    pub fn parsed_constraints(&self) -> Result<Vec<Constraint>, String> {
        self.constraints
            .iter()
            .map(|c| Constraint::parse(c))
            .collect()
    }
}

/// How replicas are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Fewest replicas of the service first, then the emptiest node.
    #[default]
    Spread,
    /// The fullest node that still fits first.
    Binpack,
}

/// A node-label constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// The label's key.
    pub key: String,
    /// The value it must (or must not) have.
    pub value: String,
    /// `true` for `!=`: the node must not have that value (a node without the
    /// label matches).
    pub negated: bool,
}

/// Whether `s` is a label key or value: 1-63 characters of `[A-Za-z0-9._/-]`.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'))
}

impl Constraint {
    /// Parses `key=value` or `key!=value` (spaces around the operator allowed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (key, value, negated) = if let Some((k, v)) = s.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = s.split_once('=') {
            (k, v.strip_prefix('=').unwrap_or(v), false)
        } else {
            return Err(format!(
                "{s:?} is not a constraint: write key=value or key!=value, e.g. zone=a"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if !valid_label(key) || !valid_label(value) {
            return Err(format!(
                "{s:?}: label keys and values are 1-63 characters of letters, digits, '.', '_', '-' or '/'"
            ));
        }
        Ok(Self {
            key: key.to_owned(),
            value: value.to_owned(),
            negated,
        })
    }

    /// Whether a node with `labels` satisfies it.
    pub fn matches<'a>(&self, mut labels: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        let has = labels.any(|(k, v)| k == self.key && v == self.value);
        has != self.negated
    }
}

impl std::fmt::Display for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.negated { "!=" } else { "=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

/// Parses a memory limit (`64m`, `1g`, bytes…) of at least 4 MiB; the error says
/// what to write instead.
pub fn parse_memory_limit(s: &str) -> Result<u64, String> {
    parse_size(s).filter(|b| *b >= 4 << 20).ok_or_else(|| {
        format!("{s:?} is not a size; use bytes or a number with k, m or g (e.g. 64m), at least 4m")
    })
}

/// Parses `64m`, `1g`, `512k`, `1048576` (bytes, optionally with `b`) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_match_labels() {
        let c = Constraint::parse("zone = a").expect("parse");
        assert_eq!(c.to_string(), "zone=a");
        let labels = [("zone", "a"), ("disk", "ssd")];
        assert!(c.matches(labels.iter().copied()));
        let not_hdd = Constraint::parse("disk!=hdd").expect("parse");
        assert!(not_hdd.matches(labels.iter().copied()));
        assert!(not_hdd.matches(std::iter::empty()), "no label is not hdd");
        assert!(
            !Constraint::parse("zone==b")
                .expect("parse")
                .matches(labels.iter().copied())
        );
        for bad in ["zone", "=a", "zone=", "zo ne=a", "zone=a;b"] {
            assert!(Constraint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512kb"), Some(512 << 10));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999t"), None);
    }
}
