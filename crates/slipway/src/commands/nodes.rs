#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

//! `slipway node ls|cordon|uncordon|rm`.

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
