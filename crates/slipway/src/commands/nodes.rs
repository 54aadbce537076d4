#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

//! `slipway node ls|drain|cordon|uncordon|rm`.

use std::time::Duration;

use clap::Subcommand;
use slipway_api::Client;

use crate::output::{self, Format};

/// The nodes instances run on.
#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes: status, capacity, what their instances ask for, heartbeat age.
    Ls,
    /// Take no new instances on a node (those running stay).
    Cordon {
        /// Node name.
        name: String,
    },
    /// Move a node's instances elsewhere (each replacement ready before the
    /// old one stops) and cordon it; waits until none is left.
    Drain {
        /// Node name.
        name: String,
        /// Give up waiting after this long (the move goes on).
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Take new instances on a node again.
    Uncordon {
        /// Node name.
        name: String,
    },
    /// Forget a node that is down.
    Rm {
        /// Node name.
        name: String,
    },
}

fn gib(bytes: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a display figure")]
    let g = bytes as f64 / f64::from(1u32 << 30);
    format!("{g:.1}Gi")
}

/// Runs a `node` command.
pub async fn run(client: &Client, c: NodeCommand, format: Format) -> anyhow::Result<()> {
    match c {
        NodeCommand::Ls => {
            let list = client.nodes().await?;
            if format == Format::Json {
                return output::json(&list);
            }
            println!(
                "{:<20} {:<9} {:<16} {:>11} {:>15} {:>9} {:>10}  LABELS",
                "NAME", "STATUS", "ADDRESS", "CPU", "MEMORY", "INSTANCES", "HEARTBEAT"
            );
            for n in list {
                let labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let name = if n.this {
                    format!("{} *", n.name)
                } else {
                    n.name
                };
                println!(
                    "{:<20} {:<9} {:<16} {:>11} {:>15} {:>9} {:>10}  {}",
                    name,
                    n.status.as_str(),
                    n.address,
                    format!("{:.2}/{}", n.allocated_cpus, n.cpus),
                    format!("{}/{}", gib(n.allocated_memory_bytes), gib(n.memory_bytes)),
                    n.instances,
                    format!(
                        "{:.1}s",
                        Duration::from_millis(n.heartbeat_age_ms).as_secs_f64()
                    ),
                    labels.join(",")
                );
            }
        }
        NodeCommand::Cordon { name } => {
            let n = client.cordon(&name, true).await?;
            println!("node {} cordoned: it takes no new instances", n.name);
        }
        NodeCommand::Drain { name, timeout } => {
            let timeout = slipway_core::parse_duration(&timeout)
                .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
            let n = client.drain(&name).await?;
            println!(
                "node {} cordoned; moving its {} instance(s) elsewhere",
                n.name, n.instances
            );
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let left = client
                    .nodes()
                    .await?
                    .into_iter()
                    .find(|x| x.name == name)
                    .map_or(0, |x| x.instances);
                if left == 0 {
                    println!("node {name} drained");
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "node {name} still has {left} instance(s) after {timeout:?}; see `slipway events`"
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        NodeCommand::Uncordon { name } => {
            let n = client.cordon(&name, false).await?;
            println!("node {} uncordoned ({})", n.name, n.status.as_str());
        }
        NodeCommand::Rm { name } => {
            client.remove_node(&name).await?;
            println!("removed node {name}");
        }
    }
    Ok(())
}
