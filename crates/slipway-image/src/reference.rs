//! Image references as users write them: `[host[:port]/]name[:tag][@digest]`.

use std::fmt;

use slipway_core::{Digest, NameError, Reference, RepoName, Tag};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (and port), when given.
    pub host: Option<String>,
    /// Repository name.
    pub repo: RepoName,
    /// Tag or digest (`latest` when neither is given).
    pub reference: Reference,
}

/// Why an image reference is invalid.
#[derive(Debug, thiserror::Error)]
#[error("image reference {input:?} is invalid: {reason}")]
pub struct RefParseError {
    input: String,
    reason: String,
}

impl ImageRef {
    /// Parses `[host[:port]/]name[:tag][@digest]`. The first component is a host when
    /// it contains `.` or `:` or is `localhost` (Docker's rule).
    pub fn parse(s: &str) -> Result<Self, RefParseError> {
        let err = |reason: String| RefParseError {
            input: s.to_owned(),
            reason,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(d.parse::<Digest>().map_err(|e| err(e.to_string()))?),
            ),
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((first, tail))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_owned()), tail)
            }
            _ => (None, rest),
        };
        let (name, tag) = match path.rsplit_once(':') {
            Some((n, t)) => (n, Some(t)),
            None => (path, None),
        };
        let repo: RepoName = name.parse().map_err(|e: NameError| err(e.to_string()))?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => Reference::Tag(t.parse::<Tag>().map_err(|e| err(e.to_string()))?),
            (None, None) => {
                Reference::Tag("latest".parse::<Tag>().map_err(|e| err(e.to_string()))?)
            }
        };
        Ok(Self {
            host,
            repo,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_host_name_and_tag_like_docker() {
        let r = ImageRef::parse("hello:1.0.0").expect("valid");
        assert_eq!(
            (r.host, r.repo.as_str(), r.reference.to_string().as_str()),
            (None, "hello", "1.0.0")
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app").expect("valid");
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.reference.to_string(), "latest");
        let r = ImageRef::parse(
            "localhost/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .expect("valid");
        assert!(matches!(r.reference, Reference::Digest(_)));
        assert!(ImageRef::parse("Bad/Name").is_err());
        assert!(ImageRef::parse("app:-bad").is_err());
    }
}
