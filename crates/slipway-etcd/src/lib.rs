//! The control plane's state in etcd: [`EtcdState`] implements the controller's
//! [`StateStore`] over etcd's v3 API, so several `slipway serve` processes can
//! share one set of service records.
//!
//! The trait was shaped after etcd, so the mapping is direct: a key is
//! `<namespace><key>`, a value's version is the key's `mod_revision` (etcd's one
//! counter across all keys), a write at an expected version is a transaction that
//! compares `mod_revision` (or `create_revision == 0` for "must not exist") and,
//! when the comparison fails, reads the key so the conflict says what is there.
//! A watch is an etcd watch of the prefix that starts right after the newest
//! revision this client has seen, and resumes from its last event after a broken
//! stream, so nothing between is lost.
//!
//! Supported: etcd 3.4 and later (the v3 gRPC API; tested against Debian's 3.4.23).

mod leader;

pub use leader::Leader;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use slipway_controller::state::{StateError, StateStore, Versioned, WatchEvent};
use tokio::sync::mpsc;

/// Control-plane state in etcd.
#[derive(Clone)]
pub struct EtcdState {
    client: Client,
    namespace: String,
    /// The newest etcd revision any response has shown this client.
    seen: Arc<AtomicI64>,
    /// The leadership that fences this store's writes, once it leads.
    leader: Arc<Mutex<Option<Arc<Leader>>>>,
}

impl std::fmt::Debug for EtcdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdState")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unavailable(e: &etcd_client::Error) -> StateError {
    StateError::Unavailable(format!("etcd: {e}"))
}

/// Parses `etcd://HOST:PORT[,HOST:PORT…]` (or bare `HOST:PORT,…`) into endpoints.
pub fn parse_endpoints(url: &str) -> Result<Vec<String>, String> {
    let list = url.strip_prefix("etcd://").unwrap_or(url);
    let bad = || {
        format!(
            "{url:?} is not an etcd address: write etcd://HOST:PORT[,HOST:PORT...], e.g. etcd://127.0.0.1:2379"
        )
    };
    let endpoints = list
        .split(',')
        .map(str::trim)
        .map(|e| match e.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(format!("http://{e}")),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(endpoints)
}

impl EtcdState {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`), keeping
    /// every key under `namespace` (e.g. `/slipway/`).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, StateError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| unavailable(&e))?;
        let state = Self {
            client,
            namespace: namespace.to_owned(),
            seen: Arc::new(AtomicI64::new(0)),
            leader: Arc::default(),
        };
        // The revision "now" starts from: a watch begins after it.
        let resp = state
            .client
            .kv_client()
            .get(
                state.namespace.clone(),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(|e| unavailable(&e))?;
        state.saw(resp.header());
        Ok(state)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn strip(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.namespace).unwrap_or(&key).to_owned()
    }

    /// A transaction that writes `then` if `key` is at version `expected`
    /// (`None`: if it does not exist) and, while this store leads, its leadership
    /// holds too; otherwise it reads `key` (and the leader key) in the same round
    /// trip to tell a conflict from a lost leadership. The transaction's revision
    /// on success.
    async fn guarded(
        &self,
        key: &str,
        expected: Option<u64>,
        then: TxnOp,
    ) -> Result<u64, StateError> {
        let k = self.key(key);
        let mut when = vec![match expected {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::mod_revision(k.clone(), CompareOp::Equal, revision(v)),
        }];
        let mut otherwise = vec![TxnOp::get(k, None)];
        let fence = self
            .leader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|l| l.fence_key());
        if let Some((fk, rev)) = &fence {
            when.push(Compare::create_revision(fk.clone(), CompareOp::Equal, *rev));
            otherwise.push(TxnOp::get(fk.clone(), None));
        }
        let txn = Txn::new().when(when).and_then([then]).or_else(otherwise);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| unavailable(&e))?;
        self.saw(resp.header());
        if resp.succeeded() {
            return Ok(version(resp.header().map_or(0, |h| h.revision())));
        }
        let gets: Vec<Option<(i64, i64)>> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(
                    g.kvs()
                        .first()
                        .map(|kv| (kv.mod_revision(), kv.create_revision())),
                ),
                _ => None,
            })
            .collect();
        if let Some((_, rev)) = fence
            && gets.get(1).copied().flatten().map(|(_, created)| created) != Some(rev)
        {
            return Err(StateError::Fenced(format!(
                "the write of {key} was refused: another control plane leads now"
            )));
        }
        Err(StateError::Conflict {
            key: key.to_owned(),
            expected,
            found: gets.first().copied().flatten().map(|(m, _)| version(m)),
        })
    }

    fn saw(&self, header: Option<&etcd_client::ResponseHeader>) {
        if let Some(h) = header {
            self.seen.fetch_max(h.revision(), Ordering::AcqRel);
        }
    }
}

fn version(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

fn revision(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl StateStore for EtcdState {
    async fn load_all(&self, prefix: &str) -> Result<Vec<Versioned>, StateError> {
        let resp = self
            .client
            .kv_client()
            .get(self.key(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| unavailable(&e))?;
        self.saw(resp.header());
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| Versioned {
                key: self.strip(kv.key()),
                value: kv.value().to_vec(),
                version: version(kv.mod_revision()),
            })
            .collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        let resp = self
            .client
            .kv_client()
            .get(self.key(key), None)
            .await
            .map_err(|e| unavailable(&e))?;
        self.saw(resp.header());
        Ok(resp.kvs().first().map(|kv| Versioned {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            version: version(kv.mod_revision()),
        }))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        // The put is the transaction's only write: its revision is the key's.
        let k = self.key(key);
        self.guarded(key, expected, TxnOp::put(k, value, None))
            .await
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StateError> {
        let k = self.key(key);
        self.guarded(key, Some(expected), TxnOp::delete(k, None))
            .await
            .map(|_| ())
    }

    fn watch(&self, prefix: &str) -> mpsc::UnboundedReceiver<WatchEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        let key = self.key(prefix);
        let mut next = self.seen.load(Ordering::Acquire) + 1;
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !tx.is_closed() {
                let options = WatchOptions::new().with_prefix().with_start_revision(next);
                match this
                    .client
                    .watch_client()
                    .watch(key.clone(), Some(options))
                    .await
                {
                    Ok((_watcher, mut stream)) => {
                        backoff = Duration::from_millis(100);
                        while let Ok(Some(resp)) = stream.message().await {
                            if resp.canceled() {
                                tracing::warn!(
                                    "etcd watch of {key} cancelled: {} (compacted at {})",
                                    resp.cancel_reason(),
                                    resp.compact_revision()
                                );
                                if resp.compact_revision() > next {
                                    next = resp.compact_revision();
                                }
                                break;
                            }
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                let rev = kv.mod_revision();
                                next = next.max(rev + 1);
                                let event = match ev.event_type() {
                                    etcd_client::EventType::Put => WatchEvent::Put(Versioned {
                                        key: this.strip(kv.key()),
                                        value: kv.value().to_vec(),
                                        version: version(rev),
                                    }),
                                    etcd_client::EventType::Delete => WatchEvent::Delete {
                                        key: this.strip(kv.key()),
                                        version: version(rev),
                                    },
                                };
                                if tx.send(event).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!("etcd watch of {key}: {e}; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_from_etcd_urls() {
        assert_eq!(
            parse_endpoints("etcd://127.0.0.1:2379,10.0.0.2:2379"),
            Ok(vec![
                "http://127.0.0.1:2379".to_owned(),
                "http://10.0.0.2:2379".to_owned()
            ])
        );
        for bad in ["etcd://", "etcd://host", "etcd://:2379", "etcd://h:99999"] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }
}
