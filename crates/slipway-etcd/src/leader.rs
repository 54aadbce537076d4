//! Leadership by etcd lease and election, and writes fenced by it.
//!
//! A control plane campaigns with a lease of `ttl` (etcd's election API: the
//! oldest key under the election's prefix leads). While it leads, a task keeps
//! the lease alive every `ttl / 3`; if etcd cannot be reached for a whole `ttl`,
//! or the lease has expired, leadership is lost and [`Leader::lost`] fires, and
//! the holder must stop acting (as Kubernetes' controller manager exits when it
//! loses its lease). Because a deposed leader may not know yet, every write of an
//! [`EtcdState`] that leads also compares the leader key's `create_revision`: once
//! another process leads, the old leader's late writes are refused with
//! [`StateError::Fenced`], whatever it believes.

use std::time::Duration;

use etcd_client::LeaderKey;
use slipway_controller::state::StateError;
use tokio::sync::watch;

use crate::{EtcdState, unavailable};

/// This process's leadership of one election.
#[derive(Debug)]
pub struct Leader {
    key: LeaderKey,
    lease: i64,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leader {
    /// Fires (turns `true`) once leadership is lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// The lease leadership hangs on.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// The leader key and its `create_revision`: a write comparing them holds
    /// only while this leadership does.
    pub(crate) fn fence_key(&self) -> (Vec<u8>, i64) {
        (self.key.key().to_vec(), self.key.rev())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl EtcdState {
    /// Campaigns for leadership of `election` (under this store's namespace) as
    /// `id`, holding a lease of `ttl`; returns once this process leads. From then
    /// on this store's writes are fenced by it.
    pub async fn lead(
        &self,
        election: &str,
        id: &str,
        ttl: Duration,
    ) -> Result<std::sync::Arc<Leader>, StateError> {
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
        let grant = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(|e| unavailable(&e))?;
        let lease = grant.id();
        let (lost_tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(self.clone(), lease, ttl, lost_tx));
        let name = self.key(&format!("election/{election}"));
        // A campaign blocks until this process leads, but every request is cut
        // at the client's timeout: campaign again with the same lease, which
        // keeps the same key and so the same place in the queue. Only a lost
        // lease ends the campaign (and its key goes with the lease).
        let resp = loop {
            match self
                .client
                .election_client()
                .campaign(name.clone(), id, lease)
                .await
            {
                Ok(r) => break r,
                Err(e) => {
                    if *lost.borrow() {
                        keeper.abort();
                        let _ = self.client.lease_client().revoke(lease).await;
                        return Err(unavailable(&e));
                    }
                    tracing::debug!("campaign: {e}; campaigning again with lease {lease:x}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let key = resp
            .leader()
            .cloned()
            .ok_or_else(|| StateError::Unavailable("etcd: campaign gave no leader key".into()))?;
        let leader = std::sync::Arc::new(Leader {
            key,
            lease,
            lost,
            keeper,
        });
        *self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(leader.clone());
        Ok(leader)
    }

    /// Gives leadership up: revokes the lease, so another campaigner leads at once.
    pub async fn resign(&self) -> Result<(), StateError> {
        let leader = self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(l) = leader {
            l.keeper.abort();
            self.client
                .lease_client()
                .revoke(l.lease)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        Ok(())
    }
}

/// Keeps `lease` alive every `ttl / 3`; flags `lost` once it has expired or etcd
/// has not confirmed it for a whole `ttl`.
async fn keep_alive(state: EtcdState, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let every = ttl / 3;
    let mut confirmed = tokio::time::Instant::now();
    let mut lease_client = state.client.lease_client();
    let mut stream = None;
    loop {
        tokio::time::sleep(every).await;
        if stream.is_none() {
            stream = lease_client.keep_alive(lease).await.ok();
        }
        let alive = match stream.as_mut() {
            Some((keeper, responses)) => {
                let sent = keeper.keep_alive().await.is_ok();
                match tokio::time::timeout(every, responses.message()).await {
                    Ok(Ok(Some(r))) if sent => {
                        if r.ttl() <= 0 {
                            // etcd says the lease is gone: someone else may lead.
                            tracing::error!("etcd lease {lease:x} expired: leadership lost");
                            let _ = lost.send(true);
                            return;
                        }
                        true
                    }
                    _ => false,
                }
            }
            None => false,
        };
        if alive {
            confirmed = tokio::time::Instant::now();
        } else {
            stream = None;
            if confirmed.elapsed() >= ttl {
                tracing::error!("etcd unreachable for {ttl:?}: leadership lost");
                let _ = lost.send(true);
                return;
            }
        }
    }
}
