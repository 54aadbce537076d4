//! Online garbage collection: mark from manifests, sweep unreferenced blobs.
//!
//! Marking and the metadata sweep happen in one write transaction, so concurrent
//! pushes either commit before (and are seen) or after (and re-check their
//! references). Files are unlinked after commit while holding the blob lock for
//! writing, so an upload that re-commits the same digest cannot lose its file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use redb::ReadableTable;
use slipway_core::Digest;

use crate::error::{Result, StoreError, db};
use crate::meta::{
    BLOBS, MANIFESTS, ManifestRecord, REFERRERS, REPO_BLOBS, REPOS, TAG_TIMES, TAGS, from_json,
};
use crate::{Store, lock, now_ms};

/// What a GC run does.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Report what would go, change nothing.
    pub dry_run: bool,
    /// Also remove manifests that no tag, index or live subject keeps.
    pub delete_untagged: bool,
    /// Anything created or looked up more recently than this is kept.
    pub grace: Duration,
    /// Which tags of which repositories to keep; the others go, with the
    /// manifests they leave untagged.
    pub retention: Vec<RetentionRule>,
    /// Manifests that something runs (services' live and recent revisions):
    /// retention never removes a tag that points at one.
    pub protected: HashSet<Digest>,
}

/// Keep the newest `keep_last` tags of repositories matching `repository`, by
/// push time or by semver, and every tag matching `keep_tags`. Immutable tags and
/// tags of manifests something runs are always kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Repository glob.
    pub repository: String,
    /// How many tags to keep.
    pub keep_last: usize,
    /// Which are newest.
    #[serde(default)]
    pub order: RetentionOrder,
    /// Tags matching this glob are kept whatever their rank.
    #[serde(default)]
    pub keep_tags: Option<String>,
}

/// How retention ranks tags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionOrder {
    /// The tags pushed last are newest.
    #[default]
    Pushed,
    /// The highest versions are newest; tags that are not semver are kept.
    Semver,
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
    /// Tags retention removed, as (repository, tag, digest).
    pub tags: Vec<(String, String, Digest)>,
    /// Sum of removed blob sizes.
    pub bytes_freed: u64,
}

fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| StoreError::Db(format!("bad digest in database: {e}")))
}

// === impl Store: gc ===

impl Store {
    /// Removes the tags retention does not keep (in `txn`); returns the
    /// manifests (`repo\0digest`) whose tags it removed.
    fn apply_retention(
        &self,
        txn: &redb::WriteTransaction,
        opts: &GcOptions,
        all: &HashMap<String, ManifestRecord>,
        report: &mut GcReport,
    ) -> Result<HashSet<String>> {
        let mut orphans = HashSet::new();
        if opts.retention.is_empty() {
            return Ok(orphans);
        }
        let mut tags = txn.open_table(TAGS).map_err(db)?;
        let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
        // repo -> (tag, digest)
        let mut by_repo: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for row in tags.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if let Some((repo, tag)) = k.value().split_once('\0') {
                by_repo
                    .entry(repo.to_owned())
                    .or_default()
                    .push((tag.to_owned(), v.value().to_owned()));
            }
        }
        for (repo, list) in by_repo {
            let Some(rule) = opts
                .retention
                .iter()
                .find(|r| slipway_core::glob::matches(&r.repository, &repo))
            else {
                continue;
            };
            let Ok(repo_name) = repo.parse::<slipway_core::RepoName>() else {
                continue;
            };
            let mut ranked: Vec<(String, String, u64, Option<semver::Version>)> = Vec::new();
            for (tag, digest) in list {
                let kept = rule
                    .keep_tags
                    .as_deref()
                    .is_some_and(|g| slipway_core::glob::matches(g, &tag))
                    || self.immutable_rule(&repo_name, &tag).is_some();
                let version = slipway_core::tag_version(&tag);
                if kept || (rule.order == RetentionOrder::Semver && version.is_none()) {
                    continue;
                }
                let k = format!("{repo}\0{tag}");
                let pushed = match times.get(k.as_str()).map_err(db)? {
                    Some(t) => t.value(),
                    None => all
                        .get(&format!("{repo}\0{digest}"))
                        .map_or(0, |r| r.created_ms),
                };
                ranked.push((tag, digest, pushed, version));
            }
            match rule.order {
                RetentionOrder::Pushed => {
                    ranked.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| b.0.cmp(&a.0)));
                }
                RetentionOrder::Semver => ranked.sort_by(|a, b| b.3.cmp(&a.3)),
            }
            for (tag, digest, _, _) in ranked.into_iter().skip(rule.keep_last) {
                let d = parse_digest(&digest)?;
                if opts.protected.contains(&d) {
                    continue;
                }
                let k = format!("{repo}\0{tag}");
                tags.remove(k.as_str()).map_err(db)?;
                times.remove(k.as_str()).map_err(db)?;
                orphans.insert(format!("{repo}\0{digest}"));
                report.tags.push((repo.clone(), tag, d));
            }
        }
        Ok(orphans)
    }

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

            // Retention first: the manifests it leaves untagged go below.
            let orphans = self.apply_retention(&txn, opts, &all, &mut report)?;
            if opts.delete_untagged || !orphans.is_empty() {
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
                            (opts.delete_untagged || orphans.contains(*k))
                                && !tagged.contains(*k)
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
