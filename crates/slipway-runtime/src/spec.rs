//! What a user asks to run, and its validation. Every error names the field.

use crate::RuntimeError;

pub use slipway_api::containers::{RestartPolicy, RunRequest};

/// Parses `64m`, `1g`, `512k`, `1048576` into bytes (at least 4 MiB).
pub fn parse_memory(s: &str) -> Result<i64, RuntimeError> {
    slipway_core::placement::parse_memory_limit(s)
        .and_then(|b| i64::try_from(b).map_err(|_| format!("{s:?} is too large")))
        .map_err(|e| RuntimeError::InvalidSpec(format!("memory: {e}")))
}

/// Container names: `[a-z0-9][a-z0-9_.-]{0,62}`; they become directory names.
pub fn validate_name(name: &str) -> Result<(), RuntimeError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "name: {name:?} must be 1-63 characters of [a-z0-9_.-], starting with a letter or digit"
        )))
    }
}

/// Checks every field that can be checked without the image.
pub fn validate(r: &RunRequest) -> Result<(), RuntimeError> {
    if r.image.trim().is_empty() {
        return Err(RuntimeError::InvalidSpec("image: must not be empty".into()));
    }
    if let Some(n) = &r.name {
        validate_name(n)?;
    }
    for kv in &r.env {
        match kv.split_once('=') {
            Some((k, _)) if !k.is_empty() && !k.contains('\0') => {}
            _ => {
                return Err(RuntimeError::InvalidSpec(format!(
                    "env: {kv:?} must be KEY=VALUE"
                )));
            }
        }
    }
    if r.port == Some(0) {
        return Err(RuntimeError::InvalidSpec(
            "port: must be between 1 and 65535".into(),
        ));
    }
    if let Some(m) = &r.memory {
        parse_memory(m)?;
    }
    if let Some(c) = r.cpus
        && !(c.is_finite() && (0.01..=1024.0).contains(&c))
    {
        return Err(RuntimeError::InvalidSpec(format!(
            "cpus: {c} must be between 0.01 and 1024"
        )));
    }
    if let Some(p) = r.pids
        && p < 1
    {
        return Err(RuntimeError::InvalidSpec(format!(
            "pids: {p} must be at least 1"
        )));
    }
    if let Some(sig) = &r.stop_signal {
        slipway_core::service::parse_signal(sig)
            .map_err(|e| RuntimeError::InvalidSpec(format!("stop_signal: {e}")))?;
    }
    for v in &r.volumes {
        let Some((name, path)) = v.split_once(':') else {
            return Err(RuntimeError::InvalidSpec(format!(
                "volumes: {v:?} must be NAME:/path"
            )));
        };
        validate_name(name).map_err(|_| {
            RuntimeError::InvalidSpec(format!("volumes: volume name {name:?} must be [a-z0-9_.-]"))
        })?;
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(RuntimeError::InvalidSpec(format!(
                "volumes: {path:?} must be an absolute path without '..'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_tiny_or_junk_values_are_rejected() {
        assert_eq!(parse_memory("64m").expect("ok"), 64 << 20);
        assert_eq!(parse_memory("1G").expect("ok"), 1 << 30);
        assert_eq!(parse_memory("8388608").expect("ok"), 8 << 20);
        for bad in ["", "abc", "-5m", "1k", "12x", "99999999999999g"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let base = RunRequest {
            image: "hello:1".into(),
            ..RunRequest::default()
        };
        let cases = [
            (
                RunRequest {
                    name: Some("../x".into()),
                    ..base.clone()
                },
                "name:",
            ),
            (
                RunRequest {
                    env: vec!["NOPE".into()],
                    ..base.clone()
                },
                "env:",
            ),
            (
                RunRequest {
                    cpus: Some(0.0),
                    ..base.clone()
                },
                "cpus:",
            ),
            (
                RunRequest {
                    memory: Some("lots".into()),
                    ..base.clone()
                },
                "memory:",
            ),
            (
                RunRequest {
                    pids: Some(0),
                    ..base.clone()
                },
                "pids:",
            ),
            (
                RunRequest {
                    volumes: vec!["data:relative".into()],
                    ..base.clone()
                },
                "volumes:",
            ),
            (
                RunRequest {
                    port: Some(0),
                    ..base.clone()
                },
                "port:",
            ),
        ];
        for (req, field) in cases {
            let e = validate(&req).expect_err(field).to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(validate(&base).is_ok());
        assert!(RestartPolicy::parse("sometimes").is_err());
    }
}
