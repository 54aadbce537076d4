//! Parsing `/v2/…` paths into routes. Repository names contain `/`, so routes are
//! recognised by their trailing segments.

use slipway_core::{Digest, Reference, RepoName};

use crate::error::{Code, RegistryError, Result};

/// A recognised `/v2` route with validated parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepoName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepoName, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    /// `/v2/<name>/blobs/uploads/<id>` (the id is checked by the store)
    Upload(RepoName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepoName, Digest),
}

impl Route {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Catalog => "catalog",
            Self::Tags(_) => "tags",
            Self::Manifest(..) => "manifest",
            Self::Blob(..) => "blob",
            Self::UploadStart(_) | Self::Upload(..) => "blob_upload",
            Self::Referrers(..) => "referrers",
        }
    }
}

fn name(segments: &[&str]) -> Result<RepoName> {
    Ok(segments.join("/").parse()?)
}

fn unknown_route(path: &str) -> RegistryError {
    RegistryError::new(
        Code::Unsupported,
        format!("no registry API route matches {path:?}"),
    )
    .with_status(axum::http::StatusCode::NOT_FOUND)
}

/// Parses the part of the path after `/v2/`.
pub fn parse(rest: &str) -> Result<Route> {
    if rest.is_empty() {
        return Ok(Route::Base);
    }
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Ok(Route::Tags(name(&segs[..n - 2])?));
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        let repo = name(&segs[..n - 3])?;
        return Ok(if segs[n - 1].is_empty() {
            Route::UploadStart(repo)
        } else {
            Route::Upload(repo, segs[n - 1].to_owned())
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Ok(Route::UploadStart(name(&segs[..n - 2])?));
    }
    if n >= 3 {
        let repo = || name(&segs[..n - 2]);
        match segs[n - 2] {
            "blobs" => return Ok(Route::Blob(repo()?, segs[n - 1].parse()?)),
            "manifests" => return Ok(Route::Manifest(repo()?, Reference::parse(segs[n - 1])?)),
            "referrers" => return Ok(Route::Referrers(repo()?, segs[n - 1].parse()?)),
            _ => {}
        }
    }
    Err(unknown_route(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn multi_component_names_route_by_trailing_segments() {
        assert_eq!(parse("").expect("base"), Route::Base);
        assert_eq!(parse("_catalog").expect("catalog"), Route::Catalog);
        assert!(matches!(parse("a/b/tags/list"), Ok(Route::Tags(n)) if n.as_str() == "a/b"));
        assert!(
            matches!(parse("blobs/manifests/v1"), Ok(Route::Manifest(n, _)) if n.as_str() == "blobs")
        );
        assert!(matches!(
            parse(&format!("x/blobs/{D}")),
            Ok(Route::Blob(..))
        ));
        assert!(
            matches!(parse("x/y/blobs/uploads/"), Ok(Route::UploadStart(n)) if n.as_str() == "x/y")
        );
        assert!(matches!(
            parse("x/blobs/uploads"),
            Ok(Route::UploadStart(_))
        ));
        assert!(matches!(parse("x/blobs/uploads/abc"), Ok(Route::Upload(_, id)) if id == "abc"));
        assert!(matches!(
            parse(&format!("x/referrers/{D}")),
            Ok(Route::Referrers(..))
        ));
    }

    #[test]
    fn traversal_and_bad_parts_get_the_matching_code() {
        let code = |p: &str| parse(p).expect_err(p).code;
        assert_eq!(code("../x/manifests/v1"), Code::NameInvalid);
        assert_eq!(code("%2e%2e/x/manifests/v1"), Code::NameInvalid);
        assert_eq!(code("a/%2e%2e/b/tags/list"), Code::NameInvalid);
        assert_eq!(code("/abs/manifests/v1"), Code::NameInvalid);
        assert_eq!(code("x/manifests/..%2f"), Code::TagInvalid);
        assert_eq!(code("x/blobs/sha256:..%2f..%2fetc"), Code::DigestInvalid);
        assert_eq!(code("x/blobs/../../etc"), Code::Unsupported);
        assert_eq!(code("x/unknown/thing"), Code::Unsupported);
        assert_eq!(code("x"), Code::Unsupported);
    }
}
