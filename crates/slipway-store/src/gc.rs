//! Online garbage collection: mark from manifests, sweep unreferenced blobs.
//!
//! Marking and the metadata sweep happen in one write transaction, so concurrent
//! pushes either commit before (and are seen) or after (and re-check their
//! references). Files are unlinked after commit while holding the blob lock for
//! writing, so an upload that re-commits the same digest cannot lose its file.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use redb::ReadableTable;
use slipway_core::Digest;

use crate::error::{Result, StoreError, db};
use crate::meta::{
    BLOBS, MANIFESTS, ManifestRecord, REFERRERS, REPO_BLOBS, REPOS, TAGS, from_json,
};
use crate::{Store, lock, now_ms};

/// What a GC run does.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would go, change nothing.
    pub dry_run: bool,
    /// Also remove manifests that no tag, index or live subject keeps.
    pub delete_untagged: bool,
    /// Anything created or looked up more recently than this is kept.
    pub grace: Duration,
}

/// What a GC run freed (or would free, on a dry run).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Blobs removed, with their sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Untagged manifests removed, as (repository, digest).
    pub manifests: Vec<(String, Digest)>,
    /// Sum of removed blob sizes.
    pub bytes_freed: u64,
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| StoreError::Db(format!("bad digest in database: {e}")))
}

// === impl Store: gc ===

impl Store {
    /// Runs one garbage collection.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms().saturating_sub(grace_ms);
        let touched: HashSet<Digest> = {
            let mut t = lock(&self.touched);
            t.retain(|_, at| *at > cutoff);
            t.keys().cloned().collect()
        };
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let _guard = self
            .blob_lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let txn = self.db().begin_write().map_err(db)?;
        {
            let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
            // repo\0digest -> record
            let mut all: HashMap<String, ManifestRecord> = HashMap::new();
            for row in manifests.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                all.insert(k.value().to_owned(), from_json(v.value())?);
            }

            if opts.delete_untagged {
                let tags = txn.open_table(TAGS).map_err(db)?;
                let mut tagged = HashSet::new();
                for row in tags.iter().map_err(db)? {
                    let (k, v) = row.map_err(db)?;
                    let repo = k
                        .value()
                        .split_once('\0')
                        .map(|(r, _)| r.to_owned())
                        .unwrap_or_default();
                    tagged.insert(format!("{repo}\0{}", v.value()));
                }
                // Removing an untagged index can orphan its children: repeat until stable.
                loop {
                    let mut kept_by_others = HashSet::new();
                    for (k, rec) in &all {
                        let repo = k.split_once('\0').map(|(r, _)| r).unwrap_or_default();
                        for child in &rec.parsed.manifests {
                            kept_by_others.insert(format!("{repo}\0{child}"));
                        }
                        if let Some(s) = &rec.parsed.subject {
                            // A referrer lives as long as its subject does.
                            if all.contains_key(&format!("{repo}\0{s}")) {
                                kept_by_others.insert(k.clone());
                            }
                        }
                    }
                    let doomed: Vec<String> = all
                        .iter()
                        .filter(|(k, rec)| {
                            !tagged.contains(*k)
                                && !kept_by_others.contains(*k)
                                && rec.created_ms <= cutoff
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    if doomed.is_empty() {
                        break;
                    }
                    for k in doomed {
                        let rec = all.remove(&k);
                        let (repo, d) = k.split_once('\0').unwrap_or_default();
                        let digest = parse_digest(d)?;
                        report.manifests.push((repo.to_owned(), digest.clone()));
                        manifests.remove(k.as_str()).map_err(db)?;
                        if let Some(s) = rec.and_then(|r| r.parsed.subject) {
                            let mut refs = txn.open_table(REFERRERS).map_err(db)?;
                            refs.remove(format!("{repo}\0{s}\0{d}").as_str())
                                .map_err(db)?;
                        }
                    }
                }
            }

            // Mark.
            let mut live: HashSet<String> = HashSet::new();
            for (k, rec) in &all {
                if let Some((_, d)) = k.split_once('\0') {
                    live.insert(d.to_owned());
                }
                for b in rec.parsed.blobs.iter().chain(&rec.parsed.manifests) {
                    live.insert(b.to_string());
                }
            }

            // Sweep.
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            let mut doomed = Vec::new();
            for row in blobs.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                let (size, created) = v.value();
                if live.contains(k.value()) || created > cutoff {
                    continue;
                }
                let d = parse_digest(k.value())?;
                if touched.contains(&d) {
                    continue;
                }
                doomed.push((d, size));
            }
            let doomed_set: HashSet<String> = doomed.iter().map(|(d, _)| d.to_string()).collect();
            for (d, _) in &doomed {
                blobs.remove(d.to_string().as_str()).map_err(db)?;
            }
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            let mut dead_links = Vec::new();
            let mut linked_repos = HashSet::new();
            for row in links.iter().map_err(db)? {
                let (k, _) = row.map_err(db)?;
                if let Some((repo, d)) = k.value().split_once('\0') {
                    if doomed_set.contains(d) {
                        dead_links.push(k.value().to_owned());
                    } else {
                        linked_repos.insert(repo.to_owned());
                    }
                }
            }
            for k in dead_links {
                links.remove(k.as_str()).map_err(db)?;
            }
            // Forget repositories left with nothing in them.
            for k in all.keys() {
                if let Some((repo, _)) = k.split_once('\0') {
                    linked_repos.insert(repo.to_owned());
                }
            }
            let mut repos = txn.open_table(REPOS).map_err(db)?;
            let mut empty = Vec::new();
            for row in repos.iter().map_err(db)? {
                let (k, created) = row.map_err(db)?;
                if !linked_repos.contains(k.value()) && created.value() <= cutoff {
                    empty.push(k.value().to_owned());
                }
            }
            for r in empty {
                repos.remove(r.as_str()).map_err(db)?;
            }
            report.bytes_freed = doomed.iter().map(|(_, s)| s).sum();
            report.blobs = doomed;
        }
        if opts.dry_run {
            txn.abort().map_err(db)?;
            return Ok(report);
        }
        txn.commit().map_err(db)?;
        for (d, _) in &report.blobs {
            self.forget_cached(d);
            self.blobs.remove(d)?;
        }
        self.stored_bytes.fetch_sub(
            report.bytes_freed.min(self.stored_bytes()),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(report)
    }
}
