//! Online garbage collection: mark from manifests, sweep unreferenced blobs.
//!
//! Marking and the metadata sweep happen in one transaction of the
//! [`Metadata`](crate::Metadata), so concurrent pushes either commit before (and
//! are seen) or after (and re-check their references). What goes is decided here,
//! by [`plan`], from a snapshot: the same rules whatever holds the rows. Blobs
//! are deleted after the commit while the fence is held exclusively (the blob
//! lock in this process, and the metadata's fence across replicas), so an upload
//! that re-commits the same digest cannot lose its object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use slipway_core::Digest;

use crate::error::Result;
use crate::metadata::{GcChanges, GcSnapshot, ManifestRecord, parse_digest};
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

/// What GC removes from `snap`, and the report of it.
fn plan(
    snap: &GcSnapshot,
    opts: &GcOptions,
    cutoff: u64,
    touched: &HashSet<Digest>,
    is_immutable: &dyn Fn(&slipway_core::RepoName, &str) -> bool,
    report: &mut GcReport,
) -> Result<GcChanges> {
    let mut changes = GcChanges::default();
    let mut all: HashMap<(String, String), ManifestRecord> = snap.manifests.clone();

    // Retention first: the manifests it leaves untagged go below.
    let mut removed_tags: HashSet<(String, String)> = HashSet::new();
    let mut orphans: HashSet<(String, String)> = HashSet::new();
    if !opts.retention.is_empty() {
        let mut by_repo: BTreeMap<&str, Vec<&crate::metadata::TagRow>> = BTreeMap::new();
        for t in &snap.tags {
            by_repo.entry(t.repo.as_str()).or_default().push(t);
        }
        for (repo, list) in by_repo {
            let Some(rule) = opts
                .retention
                .iter()
                .find(|r| slipway_core::glob::matches(&r.repository, repo))
            else {
                continue;
            };
            let Ok(repo_name) = repo.parse::<slipway_core::RepoName>() else {
                continue;
            };
            let mut ranked = Vec::new();
            for t in list {
                let kept = rule
                    .keep_tags
                    .as_deref()
                    .is_some_and(|g| slipway_core::glob::matches(g, &t.tag))
                    || is_immutable(&repo_name, &t.tag);
                let version = slipway_core::tag_version(&t.tag);
                if kept || (rule.order == RetentionOrder::Semver && version.is_none()) {
                    continue;
                }
                let pushed = t.pushed_ms.unwrap_or_else(|| {
                    all.get(&(repo.to_owned(), t.digest.clone()))
                        .map_or(0, |r| r.created_ms)
                });
                ranked.push((t, pushed, version));
            }
            match rule.order {
                RetentionOrder::Pushed => {
                    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.tag.cmp(&a.0.tag)));
                }
                RetentionOrder::Semver => ranked.sort_by(|a, b| b.2.cmp(&a.2)),
            }
            for (t, _, _) in ranked.into_iter().skip(rule.keep_last) {
                let d = parse_digest(&t.digest)?;
                if opts.protected.contains(&d) {
                    continue;
                }
                changes.tags.push((t.repo.clone(), t.tag.clone()));
                removed_tags.insert((t.repo.clone(), t.tag.clone()));
                orphans.insert((t.repo.clone(), t.digest.clone()));
                report.tags.push((t.repo.clone(), t.tag.clone(), d));
            }
        }
    }

    if opts.delete_untagged || !orphans.is_empty() {
        let tagged: HashSet<(String, String)> = snap
            .tags
            .iter()
            .filter(|t| !removed_tags.contains(&(t.repo.clone(), t.tag.clone())))
            .map(|t| (t.repo.clone(), t.digest.clone()))
            .collect();
        // Removing an untagged index can orphan its children: repeat until stable.
        loop {
            let mut kept_by_others = HashSet::new();
            for ((repo, d), rec) in &all {
                for child in &rec.parsed.manifests {
                    kept_by_others.insert((repo.clone(), child.to_string()));
                }
                if let Some(s) = &rec.parsed.subject {
                    // A referrer lives as long as its subject does.
                    if all.contains_key(&(repo.clone(), s.to_string())) {
                        kept_by_others.insert((repo.clone(), d.clone()));
                    }
                }
            }
            let doomed: Vec<(String, String)> = all
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
                let subject = all
                    .remove(&k)
                    .and_then(|r| r.parsed.subject)
                    .map(|s| s.to_string());
                report.manifests.push((k.0.clone(), parse_digest(&k.1)?));
                changes.manifests.push((k.0, k.1, subject));
            }
        }
    }

    // Mark.
    let mut live: HashSet<String> = HashSet::new();
    for ((_, d), rec) in &all {
        live.insert(d.clone());
        for b in rec.parsed.blobs.iter().chain(&rec.parsed.manifests) {
            live.insert(b.to_string());
        }
    }

    // Sweep. A blob linked or looked up within the grace period stays too.
    let recent: HashSet<&str> = snap
        .links
        .iter()
        .filter(|l| l.2 > cutoff)
        .map(|l| l.1.as_str())
        .collect();
    let mut doomed = Vec::new();
    for (d, size, created) in &snap.blobs {
        if live.contains(d) || *created > cutoff || recent.contains(d.as_str()) {
            continue;
        }
        let digest = parse_digest(d)?;
        if touched.contains(&digest) {
            continue;
        }
        doomed.push((digest, *size));
    }
    let doomed_set: HashSet<String> = doomed.iter().map(|(d, _)| d.to_string()).collect();
    let mut linked_repos: HashSet<&str> = HashSet::new();
    for (repo, d, _) in &snap.links {
        if doomed_set.contains(d) {
            changes.links.push((repo.clone(), d.clone()));
        } else {
            linked_repos.insert(repo);
        }
    }
    // Forget repositories left with nothing in them.
    for (repo, _) in all.keys() {
        linked_repos.insert(repo);
    }
    for (repo, created) in &snap.repos {
        if !linked_repos.contains(repo.as_str()) && *created <= cutoff {
            changes.repos.push(repo.clone());
        }
    }
    changes.blobs = doomed_set.into_iter().collect();
    report.bytes_freed = doomed.iter().map(|(_, s)| s).sum();
    report.blobs = doomed;
    Ok(changes)
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
        let _fence = self.meta.fence(true)?;
        let is_immutable =
            |r: &slipway_core::RepoName, t: &str| self.immutable_rule(r, t).is_some();
        self.meta.gc(
            &mut |snap| {
                report = GcReport {
                    dry_run: opts.dry_run,
                    ..GcReport::default()
                };
                plan(snap, opts, cutoff, &touched, &is_immutable, &mut report)
            },
            opts.dry_run,
        )?;
        if opts.dry_run {
            return Ok(report);
        }
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
