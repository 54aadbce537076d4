use std::fmt;
use std::str::FromStr;

use crate::Digest;

/// Longest repository name accepted. The distribution spec leaves this to the
/// registry; 255 matches what Docker clients allow for a whole reference.
const MAX_NAME_LEN: usize = 255;
/// Tags are `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
const MAX_TAG_LEN: usize = 128;

/// A repository name such as `team/app`, validated against the distribution spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
///
/// The grammar admits no `.` component, no `..`, no leading `/` and no empty component,
/// so a `RepoName` never escapes a directory it is joined to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

/// A tag such as `v1.2.3`: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

/// What a manifest is addressed by: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

/// Why a repository name or tag is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The repository name breaks the grammar.
    #[error(
        "repository name {0:?} is invalid: use lowercase components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/'"
    )]
    Repo(String),
    /// The repository name is too long.
    #[error("repository name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    RepoTooLong(usize),
    /// The tag breaks the grammar.
    #[error(
        "tag {0:?} is invalid: use up to 128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
    )]
    Tag(String),
}

// === impl RepoName ===

impl RepoName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        let sep = b[i];
        while i < b.len() && b[i] == sep {
            i += 1;
        }
        let run = i - start;
        let ok = match sep {
            b'.' => run == 1,
            b'_' => run <= 2,
            b'-' => true,
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::RepoTooLong(s.len()));
        }
        if s.split('/').all(is_valid_component) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Repo(s.to_owned()))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

// === impl Tag ===

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::Tag(s.to_owned()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

// === impl Reference ===

impl Reference {
    /// Parses a manifest reference: anything containing ':' must be a digest, the rest a tag.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            s.parse().map(Self::Digest).map_err(ReferenceError::Digest)
        } else {
            s.parse().map(Self::Tag).map_err(ReferenceError::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

/// Why a manifest reference is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// It looked like a digest but is not one.
    #[error(transparent)]
    Digest(crate::DigestError),
    /// It looked like a tag but is not one.
    #[error(transparent)]
    Tag(NameError),
}

/// The version a tag names, if it is semver (`1.2.3` or `v1.2.3`).
pub fn tag_version(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.trim_start_matches('v')).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_repository_names_are_accepted() {
        for good in [
            "a",
            "library/busybox",
            "team/sub/app-name",
            "a.b_c__d---e",
            "x0/y1/z2",
            "my--repo",
        ] {
            assert!(
                good.parse::<RepoName>().is_ok(),
                "{good:?} must be accepted"
            );
        }
    }

    #[test]
    fn names_that_break_the_grammar_or_escape_a_path_are_rejected() {
        for bad in [
            "", "/abs", "abs/", "a//b", "..", "a/../b", "a/./b", ".hidden", "Upper", "a___b",
            "a..b", "a-", "-a", "a/%2e%2e", "a b", "a\\b", "a\0b",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(
            "a".repeat(256).parse::<RepoName>(),
            Err(NameError::RepoTooLong(256))
        );
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        for good in ["latest", "v1.2.3", "_x", "A-b.c_d", &"t".repeat(128)] {
            assert!(good.parse::<Tag>().is_ok(), "{good:?} must be accepted");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", &"t".repeat(129), "ü"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn references_with_a_colon_are_digests() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Ok(Reference::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("../x"),
            Err(ReferenceError::Tag(_))
        ));
    }
}
