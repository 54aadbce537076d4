//! Where service records persist: the [`StateStore`] trait, an in-memory
//! implementation for tests, and the behaviour suite every implementation must pass.
//!
//! The trait is shaped after etcd's key-value API so that an etcd implementation is
//! just another one: keys are strings, values bytes, and every write gets a version
//! from one counter that grows across all keys (etcd's mod revision). Writes are
//! compare-and-swap on that version, so a writer that lost a race learns it instead
//! of overwriting.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// A value with the version of its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The store-wide version of the write that set it.
    pub version: u64,
}

/// A change seen by [`StateStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was written.
    Put(Versioned),
    /// A key was deleted, at this version.
    Delete {
        /// The key.
        key: String,
        /// The version of the delete.
        version: u64,
    },
}

/// Why a state-store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The key is not at the expected version: someone else wrote it.
    #[error("{key}: expected version {expected:?}, found {found:?} (another writer changed it)")]
    Conflict {
        /// The key.
        key: String,
        /// What the writer expected (`None`: that it did not exist).
        expected: Option<u64>,
        /// What the store holds (`None`: it does not exist).
        found: Option<u64>,
    },
    /// The store cannot be reached or failed.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// This process no longer leads (another control plane took over): its
    /// writes are refused whatever it believes.
    #[error("not the leader any more: {0}")]
    Fenced(String),
}

/// Durable, versioned storage of control-plane records.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Every key under `prefix`, in key order.
    async fn load_all(&self, prefix: &str) -> Result<Vec<Versioned>, StateError>;
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError>;
    /// Writes `key` if it is at version `expected` (`None`: if it does not exist);
    /// returns the new version once the write is durable.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError>;
    /// Deletes `key` if it is at version `expected`.
    async fn delete(&self, key: &str, expected: u64) -> Result<(), StateError>;
    /// Changes under `prefix` from now on, in version order.
    fn watch(&self, prefix: &str) -> mpsc::UnboundedReceiver<WatchEvent>;
}

/// Watchers of a store, by prefix: the shared part of in-process implementations.
#[derive(Default)]
pub struct Watchers(Mutex<Vec<(String, mpsc::UnboundedSender<WatchEvent>)>>);

impl Watchers {
    /// A new watcher of `prefix`.
    pub fn add(&self, prefix: &str) -> mpsc::UnboundedReceiver<WatchEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((prefix.to_owned(), tx));
        rx
    }

    /// Tells every watcher whose prefix matches; forgets those that went away.
    pub fn notify(&self, event: &WatchEvent) {
        let key = match event {
            WatchEvent::Put(v) => &v.key,
            WatchEvent::Delete { key, .. } => key,
        };
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(prefix, tx)| {
                !key.starts_with(prefix.as_str()) || tx.send(event.clone()).is_ok()
            });
    }
}

/// The last version handed out, and each key's value and version.
type Memory = (u64, BTreeMap<String, (Vec<u8>, u64)>);

/// A state store in memory, for tests.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
    watchers: Watchers,
}

impl MemoryStore {
    fn locked(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn load_all(&self, prefix: &str) -> Result<Vec<Versioned>, StateError> {
        Ok(self
            .locked()
            .1
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, ver))| Versioned {
                key: k.clone(),
                value: v.clone(),
                version: *ver,
            })
            .collect())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        Ok(self.locked().1.get(key).map(|(v, ver)| Versioned {
            key: key.to_owned(),
            value: v.clone(),
            version: *ver,
        }))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        let mut g = self.locked();
        let found = g.1.get(key).map(|(_, v)| *v);
        if found != expected {
            return Err(StateError::Conflict {
                key: key.to_owned(),
                expected,
                found,
            });
        }
        g.0 += 1;
        let version = g.0;
        g.1.insert(key.to_owned(), (value.clone(), version));
        drop(g);
        self.watchers.notify(&WatchEvent::Put(Versioned {
            key: key.to_owned(),
            value,
            version,
        }));
        Ok(version)
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StateError> {
        let mut g = self.locked();
        let found = g.1.get(key).map(|(_, v)| *v);
        if found != Some(expected) {
            return Err(StateError::Conflict {
                key: key.to_owned(),
                expected: Some(expected),
                found,
            });
        }
        g.0 += 1;
        let version = g.0;
        g.1.remove(key);
        drop(g);
        self.watchers.notify(&WatchEvent::Delete {
            key: key.to_owned(),
            version,
        });
        Ok(())
    }

    fn watch(&self, prefix: &str) -> mpsc::UnboundedReceiver<WatchEvent> {
        self.watchers.add(prefix)
    }
}

/// The behaviour every [`StateStore`] must show; each implementation's tests call
/// this on an empty store. Panics on the first deviation.
#[expect(
    clippy::missing_panics_doc,
    reason = "a test suite: panicking is failing"
)]
pub async fn behaviour_suite(store: &dyn StateStore) {
    let mut watch = store.watch("svc/");
    assert_eq!(store.get("svc/a").await, Ok(None), "empty store");
    let v1 = store
        .put("svc/a", b"one".to_vec(), None)
        .await
        .expect("create");
    assert!(
        matches!(
            store.put("svc/a", b"again".to_vec(), None).await,
            Err(StateError::Conflict { found: Some(f), .. }) if f == v1
        ),
        "creating an existing key is a conflict"
    );
    let v2 = store
        .put("svc/a", b"two".to_vec(), Some(v1))
        .await
        .expect("update at the right version");
    assert!(v2 > v1, "versions grow: {v1} then {v2}");
    assert!(
        matches!(
            store.put("svc/a", b"stale".to_vec(), Some(v1)).await,
            Err(StateError::Conflict { .. })
        ),
        "a write at a stale version is refused"
    );
    let got = store.get("svc/a").await.expect("get").expect("present");
    assert_eq!((got.value.as_slice(), got.version), (&b"two"[..], v2));
    let vb = store.put("svc/b", b"bee".to_vec(), None).await.expect("b");
    assert!(vb > v2, "one counter across keys");
    store.put("other/c", b"c".to_vec(), None).await.expect("c");
    let all = store.load_all("svc/").await.expect("load");
    let keys: Vec<&str> = all.iter().map(|v| v.key.as_str()).collect();
    assert_eq!(
        keys,
        ["svc/a", "svc/b"],
        "load_all is by prefix, in key order"
    );
    assert!(
        matches!(
            store.delete("svc/a", v1).await,
            Err(StateError::Conflict { .. })
        ),
        "a delete at a stale version is refused"
    );
    store.delete("svc/a", v2).await.expect("delete");
    assert_eq!(store.get("svc/a").await, Ok(None), "deleted");
    assert!(
        matches!(
            store.put("svc/a", b"x".to_vec(), Some(v2)).await,
            Err(StateError::Conflict { found: None, .. })
        ),
        "updating a deleted key is a conflict"
    );
    // Watch events may arrive after the write returned (a remote store's watch
    // is its own stream): wait for the four with a deadline.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        match tokio::time::timeout(std::time::Duration::from_secs(10), watch.recv()).await {
            Ok(Some(e)) => seen.push(e),
            Ok(None) | Err(_) => break,
        }
    }
    while let Ok(e) = watch.try_recv() {
        seen.push(e);
    }
    let summary: Vec<(String, bool)> = seen
        .iter()
        .map(|e| match e {
            WatchEvent::Put(v) => (v.key.clone(), true),
            WatchEvent::Delete { key, .. } => (key.clone(), false),
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("svc/a".to_owned(), true),
            ("svc/a".to_owned(), true),
            ("svc/b".to_owned(), true),
            ("svc/a".to_owned(), false)
        ],
        "watch sees the prefix's writes in order, and only successful ones"
    );
    let versions: Vec<u64> = seen
        .iter()
        .map(|e| match e {
            WatchEvent::Put(v) => v.version,
            WatchEvent::Delete { version, .. } => *version,
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "watch versions grow: {versions:?}"
    );
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_memory_store_passes_the_behaviour_suite() {
        super::behaviour_suite(&super::MemoryStore::default()).await;
    }
}
