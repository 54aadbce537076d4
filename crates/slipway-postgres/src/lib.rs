//! Registry metadata in PostgreSQL, shared by every replica: [`PgMetadata`]
//! implements the store's `Metadata` over `tokio-postgres`.
//!
//! - **Schema**: versioned migrations ([`MIGRATIONS`]) applied at open under an
//!   advisory lock, recorded in `slipway_schema`; a database newer than this
//!   binary is refused, never written.
//! - **Transactions**: each `Metadata` call is one transaction. Text columns that
//!   are listed in order use the `C` collation, so tags and repositories page in
//!   byte order exactly as on one machine.
//! - **GC against pushes**: one advisory lock is the fence of the whole
//!   registry. Writers of blobs and manifests hold it shared from the object
//!   write to the row insert (a mount holds it for its transaction); GC holds it
//!   exclusively from its snapshot until its deleted objects are gone. So GC runs
//!   on one replica at a time and never deletes what a push on another replica
//!   is about to reference.
//! - **Connections**: a small pool; a connection that broke (the server
//!   restarted) is dropped and the call tried once more on a new one; what still
//!   fails is `StoreError::Unavailable`, a 503 to clients.
//!
//! Calls are blocking, run from the store's blocking threads on the runtime given
//! at open.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_core::{Digest, RepoName, Tag};
use slipway_store::metadata::{
    Fence, GcChanges, GcPlanner, GcSnapshot, ManifestRecord, Metadata, NewManifest, TagCheck,
    TagRow, check_references, from_json, parse_digest, to_json,
};
use slipway_store::{ReferrerDescriptor, Result, StoreError};
use tokio::runtime::Handle;
use tokio_postgres::{Client, NoTls};

/// The advisory lock that fences blob writes against GC deletes.
const FENCE_KEY: i64 = 0x736c_6970_7761_7901;
/// The advisory lock held while migrating.
const MIGRATE_KEY: i64 = 0x736c_6970_7761_7902;
/// Idle connections kept.
const IDLE: usize = 16;

/// The schema, one step per version. Never edit a released step: add one.
pub const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE TABLE repos (
    name TEXT COLLATE "C" PRIMARY KEY,
    created_ms BIGINT NOT NULL
);
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE repo_blobs (
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    linked_ms BIGINT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE manifests (
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE tags (
    repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    digest TEXT NOT NULL,
    pushed_ms BIGINT NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE referrers (
    repo TEXT NOT NULL,
    subject TEXT NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    descriptor BYTEA NOT NULL,
    PRIMARY KEY (repo, subject, digest)
);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    record BYTEA NOT NULL
);
"#,
)];

/// What went wrong inside a call: the database, or a registry rule.
enum Failure {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

type Res<T> = std::result::Result<T, Failure>;

fn failure(e: Failure) -> StoreError {
    match e {
        Failure::Store(e) => e,
        Failure::Pg(e) if lost(&e) => StoreError::Unavailable(format!("metadata database: {e}")),
        Failure::Pg(e) => match e.as_db_error() {
            Some(d) => StoreError::Db(format!("postgresql: {}: {}", d.code().code(), d.message())),
            None => StoreError::Db(format!("postgresql: {e}")),
        },
    }
}

/// Whether the server or the connection went away (not a bad statement):
/// a closed connection, an I/O error, or SQLSTATE class 08 (connection
/// exception) and 57P01..57P03 (shut down, crashed, starting up).
fn lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(d) = e.as_db_error() {
        let code = d.code().code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Whether the connection, not the statement, failed (worth a new connection).
fn broken(e: &Failure) -> bool {
    matches!(e, Failure::Pg(e) if lost(e))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn limit(n: Option<usize>) -> Option<i64> {
    n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

struct Inner {
    config: tokio_postgres::Config,
    rt: Handle,
    idle: Mutex<Vec<Client>>,
}

/// Registry metadata in a PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct PgMetadata {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMetadata")
            .field("hosts", &self.inner.config.get_hosts())
            .field("dbname", &self.inner.config.get_dbname())
            .finish()
    }
}

// === impl Inner ===

impl Inner {
    fn connect(&self) -> Result<Client> {
        let config = self.config.clone();
        let connected = self.rt.block_on(async move {
            let (client, conn) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "postgresql connection ended");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        connected
            .map_err(|e| StoreError::Unavailable(format!("metadata database: cannot connect: {e}")))
    }

    fn client(&self) -> Result<Client> {
        loop {
            let c = lock(&self.idle).pop();
            match c {
                Some(c) if c.is_closed() => continue,
                Some(c) => return Ok(c),
                None => return self.connect(),
            }
        }
    }

    fn put_back(&self, c: Client) {
        let mut idle = lock(&self.idle);
        if !c.is_closed() && idle.len() < IDLE {
            idle.push(c);
        }
    }

    /// Runs `op` on a pooled connection; when the connection (not the
    /// statement) failed, once more on a new one.
    fn run<T>(&self, mut op: impl AsyncFnMut(&mut Client) -> Res<T>) -> Result<T> {
        let mut tried = false;
        loop {
            let mut c = self.client()?;
            let r = self.rt.block_on(op(&mut c));
            match r {
                Ok(v) => {
                    self.put_back(c);
                    return Ok(v);
                }
                Err(e) if broken(&e) && !tried => {
                    tracing::warn!("metadata database connection lost; reconnecting");
                    tried = true;
                }
                Err(e) => {
                    self.put_back(c);
                    return Err(failure(e));
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Holds the registry's advisory lock on its own connection until dropped.
struct PgFence {
    inner: Arc<Inner>,
    client: Option<Client>,
    exclusive: bool,
}

impl Fence for PgFence {}

impl Drop for PgFence {
    fn drop(&mut self) {
        let Some(c) = self.client.take() else { return };
        let sql = if self.exclusive {
            "SELECT pg_advisory_unlock($1)"
        } else {
            "SELECT pg_advisory_unlock_shared($1)"
        };
        let unlocked = self.inner.rt.block_on(c.query_one(sql, &[&FENCE_KEY]));
        // A connection whose unlock failed may still hold the lock: never reuse it.
        if unlocked.is_ok() {
            self.inner.put_back(c);
        }
    }
}

// === impl PgMetadata ===

impl PgMetadata {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/dbname`) and
    /// brings the schema up to date. Requests run on `rt`.
    pub fn open(url: &str, rt: Handle) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Db(format!("database URL {url:?}: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("slipway");
        let md = Self {
            inner: Arc::new(Inner {
                config,
                rt,
                idle: Mutex::default(),
            }),
        };
        md.migrate()?;
        Ok(md)
    }

    /// The schema version this database is at after opening.
    pub fn schema_version(&self) -> Result<i32> {
        self.inner.run(async |c| {
            let row = c
                .query_one("SELECT COALESCE(MAX(version), 0) FROM slipway_schema", &[])
                .await?;
            Ok(row.get::<_, i32>(0))
        })
    }

    fn migrate(&self) -> Result<()> {
        let latest = MIGRATIONS.last().map_or(0, |m| m.0);
        self.inner.run(async |c| {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS slipway_schema (
                    version INT PRIMARY KEY,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await?;
            c.query_one("SELECT pg_advisory_lock($1)", &[&MIGRATE_KEY])
                .await?;
            let result = async {
                let at: i32 = c
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM slipway_schema", &[])
                    .await?
                    .get(0);
                if at > latest {
                    return Err(Failure::Store(StoreError::Db(format!(
                        "the database's schema is at version {at}, newer than this slipway \
                         knows ({latest}): upgrade slipway"
                    ))));
                }
                for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > at) {
                    let t = c.transaction().await?;
                    t.batch_execute(sql).await?;
                    t.execute(
                        "INSERT INTO slipway_schema (version) VALUES ($1)",
                        &[version],
                    )
                    .await?;
                    t.commit().await?;
                    tracing::info!(version, "metadata database migrated");
                }
                Ok(())
            }
            .await;
            c.query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATE_KEY])
                .await?;
            result
        })
    }
}

impl PgMetadata {
    /// Runs `sql` (parameters: repo, tag; one `digest` column back).
    fn tag_digest(&self, sql: &str, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let got = self.inner.run(async |c| {
            let row = c.query_opt(sql, &[&repo.as_str(), &tag.as_str()]).await?;
            Ok(row.map(|r| r.get::<_, String>(0)))
        })?;
        got.map(|d| parse_digest(&d)).transpose()
    }
}

async fn ensure_repo(t: &tokio_postgres::Transaction<'_>, repo: &str, now: i64) -> Res<()> {
    t.execute(
        "INSERT INTO repos (name, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&repo, &now],
    )
    .await?;
    Ok(())
}

/// The digests among `digests` that `table` has in `repo`.
async fn present(
    t: &tokio_postgres::Transaction<'_>,
    table: &str,
    repo: &str,
    digests: &[String],
) -> Res<std::collections::HashSet<String>> {
    let sql = format!("SELECT digest FROM {table} WHERE repo = $1 AND digest = ANY($2)");
    let rows = t.query(&sql, &[&repo, &digests]).await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

impl Metadata for PgMetadata {
    fn shared(&self) -> bool {
        true
    }

    fn total_blob_bytes(&self) -> Result<u64> {
        self.inner.run(async |c| {
            let row = c
                .query_one("SELECT COALESCE(SUM(size), 0)::BIGINT FROM blobs", &[])
                .await?;
            Ok(u64_of(row.get(0)))
        })
    }

    fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let d = digest.to_string();
        self.inner.run(async |c| {
            let d = &d;
            {
                let row = c
                    .query_opt(
                        "SELECT b.size FROM repo_blobs l JOIN blobs b ON b.digest = l.digest \
                         WHERE l.repo = $1 AND l.digest = $2",
                        &[&repo.as_str(), d],
                    )
                    .await?;
                Ok(row.map(|r| u64_of(r.get(0))))
            }
        })
    }

    fn mount(&self, from: &RepoName, to: &RepoName, digest: &Digest, now: u64) -> Result<bool> {
        let d = digest.to_string();
        let now = i64_of(now);
        self.inner.run(async |c| {
            let d = &d;
            {
                let t = c.transaction().await?;
                t.query_one("SELECT pg_advisory_xact_lock_shared($1)", &[&FENCE_KEY])
                    .await?;
                let has = t
                    .query_opt(
                        "SELECT 1 FROM repo_blobs l JOIN blobs b ON b.digest = l.digest \
                         WHERE l.repo = $1 AND l.digest = $2",
                        &[&from.as_str(), d],
                    )
                    .await?
                    .is_some();
                if !has {
                    return Ok(false);
                }
                t.execute(
                    "INSERT INTO repo_blobs (repo, digest, linked_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (repo, digest) DO UPDATE SET linked_ms = EXCLUDED.linked_ms",
                    &[&to.as_str(), d, &now],
                )
                .await?;
                ensure_repo(&t, to.as_str(), now).await?;
                t.commit().await?;
                Ok(true)
            }
        })
    }

    fn touch(&self, repo: &RepoName, digest: &Digest, now: u64) -> Result<()> {
        let d = digest.to_string();
        let now = i64_of(now);
        // At most one write a second per link, however many clients pull it.
        self.inner.run(async |c| {
            c.execute(
                "UPDATE repo_blobs SET linked_ms = $3 \
                 WHERE repo = $1 AND digest = $2 AND linked_ms < $3::BIGINT - 1000",
                &[&repo.as_str(), &d, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn unlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let d = digest.to_string();
        self.inner.run(async |c| {
            let d = &d;
            {
                let n = c
                    .execute(
                        "DELETE FROM repo_blobs WHERE repo = $1 AND digest = $2",
                        &[&repo.as_str(), d],
                    )
                    .await?;
                Ok(n > 0)
            }
        })
    }

    fn record_blob(&self, repo: &RepoName, digest: &Digest, size: u64, now: u64) -> Result<u64> {
        let d = digest.to_string();
        let (size, now) = (i64_of(size), i64_of(now));
        self.inner.run(async |c| {
            let d = &d;
            {
                let t = c.transaction().await?;
                let added = t
                    .execute(
                        "INSERT INTO blobs (digest, size, created_ms) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                        &[d, &size, &now],
                    )
                    .await?;
                t.execute(
                    "INSERT INTO repo_blobs (repo, digest, linked_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (repo, digest) DO UPDATE SET linked_ms = EXCLUDED.linked_ms",
                    &[&repo.as_str(), d, &now],
                )
                .await?;
                ensure_repo(&t, repo.as_str(), now).await?;
                t.commit().await?;
                Ok(if added > 0 { u64_of(size) } else { 0 })
            }
        })
    }

    fn put_manifest(&self, m: &NewManifest<'_>, check: TagCheck<'_>) -> Result<u64> {
        let repo = m.repo.as_str();
        let d = m.digest.to_string();
        let record = to_json(m.record)?;
        let referrer = m.referrer.as_ref().map(to_json).transpose()?;
        let subject = m.record.parsed.subject.as_ref().map(ToString::to_string);
        let size = i64_of(m.record.size);
        let now = i64_of(m.now);
        let blobs: Vec<String> = m
            .record
            .parsed
            .blobs
            .iter()
            .map(ToString::to_string)
            .collect();
        let children: Vec<String> = m
            .record
            .parsed
            .manifests
            .iter()
            .map(ToString::to_string)
            .collect();
        self.inner.run(async |c| {
            let (d, record, referrer, subject) = (&d, &record, &referrer, &subject);
            let (blobs, children) = (&blobs, &children);
            {
                let t = c.transaction().await?;
                if m.check_refs {
                    let linked = present(&t, "repo_blobs", repo, blobs).await?;
                    let known = present(&t, "manifests", repo, children).await?;
                    check_references(&m.record.parsed, |b, is_manifest| {
                        Ok(if is_manifest {
                            known.contains(&b.to_string())
                        } else {
                            linked.contains(&b.to_string())
                        })
                    })?;
                }
                t.execute(
                    "INSERT INTO manifests (repo, digest, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (repo, digest) DO UPDATE SET record = EXCLUDED.record",
                    &[&repo, d, record],
                )
                .await?;
                let added = t
                    .execute(
                        "INSERT INTO blobs (digest, size, created_ms) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                        &[d, &size, &now],
                    )
                    .await?;
                if let Some(tag) = m.tag {
                    let tag = tag.as_str();
                    loop {
                        let old = t
                            .query_opt(
                                "SELECT digest FROM tags WHERE repo = $1 AND tag = $2 FOR UPDATE",
                                &[&repo, &tag],
                            )
                            .await?
                            .map(|r| r.get::<_, String>(0));
                        match old {
                            Some(old) if &old == d => break,
                            Some(_) => {
                                check(tag)?;
                                t.execute(
                                    "UPDATE tags SET digest = $3, pushed_ms = $4 \
                                     WHERE repo = $1 AND tag = $2",
                                    &[&repo, &tag, d, &now],
                                )
                                .await?;
                                break;
                            }
                            None => {
                                let n = t
                                    .execute(
                                        "INSERT INTO tags (repo, tag, digest, pushed_ms) \
                                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                                        &[&repo, &tag, d, &now],
                                    )
                                    .await?;
                                if n > 0 {
                                    break;
                                }
                                // Another push created it first: look again.
                            }
                        }
                    }
                }
                if let (Some(desc), Some(subject)) = (referrer, subject) {
                    t.execute(
                        "INSERT INTO referrers (repo, subject, digest, descriptor) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (repo, subject, digest) \
                         DO UPDATE SET descriptor = EXCLUDED.descriptor",
                        &[&repo, subject, d, desc],
                    )
                    .await?;
                }
                ensure_repo(&t, repo, now).await?;
                t.commit().await?;
                Ok(if added > 0 { u64_of(size) } else { 0 })
            }
        })
    }

    fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.tag_digest(
            "SELECT digest FROM tags WHERE repo = $1 AND tag = $2",
            repo,
            tag,
        )
    }

    fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let d = digest.to_string();
        let got = self.inner.run(async |c| {
            let d = &d;
            {
                let row = c
                    .query_opt(
                        "SELECT record FROM manifests WHERE repo = $1 AND digest = $2",
                        &[&repo.as_str(), d],
                    )
                    .await?;
                Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
            }
        })?;
        got.map(|b| from_json(&b)).transpose()
    }

    fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        check: TagCheck<'_>,
    ) -> Result<Option<(ManifestRecord, Vec<String>)>> {
        let d = digest.to_string();
        let repo = repo.as_str();
        self.inner.run(async |c| {
            let d = &d;
            {
                let t = c.transaction().await?;
                let Some(row) = t
                    .query_opt(
                        "DELETE FROM manifests WHERE repo = $1 AND digest = $2 RETURNING record",
                        &[&repo, d],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let rec: ManifestRecord = from_json(&row.get::<_, Vec<u8>>(0))?;
                let tags: Vec<String> = t
                    .query(
                        "SELECT tag FROM tags WHERE repo = $1 AND digest = $2 ORDER BY tag FOR UPDATE",
                        &[&repo, d],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                for tag in &tags {
                    check(tag)?;
                }
                t.execute("DELETE FROM tags WHERE repo = $1 AND digest = $2", &[&repo, d])
                    .await?;
                if let Some(s) = &rec.parsed.subject {
                    t.execute(
                        "DELETE FROM referrers WHERE repo = $1 AND subject = $2 AND digest = $3",
                        &[&repo, &s.to_string(), d],
                    )
                    .await?;
                }
                t.commit().await?;
                Ok(Some((rec, tags)))
            }
        })
    }

    fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        self.tag_digest(
            "DELETE FROM tags WHERE repo = $1 AND tag = $2 RETURNING digest",
            repo,
            tag,
        )
    }

    fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Option<Vec<String>>> {
        let last = last.unwrap_or("");
        let n = limit(n);
        self.inner.run(async |c| {
            let known = c
                .query_opt("SELECT 1 FROM repos WHERE name = $1", &[&repo.as_str()])
                .await?
                .is_some();
            if !known {
                return Ok(None);
            }
            let rows = c
                .query(
                    "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
                    &[&repo.as_str(), &last, &n],
                )
                .await?;
            Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
        })
    }

    fn repos(&self, last: Option<&str>, n: Option<usize>) -> Result<Vec<String>> {
        let last = last.unwrap_or("");
        let n = limit(n);
        self.inner.run(async |c| {
            let rows = c
                .query(
                    "SELECT name FROM repos WHERE name > $1 ORDER BY name LIMIT $2",
                    &[&last, &n],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<ReferrerDescriptor>> {
        let s = subject.to_string();
        let rows = self.inner.run(async |c| {
            let s = &s;
            {
                let rows = c
                    .query(
                        "SELECT descriptor FROM referrers WHERE repo = $1 AND subject = $2 \
                         ORDER BY digest",
                        &[&repo.as_str(), s],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<_, Vec<u8>>(0))
                    .collect::<Vec<_>>())
            }
        })?;
        rows.iter().map(|b| from_json(b)).collect()
    }

    fn insert_upload(&self, id: &str, record: &[u8]) -> Result<()> {
        self.inner.run(async |c| {
            c.execute(
                "INSERT INTO uploads (id, record) VALUES ($1, $2)",
                &[&id, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn upload(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.inner.run(async |c| {
            let row = c
                .query_opt("SELECT record FROM uploads WHERE id = $1", &[&id])
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn swap_upload(&self, id: &str, expected: &[u8], new: &[u8]) -> Result<bool> {
        self.inner.run(async |c| {
            let n = c
                .execute(
                    "UPDATE uploads SET record = $3 WHERE id = $1 AND record = $2",
                    &[&id, &expected, &new],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn remove_upload(&self, id: &str) -> Result<()> {
        self.inner.run(async |c| {
            c.execute("DELETE FROM uploads WHERE id = $1", &[&id])
                .await?;
            Ok(())
        })
    }

    fn uploads(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.run(async |c| {
            let rows = c.query("SELECT id, record FROM uploads", &[]).await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn gc(&self, plan: GcPlanner<'_>, dry_run: bool) -> Result<GcChanges> {
        // The caller holds the fence exclusively: no push writes meanwhile.
        let snap = self.inner.run(async |c| {
            let t = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let mut snap = GcSnapshot::default();
            for r in t
                .query("SELECT repo, digest, record FROM manifests", &[])
                .await?
            {
                let rec: ManifestRecord = from_json(&r.get::<_, Vec<u8>>(2))?;
                snap.manifests.insert((r.get(0), r.get(1)), rec);
            }
            for r in t
                .query("SELECT repo, tag, digest, pushed_ms FROM tags", &[])
                .await?
            {
                snap.tags.push(TagRow {
                    repo: r.get(0),
                    tag: r.get(1),
                    digest: r.get(2),
                    pushed_ms: Some(u64_of(r.get(3))),
                });
            }
            for r in t
                .query("SELECT digest, size, created_ms FROM blobs", &[])
                .await?
            {
                snap.blobs
                    .push((r.get(0), u64_of(r.get(1)), u64_of(r.get(2))));
            }
            for r in t
                .query("SELECT repo, digest, linked_ms FROM repo_blobs", &[])
                .await?
            {
                snap.links.push((r.get(0), r.get(1), u64_of(r.get(2))));
            }
            for r in t.query("SELECT name, created_ms FROM repos", &[]).await? {
                snap.repos.push((r.get(0), u64_of(r.get(1))));
            }
            t.commit().await?;
            Ok(snap)
        })?;
        let changes = plan(&snap)?;
        if dry_run {
            return Ok(changes);
        }
        let unzip =
            |v: &[(String, String)]| -> (Vec<String>, Vec<String>) { v.iter().cloned().unzip() };
        let (tag_repos, tag_names) = unzip(&changes.tags);
        let (link_repos, link_digests) = unzip(&changes.links);
        let (m_repos, m_digests): (Vec<String>, Vec<String>) = changes
            .manifests
            .iter()
            .map(|(r, d, _)| (r.clone(), d.clone()))
            .unzip();
        let mut r_repos = Vec::new();
        let mut r_subjects = Vec::new();
        let mut r_digests = Vec::new();
        for (r, d, s) in &changes.manifests {
            if let Some(s) = s {
                r_repos.push(r.clone());
                r_subjects.push(s.clone());
                r_digests.push(d.clone());
            }
        }
        let blobs = &changes.blobs;
        let repos = &changes.repos;
        self.inner.run(async |c| {
            let (tag_repos, tag_names, link_repos, link_digests) =
                (&tag_repos, &tag_names, &link_repos, &link_digests);
            let (m_repos, m_digests) = (&m_repos, &m_digests);
            let (r_repos, r_subjects, r_digests) = (&r_repos, &r_subjects, &r_digests);
            {
                let t = c.transaction().await?;
                t.execute(
                    "DELETE FROM tags t USING unnest($1::text[], $2::text[]) AS d(repo, tag) \
                     WHERE t.repo = d.repo AND t.tag = d.tag",
                    &[tag_repos, tag_names],
                )
                .await?;
                t.execute(
                    "DELETE FROM manifests m USING unnest($1::text[], $2::text[]) AS d(repo, digest) \
                     WHERE m.repo = d.repo AND m.digest = d.digest",
                    &[m_repos, m_digests],
                )
                .await?;
                t.execute(
                    "DELETE FROM referrers f \
                     USING unnest($1::text[], $2::text[], $3::text[]) AS d(repo, subject, digest) \
                     WHERE f.repo = d.repo AND f.subject = d.subject AND f.digest = d.digest",
                    &[r_repos, r_subjects, r_digests],
                )
                .await?;
                t.execute("DELETE FROM blobs WHERE digest = ANY($1)", &[blobs])
                    .await?;
                t.execute(
                    "DELETE FROM repo_blobs l USING unnest($1::text[], $2::text[]) AS d(repo, digest) \
                     WHERE l.repo = d.repo AND l.digest = d.digest",
                    &[link_repos, link_digests],
                )
                .await?;
                t.execute("DELETE FROM repos WHERE name = ANY($1)", &[repos])
                    .await?;
                t.commit().await?;
                Ok(())
            }
        })?;
        Ok(changes)
    }

    fn fence(&self, exclusive: bool) -> Result<Box<dyn Fence>> {
        let sql = if exclusive {
            "SELECT pg_advisory_lock($1)"
        } else {
            "SELECT pg_advisory_lock_shared($1)"
        };
        let mut tried = false;
        loop {
            let c = self.inner.client()?;
            match self.inner.rt.block_on(c.query_one(sql, &[&FENCE_KEY])) {
                Ok(_) => {
                    return Ok(Box::new(PgFence {
                        inner: self.inner.clone(),
                        client: Some(c),
                        exclusive,
                    }));
                }
                Err(e) => {
                    let e = Failure::Pg(e);
                    if broken(&e) && !tried {
                        tried = true;
                        continue;
                    }
                    return Err(failure(e));
                }
            }
        }
    }
}
