//! [`RedbMetadata`]: the single-machine [`Metadata`], an embedded redb file.
//!
//! Keys join parts with `\0`, which no validated name, tag or digest contains and
//! which sorts before every character they may contain, so `"<repo>\0"..="<repo>\x01"`
//! is exactly one repository's range and tags come out in lexical order. redb
//! has one writer at a time, so every write transaction (GC's included) is
//! serialised with every other.

use std::path::Path;

use redb::{ReadableTable, TableDefinition};
use slipway_core::{Digest, RepoName, Tag};

use crate::error::{Result, db};
use crate::meta::ReferrerDescriptor;
use crate::metadata::{
    Fence, GcChanges, GcPlanner, GcSnapshot, ManifestRecord, Metadata, NewManifest, TagCheck,
    TagRow, check_references, from_json, parse_digest, to_json,
};

/// repo -> created (ms)
const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// digest -> (size, created ms): every committed blob, manifests included.
const BLOBS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blobs");
/// repo\0digest -> linked (ms)
const REPO_BLOBS: TableDefinition<&str, u64> = TableDefinition::new("repo_blobs");
/// repo\0digest -> JSON [`ManifestRecord`]
const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// repo\0tag -> digest
const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// `repo\0tag` → when the tag last pointed at a new manifest (ms), for retention.
const TAG_TIMES: TableDefinition<&str, u64> = TableDefinition::new("tag_times");
/// repo\0subject\0referrer -> JSON [`ReferrerDescriptor`]
const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");
/// upload uuid -> JSON upload record
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");

fn key(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

fn prefix_range(prefix: &str) -> (String, String) {
    (format!("{prefix}\0"), format!("{prefix}\x01"))
}

/// Returns a page of sorted keys after `last`, at most `n`.
fn page(
    items: impl Iterator<Item = Result<String>>,
    last: Option<&str>,
    n: Option<usize>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in items {
        let item = item?;
        if last.is_some_and(|l| item.as_str() <= l) {
            continue;
        }
        if n.is_some_and(|n| out.len() >= n) {
            break;
        }
        out.push(item);
    }
    Ok(out)
}

/// Records `repo` in the repositories table if it is new.
fn ensure_repo(txn: &redb::WriteTransaction, repo: &RepoName, now: u64) -> Result<()> {
    let mut repos = txn.open_table(REPOS).map_err(db)?;
    if repos.get(repo.as_str()).map_err(db)?.is_none() {
        repos.insert(repo.as_str(), now).map_err(db)?;
    }
    Ok(())
}

/// The metadata of one machine, in `meta.redb` under the data directory.
pub struct RedbMetadata {
    db: redb::Database,
}

impl std::fmt::Debug for RedbMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbMetadata")
    }
}

// === impl RedbMetadata ===

impl RedbMetadata {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let database = redb::Database::create(path).map_err(db)?;
        let txn = database.begin_write().map_err(db)?;
        {
            txn.open_table(REPOS).map_err(db)?;
            txn.open_table(BLOBS).map_err(db)?;
            txn.open_table(REPO_BLOBS).map_err(db)?;
            txn.open_table(MANIFESTS).map_err(db)?;
            txn.open_table(TAGS).map_err(db)?;
            txn.open_table(TAG_TIMES).map_err(db)?;
            txn.open_table(REFERRERS).map_err(db)?;
            txn.open_table(UPLOADS).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(Self { db: database })
    }

    fn snapshot(txn: &redb::WriteTransaction) -> Result<GcSnapshot> {
        let mut snap = GcSnapshot::default();
        for row in txn.open_table(MANIFESTS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if let Some((repo, d)) = k.value().split_once('\0') {
                snap.manifests
                    .insert((repo.to_owned(), d.to_owned()), from_json(v.value())?);
            }
        }
        let times = txn.open_table(TAG_TIMES).map_err(db)?;
        for row in txn.open_table(TAGS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if let Some((repo, tag)) = k.value().split_once('\0') {
                snap.tags.push(TagRow {
                    repo: repo.to_owned(),
                    tag: tag.to_owned(),
                    digest: v.value().to_owned(),
                    pushed_ms: times.get(k.value()).map_err(db)?.map(|t| t.value()),
                });
            }
        }
        for row in txn.open_table(BLOBS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let (size, created) = v.value();
            snap.blobs.push((k.value().to_owned(), size, created));
        }
        for row in txn.open_table(REPO_BLOBS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if let Some((repo, d)) = k.value().split_once('\0') {
                snap.links.push((repo.to_owned(), d.to_owned(), v.value()));
            }
        }
        for row in txn.open_table(REPOS).map_err(db)?.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            snap.repos.push((k.value().to_owned(), v.value()));
        }
        Ok(snap)
    }

    fn apply(txn: &redb::WriteTransaction, c: &GcChanges) -> Result<()> {
        let mut tags = txn.open_table(TAGS).map_err(db)?;
        let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
        for (repo, tag) in &c.tags {
            tags.remove(key(repo, tag).as_str()).map_err(db)?;
            times.remove(key(repo, tag).as_str()).map_err(db)?;
        }
        let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
        let mut refs = txn.open_table(REFERRERS).map_err(db)?;
        for (repo, d, subject) in &c.manifests {
            manifests.remove(key(repo, d).as_str()).map_err(db)?;
            if let Some(s) = subject {
                refs.remove(format!("{repo}\0{s}\0{d}").as_str())
                    .map_err(db)?;
            }
        }
        let mut blobs = txn.open_table(BLOBS).map_err(db)?;
        for d in &c.blobs {
            blobs.remove(d.as_str()).map_err(db)?;
        }
        let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
        for (repo, d) in &c.links {
            links.remove(key(repo, d).as_str()).map_err(db)?;
        }
        let mut repos = txn.open_table(REPOS).map_err(db)?;
        for r in &c.repos {
            repos.remove(r.as_str()).map_err(db)?;
        }
        Ok(())
    }
}

impl Metadata for RedbMetadata {
    fn total_blob_bytes(&self) -> Result<u64> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(BLOBS).map_err(db)?;
        let mut sum = 0u64;
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            sum = sum.saturating_add(v.value().0);
        }
        Ok(sum)
    }

    fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let r = self.db.begin_read().map_err(db)?;
        let links = r.open_table(REPO_BLOBS).map_err(db)?;
        if links
            .get(key(repo.as_str(), &digest.to_string()).as_str())
            .map_err(db)?
            .is_none()
        {
            return Ok(None);
        }
        let blobs = r.open_table(BLOBS).map_err(db)?;
        Ok(blobs
            .get(digest.to_string().as_str())
            .map_err(db)?
            .map(|v| v.value().0))
    }

    fn mount(&self, from: &RepoName, to: &RepoName, digest: &Digest, now: u64) -> Result<bool> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            if links
                .get(key(from.as_str(), &d).as_str())
                .map_err(db)?
                .is_none()
            {
                return Ok(false);
            }
            links
                .insert(key(to.as_str(), &d).as_str(), now)
                .map_err(db)?;
            ensure_repo(&txn, to, now)?;
        }
        txn.commit().map_err(db)?;
        Ok(true)
    }

    fn unlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let txn = self.db.begin_write().map_err(db)?;
        let removed = txn
            .open_table(REPO_BLOBS)
            .map_err(db)?
            .remove(key(repo.as_str(), &digest.to_string()).as_str())
            .map_err(db)?
            .is_some();
        txn.commit().map_err(db)?;
        Ok(removed)
    }

    fn record_blob(&self, repo: &RepoName, digest: &Digest, size: u64, now: u64) -> Result<u64> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        let mut added = 0;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            if blobs.get(d.as_str()).map_err(db)?.is_none() {
                blobs.insert(d.as_str(), (size, now)).map_err(db)?;
                added = size;
            }
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            links
                .insert(key(repo.as_str(), &d).as_str(), now)
                .map_err(db)?;
            ensure_repo(&txn, repo, now)?;
        }
        txn.commit().map_err(db)?;
        Ok(added)
    }

    fn put_manifest(&self, m: &NewManifest<'_>, check: TagCheck<'_>) -> Result<u64> {
        let repo = m.repo.as_str();
        let d = m.digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        let mut added = 0;
        {
            let links = txn.open_table(REPO_BLOBS).map_err(db)?;
            let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
            if m.check_refs {
                check_references(&m.record.parsed, |b, is_manifest| {
                    let k = key(repo, &b.to_string());
                    Ok(if is_manifest {
                        manifests.get(k.as_str()).map_err(db)?.is_some()
                    } else {
                        links.get(k.as_str()).map_err(db)?.is_some()
                    })
                })?;
            }
            drop(links);
            manifests
                .insert(key(repo, &d).as_str(), to_json(m.record)?.as_slice())
                .map_err(db)?;
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            if blobs.get(d.as_str()).map_err(db)?.is_none() {
                blobs
                    .insert(d.as_str(), (m.record.size, m.now))
                    .map_err(db)?;
                added = m.record.size;
            }
            if let Some(tag) = m.tag {
                let mut tags = txn.open_table(TAGS).map_err(db)?;
                let k = key(repo, tag.as_str());
                let old = tags.get(k.as_str()).map_err(db)?.map(|v| v.value() != d);
                if old == Some(true) {
                    check(tag.as_str())?;
                }
                tags.insert(k.as_str(), d.as_str()).map_err(db)?;
                if old != Some(false) {
                    let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
                    times.insert(k.as_str(), m.now).map_err(db)?;
                }
            }
            if let (Some(desc), Some(subject)) = (&m.referrer, &m.record.parsed.subject) {
                let mut refs = txn.open_table(REFERRERS).map_err(db)?;
                refs.insert(
                    format!("{repo}\0{subject}\0{d}").as_str(),
                    to_json(desc)?.as_slice(),
                )
                .map_err(db)?;
            }
            ensure_repo(&txn, m.repo, m.now)?;
        }
        txn.commit().map_err(db)?;
        Ok(added)
    }

    fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let r = self.db.begin_read().map_err(db)?;
        let tags = r.open_table(TAGS).map_err(db)?;
        tags.get(key(repo.as_str(), tag.as_str()).as_str())
            .map_err(db)?
            .map(|v| parse_digest(v.value()))
            .transpose()
    }

    fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>> {
        let r = self.db.begin_read().map_err(db)?;
        let manifests = r.open_table(MANIFESTS).map_err(db)?;
        manifests
            .get(key(repo.as_str(), &digest.to_string()).as_str())
            .map_err(db)?
            .map(|v| from_json(v.value()))
            .transpose()
    }

    fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        check: TagCheck<'_>,
    ) -> Result<Option<(ManifestRecord, Vec<String>)>> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        let mut removed = Vec::new();
        let rec: ManifestRecord;
        {
            let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
            let Some(v) = manifests
                .remove(key(repo.as_str(), &d).as_str())
                .map_err(db)?
            else {
                return Ok(None);
            };
            rec = from_json(v.value())?;
            drop(v);
            let mut tags = txn.open_table(TAGS).map_err(db)?;
            let (lo, hi) = prefix_range(repo.as_str());
            for row in tags.range(lo.as_str()..hi.as_str()).map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if v.value() == d
                    && let Some((_, t)) = k.value().split_once('\0')
                {
                    removed.push(t.to_owned());
                }
            }
            for t in &removed {
                check(t)?;
            }
            let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
            for t in &removed {
                tags.remove(key(repo.as_str(), t).as_str()).map_err(db)?;
                times.remove(key(repo.as_str(), t).as_str()).map_err(db)?;
            }
            if let Some(subject) = &rec.parsed.subject {
                let mut refs = txn.open_table(REFERRERS).map_err(db)?;
                refs.remove(format!("{repo}\0{subject}\0{d}").as_str())
                    .map_err(db)?;
            }
        }
        txn.commit().map_err(db)?;
        Ok(Some((rec, removed)))
    }

    fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let txn = self.db.begin_write().map_err(db)?;
        let k = key(repo.as_str(), tag.as_str());
        let digest = {
            let mut tags = txn.open_table(TAGS).map_err(db)?;
            let Some(v) = tags.remove(k.as_str()).map_err(db)? else {
                return Ok(None);
            };
            parse_digest(v.value())?
        };
        txn.open_table(TAG_TIMES)
            .map_err(db)?
            .remove(k.as_str())
            .map_err(db)?;
        txn.commit().map_err(db)?;
        Ok(Some(digest))
    }

    fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Option<Vec<String>>> {
        let r = self.db.begin_read().map_err(db)?;
        let repos = r.open_table(REPOS).map_err(db)?;
        if repos.get(repo.as_str()).map_err(db)?.is_none() {
            return Ok(None);
        }
        let tags = r.open_table(TAGS).map_err(db)?;
        let (lo, hi) = prefix_range(repo.as_str());
        let start = match last {
            Some(l) => key(repo.as_str(), l),
            None => lo,
        };
        let iter = tags
            .range(start.as_str()..hi.as_str())
            .map_err(db)?
            .map(|row| {
                let (k, _) = row.map_err(db)?;
                Ok(k.value()
                    .split_once('\0')
                    .map(|(_, t)| t.to_owned())
                    .unwrap_or_default())
            });
        page(iter, last, n).map(Some)
    }

    fn repos(&self, last: Option<&str>, n: Option<usize>) -> Result<Vec<String>> {
        let r = self.db.begin_read().map_err(db)?;
        let repos = r.open_table(REPOS).map_err(db)?;
        let iter = match last {
            Some(l) => repos.range(l..).map_err(db)?,
            None => repos.range::<&str>(..).map_err(db)?,
        }
        .map(|row| Ok(row.map_err(db)?.0.value().to_owned()));
        page(iter, last, n)
    }

    fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<ReferrerDescriptor>> {
        let r = self.db.begin_read().map_err(db)?;
        let refs = r.open_table(REFERRERS).map_err(db)?;
        let (lo, hi) = prefix_range(&key(repo.as_str(), &subject.to_string()));
        let mut out = Vec::new();
        for row in refs.range(lo.as_str()..hi.as_str()).map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    fn insert_upload(&self, id: &str, record: &[u8]) -> Result<()> {
        let txn = self.db.begin_write().map_err(db)?;
        txn.open_table(UPLOADS)
            .map_err(db)?
            .insert(id, record)
            .map_err(db)?;
        txn.commit().map_err(db)
    }

    fn upload(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(UPLOADS).map_err(db)?;
        Ok(t.get(id).map_err(db)?.map(|v| v.value().to_vec()))
    }

    fn swap_upload(&self, id: &str, expected: &[u8], new: &[u8]) -> Result<bool> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut t = txn.open_table(UPLOADS).map_err(db)?;
            let same = t
                .get(id)
                .map_err(db)?
                .is_some_and(|v| v.value() == expected);
            if !same {
                return Ok(false);
            }
            t.insert(id, new).map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(true)
    }

    fn remove_upload(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(db)?;
        txn.open_table(UPLOADS)
            .map_err(db)?
            .remove(id)
            .map_err(db)?;
        txn.commit().map_err(db)
    }

    fn uploads(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(UPLOADS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn gc(&self, plan: GcPlanner<'_>, dry_run: bool) -> Result<GcChanges> {
        let txn = self.db.begin_write().map_err(db)?;
        let snap = Self::snapshot(&txn)?;
        let changes = plan(&snap)?;
        if dry_run {
            txn.abort().map_err(db)?;
            return Ok(changes);
        }
        Self::apply(&txn, &changes)?;
        txn.commit().map_err(db)?;
        Ok(changes)
    }

    fn fence(&self, _exclusive: bool) -> Result<Box<dyn Fence>> {
        Ok(Box::new(()))
    }
}
