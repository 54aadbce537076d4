//! Parsing and validating manifests of the four supported media types.
//!
//! The registry stores manifests as the exact bytes received; this module only reads
//! them to learn what they reference. Nothing here re-serialises a manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use slipway_core::{Digest, media};

/// What a manifest references, as learned from its JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedManifest {
    /// The effective media type: the `mediaType` field, or the request's Content-Type.
    pub media_type: String,
    /// `artifactType`, or for an image manifest without one, its config media type
    /// when that is not the standard image config (OCI 1.1 referrers rule).
    pub artifact_type: Option<String>,
    /// Blobs (config and layers) the manifest needs in the same repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (for an index or manifest list).
    pub manifests: Vec<Digest>,
    /// The `subject` manifest, if this is a referrer.
    pub subject: Option<Digest>,
    /// Manifest annotations, reported in referrers listings.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The Content-Type (or mediaType field) is not a manifest type we accept.
    #[error(
        "media type {0:?} is not supported: use an OCI image manifest or index, or a Docker schema 2 manifest or manifest list"
    )]
    UnsupportedMediaType(String),
    /// The body is not valid JSON of its media type.
    #[error("manifest is invalid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

const OCI_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn descriptor_digest(d: &RawDescriptor, field: &str) -> Result<Digest, ManifestError> {
    if d.size < 0 {
        return Err(ManifestError::Invalid(format!(
            "{field}: size {} is negative",
            d.size
        )));
    }
    d.digest
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("{field}: {e}")))
}

/// Parses `bytes` as a manifest. `content_type` is the request's Content-Type, if any.
///
/// The media type is taken from the `mediaType` field or, failing that, from the
/// Content-Type; when both are present they must agree.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, ManifestError> {
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| ManifestError::Invalid(format!("not valid manifest JSON: {e}")))?;
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty());
    let media_type = match (&raw.media_type, content_type) {
        (Some(field), Some(ct)) if field != ct => {
            return Err(ManifestError::Invalid(format!(
                "mediaType field {field:?} does not match Content-Type {ct:?}"
            )));
        }
        (Some(field), _) => field.clone(),
        (None, Some(ct)) => ct.to_owned(),
        // Neither says: an OCI manifest may omit mediaType; infer from its shape.
        (None, None) if raw.manifests.is_some() => media::OCI_INDEX.to_owned(),
        (None, None) => media::OCI_MANIFEST.to_owned(),
    };
    if !media::is_manifest(&media_type) {
        return Err(ManifestError::UnsupportedMediaType(media_type));
    }
    if raw.schema_version != Some(2) {
        return Err(ManifestError::Invalid("schemaVersion must be 2".to_owned()));
    }
    let mut parsed = ParsedManifest {
        media_type: media_type.clone(),
        artifact_type: raw.artifact_type.clone(),
        blobs: Vec::new(),
        manifests: Vec::new(),
        subject: None,
        annotations: raw.annotations,
    };
    if let Some(subject) = &raw.subject {
        parsed.subject = Some(descriptor_digest(subject, "subject")?);
    }
    if media::is_index(&media_type) {
        if raw.config.is_some() || raw.layers.is_some() {
            return Err(ManifestError::Invalid(
                "an index must not have config or layers".to_owned(),
            ));
        }
        let Some(children) = &raw.manifests else {
            return Err(ManifestError::Invalid(
                "an index needs a manifests array".to_owned(),
            ));
        };
        for (i, m) in children.iter().enumerate() {
            parsed
                .manifests
                .push(descriptor_digest(m, &format!("manifests[{i}]"))?);
        }
    } else {
        if raw.manifests.is_some() {
            return Err(ManifestError::Invalid(
                "an image manifest must not have a manifests array".to_owned(),
            ));
        }
        let Some(config) = &raw.config else {
            return Err(ManifestError::Invalid(
                "an image manifest needs a config descriptor".to_owned(),
            ));
        };
        parsed.blobs.push(descriptor_digest(config, "config")?);
        if parsed.artifact_type.is_none() {
            parsed.artifact_type = config
                .media_type
                .clone()
                .filter(|t| t != OCI_IMAGE_CONFIG && !t.starts_with("application/vnd.docker."));
        }
        let Some(layers) = &raw.layers else {
            return Err(ManifestError::Invalid(
                "an image manifest needs a layers array".to_owned(),
            ));
        };
        for (i, l) in layers.iter().enumerate() {
            parsed
                .blobs
                .push(descriptor_digest(l, &format!("layers[{i}]"))?);
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_lists_config_and_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"x","digest":"{}","size":3}}]}}"#,
            media::OCI_MANIFEST,
            d('a'),
            d('b')
        );
        let p = parse(body.as_bytes(), Some(media::OCI_MANIFEST)).expect("valid");
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.artifact_type, None);
    }

    #[test]
    fn artifact_type_falls_back_to_custom_config_media_type() {
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.example.sbom","digest":"{}","size":2}},"layers":[],"subject":{{"mediaType":"{}","digest":"{}","size":9}}}}"#,
            d('a'),
            media::OCI_MANIFEST,
            d('c')
        );
        let p = parse(body.as_bytes(), Some(media::OCI_MANIFEST)).expect("valid");
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
        assert_eq!(p.subject, Some(d('c').parse().expect("digest")));
    }

    #[test]
    fn index_lists_children() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":5}}]}}"#,
            media::OCI_INDEX,
            media::OCI_MANIFEST,
            d('e')
        );
        let p = parse(body.as_bytes(), None).expect("valid");
        assert_eq!(p.manifests, vec![d('e').parse().expect("digest")]);
    }

    #[test]
    fn malformed_manifests_are_rejected_with_a_reason() {
        let cases: &[(&str, Option<&str>)] = &[
            ("not json", Some(media::OCI_MANIFEST)),
            (
                r#"{"schemaVersion":1,"config":{"digest":"x","size":1},"layers":[]}"#,
                None,
            ),
            (
                r#"{"schemaVersion":2,"layers":[]}"#,
                Some(media::OCI_MANIFEST),
            ),
            (
                r#"{"schemaVersion":2,"config":{"digest":"sha256:zz","size":1},"layers":[]}"#,
                None,
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                Some(media::OCI_MANIFEST),
            ),
        ];
        for (body, ct) in cases {
            assert!(
                parse(body.as_bytes(), *ct).is_err(),
                "{body} must be rejected"
            );
        }
        assert!(matches!(
            parse(br#"{"schemaVersion":2}"#, Some("text/plain")),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
    }
}
