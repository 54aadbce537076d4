#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

//! One module per command group.

pub mod auth;
pub mod containers;
pub mod image;
pub mod nodes;
pub mod services;
pub mod tls;

use slipway_api::Client;

use crate::output::{self, Format};

/// `slipway gc [--dry-run]`.
pub async fn gc(client: &Client, dry_run: bool, format: Format) -> anyhow::Result<()> {
    let report = client.gc(dry_run).await?;
    if format == Format::Json {
        return output::json(&report);
    }
    let verb = if dry_run { "would free" } else { "freed" };
    for (repo, tag, digest) in &report.tags {
        println!("tag {repo}:{tag} ({digest}), by retention");
    }
    for (repo, digest) in &report.manifests {
        println!("manifest {repo}@{digest}");
    }
    for (digest, size) in &report.blobs {
        println!("blob {digest} ({size} bytes)");
    }
    for (digest, size) in &report.snapshots {
        println!("snapshot {digest} ({size} bytes)");
    }
    println!(
        "registry: {verb} {} bytes: {} blobs, {} untagged manifests, {} tags by retention",
        report.bytes_freed,
        report.blobs.len(),
        report.manifests.len(),
        report.tags.len()
    );
    println!(
        "runtime: {verb} {} bytes: {} unused layer snapshots",
        report.runtime_bytes_freed,
        report.snapshots.len()
    );
    Ok(())
}
