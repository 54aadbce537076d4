//! Data directories written by releases before the state store kept each service
//! as `services/<name>.json` (`{"spec": …, "state": …}`). At start-up each such
//! file becomes a record in the state store, and is then renamed `*.json.migrated`
//! so it is read once and kept for the operator.

use std::path::Path;

use serde::Deserialize;
use slipway_controller::{Instance, Phase, Revision, ServiceRecord, StateStore};

/// The state part of a legacy file.
#[derive(Deserialize)]
struct LegacyState {
    name: String,
    revisions: Vec<Revision>,
    active: Option<u64>,
    instances: Vec<Instance>,
    #[serde(default)]
    weights: Vec<(u64, u32)>,
}

#[derive(Deserialize)]
struct LegacyFile {
    state: LegacyState,
}

/// The record a legacy file describes.
fn record_of(bytes: &[u8]) -> Result<ServiceRecord, String> {
    let f: LegacyFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let s = f.state;
    Ok(ServiceRecord {
        phase: if s.active.is_some() {
            Phase::Idle
        } else {
            Phase::New
        },
        revisions: s.revisions,
        active: s.active,
        instances: s.instances,
        weights: s.weights,
        message: "migrated from an earlier release".into(),
        ..ServiceRecord::new(&s.name)
    })
}

/// Moves every legacy file in `dir` into the state store (records already there
/// win), then renames it aside.
pub(crate) async fn migrate(dir: &Path, store: &dyn StateStore) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let record = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| record_of(&b))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot migrate a service file; left as it is: {e}");
                continue;
            }
        };
        let key = format!("services/{}", record.name);
        let bytes = match serde_json::to_vec(&record) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(file = %path.display(), "cannot encode the record: {e}");
                continue;
            }
        };
        match store.put(&key, bytes, None).await {
            Ok(_) => tracing::info!(service = %record.name, "migrated from {}", path.display()),
            Err(slipway_controller::StateError::Conflict { .. }) => {
                tracing::info!(service = %record.name, "already in the state store; {} ignored", path.display());
            }
            Err(e) => {
                tracing::error!(service = %record.name, "cannot migrate: {e}");
                continue;
            }
        }
        let mut aside = path.clone().into_os_string();
        aside.push(".migrated");
        if let Err(e) = std::fs::rename(&path, &aside) {
            tracing::warn!(file = %path.display(), "cannot rename the migrated file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    /// A service file exactly as the previous release wrote it.
    pub(crate) const LEGACY: &str = r#"{
  "spec": {"name": "web", "image": "hello:1.0.0", "replicas": 2, "env": {}, "memory": null, "cpus": null, "volumes": [],
           "ingress": {"listen": "127.0.0.1:18080", "hold_timeout": "10s", "balance": "round-robin"},
           "health": {"readiness": null, "liveness": null, "startup": null},
           "strategy": {"type": "rolling", "max_surge": 1, "max_unavailable": 0},
           "drain_timeout": "30s", "progress_deadline": "5m",
           "analysis": {"max_error_rate": 0.01, "max_p99": null, "min_requests": 20},
           "trigger": null, "autoscale": null},
  "state": {"name": "web",
            "revisions": [{"number": 1, "image": "hello@sha256:aa", "spec": {"name": "web", "image": "hello:1.0.0", "replicas": 2, "env": {}, "memory": null, "cpus": null, "volumes": [],
                           "ingress": {"listen": "127.0.0.1:18080", "hold_timeout": "10s", "balance": "round-robin"},
                           "health": {"readiness": null, "liveness": null, "startup": null},
                           "strategy": {"type": "rolling", "max_surge": 1, "max_unavailable": 0},
                           "drain_timeout": "30s", "progress_deadline": "5m",
                           "analysis": {"max_error_rate": 0.01, "max_p99": null, "min_requests": 20},
                           "trigger": null, "autoscale": null},
                           "status": "active", "message": null, "created_ms": 1}],
            "active": 1,
            "instances": [{"id": "web-r1-abcdef", "revision": 1, "addr": "127.0.0.1:40001"}],
            "phase": "revision 1 is live with 2 instances",
            "weights": [[1, 100]]}
}"#;

    #[tokio::test]
    async fn a_service_file_of_the_previous_release_becomes_a_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("web.json"), LEGACY).expect("write");
        let store = slipway_controller::state::MemoryStore::default();
        super::migrate(dir.path(), &store).await;
        let v = slipway_controller::StateStore::get(&store, "services/web")
            .await
            .expect("get")
            .expect("migrated");
        let r: slipway_controller::ServiceRecord =
            serde_json::from_slice(&v.value).expect("record");
        assert_eq!(r.active, Some(1));
        assert_eq!(r.spec().map(|s| s.replicas), Some(2));
        assert_eq!(r.instances.len(), 1);
        assert!(
            dir.path().join("web.json.migrated").exists(),
            "renamed aside"
        );
        assert!(!dir.path().join("web.json").exists());
    }
}
