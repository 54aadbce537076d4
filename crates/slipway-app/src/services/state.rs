//! The embedded state store: control-plane records in redb, with durable commits
//! (fsync before a write is reported) and versions from one counter, as etcd's
//! mod revisions.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use slipway_controller::state::{StateError, StateStore, Versioned, WatchEvent, Watchers};
use tokio::sync::mpsc;

const VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("values");
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("versions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const COUNTER: &str = "version";

/// Records in `<data>/state.redb`.
pub(crate) struct RedbState {
    db: Arc<Database>,
    watchers: Arc<Watchers>,
}

fn unavailable(e: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(e.to_string())
}

impl RedbState {
    /// Opens (or creates) the database.
    pub(crate) fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::create(path).map_err(unavailable)?;
        let w = db.begin_write().map_err(unavailable)?;
        {
            w.open_table(VALUES).map_err(unavailable)?;
            w.open_table(VERSIONS).map_err(unavailable)?;
            w.open_table(META).map_err(unavailable)?;
        }
        w.commit().map_err(unavailable)?;
        Ok(Self {
            db: Arc::new(db),
            watchers: Arc::default(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    /// Writes (`Some(value)`) or deletes (`None`) `key` if it is at `expected`.
    async fn write(
        &self,
        key: &str,
        value: Option<Vec<u8>>,
        expected: Option<u64>,
    ) -> Result<WatchEvent, StateError> {
        let key = key.to_owned();
        let event = self
            .blocking(move |db| {
                let w = db.begin_write().map_err(unavailable)?;
                let event = {
                    let mut versions = w.open_table(VERSIONS).map_err(unavailable)?;
                    let found = versions
                        .get(key.as_str())
                        .map_err(unavailable)?
                        .map(|v| v.value());
                    if found != expected {
                        return Err(StateError::Conflict {
                            key,
                            expected,
                            found,
                        });
                    }
                    let mut meta = w.open_table(META).map_err(unavailable)?;
                    let version = meta
                        .get(COUNTER)
                        .map_err(unavailable)?
                        .map_or(0, |v| v.value())
                        + 1;
                    meta.insert(COUNTER, version).map_err(unavailable)?;
                    let mut values = w.open_table(VALUES).map_err(unavailable)?;
                    match value {
                        Some(v) => {
                            values
                                .insert(key.as_str(), v.as_slice())
                                .map_err(unavailable)?;
                            versions
                                .insert(key.as_str(), version)
                                .map_err(unavailable)?;
                            WatchEvent::Put(Versioned {
                                key,
                                value: v,
                                version,
                            })
                        }
                        None => {
                            values.remove(key.as_str()).map_err(unavailable)?;
                            versions.remove(key.as_str()).map_err(unavailable)?;
                            WatchEvent::Delete { key, version }
                        }
                    }
                };
                // Durability::Immediate (redb's default): fsync'd before it returns.
                w.commit().map_err(unavailable)?;
                Ok(event)
            })
            .await?;
        self.watchers.notify(&event);
        Ok(event)
    }
}

#[async_trait]
impl StateStore for RedbState {
    async fn load_all(&self, prefix: &str) -> Result<Vec<Versioned>, StateError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let values = r.open_table(VALUES).map_err(unavailable)?;
            let versions = r.open_table(VERSIONS).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in values.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let key = k.value().to_owned();
                if !key.starts_with(&prefix) {
                    break;
                }
                let version = versions
                    .get(key.as_str())
                    .map_err(unavailable)?
                    .map_or(0, |v| v.value());
                out.push(Versioned {
                    key,
                    value: v.value().to_vec(),
                    version,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StateError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let values = r.open_table(VALUES).map_err(unavailable)?;
            let versions = r.open_table(VERSIONS).map_err(unavailable)?;
            let Some(v) = values.get(key.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            let version = versions
                .get(key.as_str())
                .map_err(unavailable)?
                .map_or(0, |v| v.value());
            Ok(Some(Versioned {
                value: v.value().to_vec(),
                key,
                version,
            }))
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateError> {
        match self.write(key, Some(value), expected).await? {
            WatchEvent::Put(v) => Ok(v.version),
            WatchEvent::Delete { version, .. } => Ok(version),
        }
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<(), StateError> {
        self.write(key, None, Some(expected)).await.map(|_| ())
    }

    fn watch(&self, prefix: &str) -> mpsc::UnboundedReceiver<WatchEvent> {
        self.watchers.add(prefix)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_redb_store_passes_the_behaviour_suite_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let store = super::RedbState::open(&path).expect("open");
        slipway_controller::state::behaviour_suite(&store).await;
        drop(store);
        let store = super::RedbState::open(&path).expect("reopen");
        let b = slipway_controller::StateStore::get(&store, "svc/b")
            .await
            .expect("get")
            .expect("kept across a reopen");
        assert_eq!(b.value, b"bee");
        let v = slipway_controller::StateStore::put(&store, "svc/z", b"z".to_vec(), None)
            .await
            .expect("put");
        assert!(v > b.version, "the counter survives a reopen");
    }
}
