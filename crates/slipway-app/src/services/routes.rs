//! Route tables in the state store, so every control plane on etcd serves every
//! ingress: the leader's ingresses write `routes/<service>` (the ingress and, per
//! revision, its weight and instance addresses) whenever they change, and every
//! standby watches `routes/` and serves the same tables from its own proxy. A
//! standby that takes over hands its ingresses to the services' actors, so no
//! listener closes.
//!
//! One owner: the service's actor (through its ingress) writes the table; a
//! standby only reads it.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slipway_controller::state::WatchEvent;
use slipway_controller::{Instance, StateError, StateStore, Traffic};
use slipway_core::service::Ingress;
use tokio::sync::watch;

use super::{ProxyTraffic, Services, lock};

/// A service's route table as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RouteDoc {
    /// How its ingress listens, once it does.
    pub ingress: Option<Ingress>,
    /// Per revision: its weight and its instances' addresses.
    pub revisions: Vec<(u64, u32, Vec<SocketAddr>)>,
}

impl RouteDoc {
    /// The routes as the ingress takes them.
    fn routes(&self) -> Vec<(u64, u32, Vec<Instance>)> {
        self.revisions
            .iter()
            .map(|(rev, weight, addrs)| {
                (
                    *rev,
                    *weight,
                    addrs
                        .iter()
                        .map(|a| Instance {
                            id: a.to_string(),
                            revision: *rev,
                            addr: *a,
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

fn key(service: &str) -> String {
    format!("routes/{service}")
}

/// Writes a service's newest route table (`None`: it was removed) until the
/// sender goes; a table that changes while one is written is written next, so
/// the store ends with the newest.
pub(crate) fn writer(
    state: Arc<dyn StateStore>,
    service: String,
) -> watch::Sender<Option<Option<RouteDoc>>> {
    let (tx, mut rx) = watch::channel::<Option<Option<RouteDoc>>>(None);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(doc) = rx.borrow_and_update().clone() else {
                continue;
            };
            if let Err(e) = write(state.as_ref(), &service, doc.as_ref()).await {
                tracing::warn!(%service, "cannot store the route table: {e}");
                if matches!(e, StateError::Fenced(_)) {
                    return;
                }
            }
        }
    });
    tx
}

async fn write(
    state: &dyn StateStore,
    service: &str,
    doc: Option<&RouteDoc>,
) -> Result<(), StateError> {
    loop {
        let current = state.get(&key(service)).await?;
        let version = current.as_ref().map(|v| v.version);
        let result = match (doc, version) {
            (Some(d), v) => state
                .put(&key(service), serde_json::to_vec(d).unwrap_or_default(), v)
                .await
                .map(|_| ()),
            (None, Some(v)) => state.delete(&key(service), v).await,
            (None, None) => Ok(()),
        };
        match result {
            Err(StateError::Conflict { .. }) => {}
            other => return other,
        }
    }
}

impl Services {
    /// On a standby: serves every service's route table from the store, as the
    /// leader writes them, until this process leads.
    pub(crate) fn follow_routes(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut events = this.state.watch("routes/");
            match this.state.load_all("routes/").await {
                Ok(all) => {
                    for v in all {
                        this.follow(&v.key, Some(&v.value)).await;
                    }
                }
                Err(e) => tracing::warn!("cannot load the route tables: {e}"),
            }
            while let Some(ev) = events.recv().await {
                match ev {
                    WatchEvent::Put(v) => this.follow(&v.key, Some(&v.value)).await,
                    WatchEvent::Delete { key, .. } => this.follow(&key, None).await,
                }
            }
        });
    }

    async fn follow(&self, key: &str, value: Option<&[u8]>) {
        if self.is_leading() {
            return;
        }
        let Some(service) = key.strip_prefix("routes/") else {
            return;
        };
        let doc = match value.map(serde_json::from_slice::<RouteDoc>) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                tracing::warn!(%service, "unreadable route table: {e}");
                return;
            }
        };
        let Some(doc) = doc else {
            if let Some(t) = lock(&self.followed).remove(service) {
                t.close();
            }
            return;
        };
        let Some(ingress) = &doc.ingress else {
            return;
        };
        let traffic = lock(&self.followed)
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(ProxyTraffic::new(self.pool.clone())))
            .clone();
        if let Err(e) = traffic.configure(ingress).await {
            tracing::warn!(%service, "cannot serve the ingress: {e}");
            return;
        }
        traffic.publish(&doc.routes());
    }

    /// The ingress a standby served for `service`, handed to its actor.
    pub(super) fn take_followed(&self, service: &str) -> Option<Arc<ProxyTraffic>> {
        lock(&self.followed).remove(service)
    }
}
