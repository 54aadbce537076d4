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

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
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
}

impl std::fmt::Debug for EtcdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdState")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: &etcd_client::Error) -> StateError {
    StateError::Unavailable(format!("etcd: {e}"))
}

/// Parses `etcd://HOST:PORT[,HOST:PORT…]` (or bare `HOST:PORT,…`) into endpoints.
pub fn parse_endpoints(url: &str) -> Result<Vec<String>, String> {
    let list = url.strip_prefix("etcd://").unwrap_or(url);
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| format!("http://{e}"))
        .collect();
    if endpoints.is_empty()
        || list.split(',').map(str::trim).any(|e| {
            e.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        })
    {
        return Err(format!(
            "{url:?} is not an etcd address: write etcd://HOST:PORT[,HOST:PORT...], e.g. etcd://127.0.0.1:2379"
        ));
    }
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

/// What a failed comparison found: the key's version, if it exists.
fn found(resp: &etcd_client::TxnResponse) -> Option<u64> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| version(kv.mod_revision())),
        _ => None,
    })
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
        let k = self.key(key);
        let cmp = match expected {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::mod_revision(k.clone(), CompareOp::Equal, revision(v)),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(k.clone(), value, None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| unavailable(&e))?;
        self.saw(resp.header());
        if resp.succeeded() {
            // The put is the transaction's only write: its revision is the key's.
            return Ok(version(resp.header().map_or(0, |h| h.revision())));
        }
        Err(StateError::Conflict {
            key: key.to_owned(),
            expected,
            found: found(&resp),
        })
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StateError> {
        let k = self.key(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                revision(expected),
            )])
            .and_then([TxnOp::delete(k.clone(), None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = self
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(|e| unavailable(&e))?;
        self.saw(resp.header());
        if resp.succeeded() {
            return Ok(());
        }
        Err(StateError::Conflict {
            key: key.to_owned(),
            expected: Some(expected),
            found: found(&resp),
        })
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
