//! `slipway service …` (and the short forms `deploy`, `status`, `history`,
//! `rollback`, `scale`): every mutation is accepted by the server at once and then
//! followed through the event stream until its outcome.

#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

use std::path::PathBuf;

use anyhow::Context as _;
use slipway_api::Client;
use slipway_api::client::LogQuery;
use slipway_api::services::{CommandAccepted, Outcome, ServiceSpec, ServiceStatus};

use crate::exit::Exit;
use crate::output::{self, Format};

/// `deploy FILE`.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// The service spec (TOML).
    pub file: PathBuf,
    /// Return once the server accepted it, without following the rollout.
    #[arg(long, short = 'd')]
    pub detach: bool,
}

/// `rollback SERVICE [--to N]`.
#[derive(clap::Args)]
pub struct RollbackArgs {
    /// Service name.
    pub service: String,
    /// Revision number (default: the one before the active revision).
    #[arg(long)]
    pub to: Option<u64>,
    /// Return once accepted.
    #[arg(long, short = 'd')]
    pub detach: bool,
}

/// `scale SERVICE N`.
#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Service name.
    pub service: String,
    /// Instances (1-100).
    pub replicas: u32,
    /// Return once accepted.
    #[arg(long, short = 'd')]
    pub detach: bool,
}

/// `status [SERVICE]`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// One service (default: all).
    pub service: Option<String>,
}

/// `history SERVICE`.
#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Service name.
    pub service: String,
}

/// `service …`.
#[derive(clap::Subcommand)]
pub enum ServiceCommand {
    /// Create or update a service from a TOML spec and follow the rollout.
    Deploy(DeployArgs),
    /// List services.
    Ls,
    /// Show a service (or all): revisions, instances, weights, traffic.
    Status(StatusArgs),
    /// List a service's revisions.
    History(HistoryArgs),
    /// Go back to the previous (or a given) revision.
    Rollback(RollbackArgs),
    /// Change the number of instances without downtime.
    Scale(ScaleArgs),
    /// Hold rollouts at their next step until `resume`.
    Pause {
        /// Service name.
        service: String,
    },
    /// Let held rollouts go on.
    Resume {
        /// Service name.
        service: String,
    },
    /// Skip a rollout's remaining steps and holds: the new revision takes all traffic.
    Promote {
        /// Service name.
        service: String,
    },
    /// Roll the rollout in progress back now.
    Abort {
        /// Service name.
        service: String,
    },
    /// Remove a service: abort what runs, stop every instance, close the ingress.
    Rm {
        /// Service name.
        service: String,
        /// Return once accepted.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// A service's logs: every instance, each line prefixed with it.
    Logs {
        /// Service name.
        service: String,
        /// Keep following, as instances come and go.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this revision's instances.
        #[arg(long)]
        revision: Option<u64>,
        /// Only instances running within this long (e.g. 10m).
        #[arg(long)]
        since: Option<String>,
        /// Only the last N lines of each instance.
        #[arg(long)]
        tail: Option<usize>,
    },
}

/// Runs a `service` command.
pub async fn run(client: &Client, c: ServiceCommand, format: Format) -> anyhow::Result<Exit> {
    match c {
        ServiceCommand::Deploy(a) => deploy(client, &a, format).await,
        ServiceCommand::Ls => ls(client, format).await.map(|()| Exit::Ok),
        ServiceCommand::Status(a) => status(client, a.service.as_deref(), format)
            .await
            .map(|()| Exit::Ok),
        ServiceCommand::History(a) => history(client, &a.service, format).await.map(|()| Exit::Ok),
        ServiceCommand::Rollback(a) => {
            let acc = client.rollback(&a.service, a.to).await?;
            follow(client, &acc, a.detach, format).await
        }
        ServiceCommand::Scale(a) => {
            let acc = client.scale(&a.service, a.replicas).await?;
            follow(client, &acc, a.detach, format).await
        }
        ServiceCommand::Pause { service } => control(client, &service, "pause", format).await,
        ServiceCommand::Resume { service } => control(client, &service, "resume", format).await,
        ServiceCommand::Promote { service } => control(client, &service, "promote", format).await,
        ServiceCommand::Abort { service } => control(client, &service, "abort", format).await,
        ServiceCommand::Rm { service, detach } => {
            let acc = client.remove_service(&service).await?;
            follow(client, &acc, detach, format).await
        }
        ServiceCommand::Logs {
            service,
            follow,
            revision,
            since,
            tail,
        } => {
            let since = since
                .map(|s| {
                    slipway_core::parse_duration(&s).map_err(|e| {
                        anyhow::Error::new(slipway_api::ClientError::Config(format!(
                            "--since: {e}"
                        )))
                    })
                })
                .transpose()?;
            let q = LogQuery {
                follow,
                revision,
                tail,
                since,
            };
            let mut stream = client.service_logs(&service, &q).await?;
            copy_out(&mut stream).await.map(|()| Exit::Ok)
        }
    }
}

/// Streams a body to stdout.
pub async fn copy_out(stream: &mut slipway_api::client::ByteStream) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    Ok(())
}

async fn deploy(client: &Client, a: &DeployArgs, format: Format) -> anyhow::Result<Exit> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    // Validated here first, for a message with the file, line and column.
    let spec = ServiceSpec::from_toml(&text)
        .map_err(|e| anyhow::Error::new(e).context(format!("{}", a.file.display())))?;
    let acc = client.deploy(&spec).await?;
    if format == Format::Text {
        match (acc.revision, acc.queued, acc.unchanged) {
            (Some(r), _, true) => {
                println!("service {} revision {r} is live (unchanged)", acc.service)
            }
            (Some(r), _, false) => println!("service {} revision {r} deploying", acc.service),
            (None, true, _) => println!(
                "service {}: deploy queued behind the operation in progress",
                acc.service
            ),
            (None, _, _) => println!("service {}: deploy accepted", acc.service),
        }
    }
    follow(client, &acc, a.detach, format).await
}

/// Follows an accepted command to its outcome, printing its events.
async fn follow(
    client: &Client,
    acc: &CommandAccepted,
    detach: bool,
    format: Format,
) -> anyhow::Result<Exit> {
    if detach {
        if format == Format::Json {
            output::json(acc)?;
        } else {
            println!("{}: accepted ({})", acc.service, acc.command);
        }
        return Ok(Exit::Ok);
    }
    let text = format == Format::Text;
    let outcome = client
        .follow(acc, |e| {
            if text && e.outcome.is_none() {
                println!("  {}", e.message);
            }
        })
        .await?;
    let Some(outcome) = outcome else {
        return Err(anyhow::Error::new(slipway_api::ClientError::Connect {
            server: client.base().to_owned(),
            message: format!(
                "the event stream ended before command {} finished; see `slipway service status {}`",
                acc.command, acc.service
            ),
        }));
    };
    if text {
        let subject = acc
            .revision
            .map_or_else(|| acc.service.clone(), |r| format!("revision {r}"));
        match &outcome {
            Outcome::Done => println!("{subject}: done"),
            Outcome::RolledBack(m) => println!("{subject} was rolled back: {m}"),
            Outcome::Failed(m) => println!("{subject} failed: {m}"),
            Outcome::Rejected(m) => println!("{subject} was rejected: {m}"),
        }
    } else {
        output::json(&serde_json::json!({"accepted": acc, "result": outcome}))?;
    }
    Ok(Exit::of_outcome(&outcome))
}

async fn control(client: &Client, name: &str, verb: &str, format: Format) -> anyhow::Result<Exit> {
    let acc = client.control(name, verb).await?;
    if format == Format::Json {
        output::json(&acc)?;
    } else {
        println!("{name}: {verb}");
    }
    Ok(Exit::Ok)
}

fn print_status(s: &ServiceStatus) {
    println!(
        "{}  {}  ingress {}  active revision {}  replicas {}",
        s.name,
        s.image,
        s.ingress,
        s.active.map_or("-".into(), |a| a.to_string()),
        s.replicas
    );
    println!(
        "  phase: {}{}  {}",
        s.phase.as_str(),
        if s.paused { " (paused)" } else { "" },
        s.message
    );
    let weights: Vec<String> = s.weights.iter().map(|(r, w)| format!("r{r}={w}")).collect();
    println!("  weights: {}", weights.join(" "));
    for i in &s.instances {
        println!("  instance {} revision {} {}", i.id, i.revision, i.addr);
    }
    for i in &s.stopping {
        println!("  stopping {} revision {} {}", i.id, i.revision, i.addr);
    }
    if let Some(r) = s.revisions.last().filter(|r| {
        matches!(
            r.status,
            slipway_api::services::RevisionStatus::Rejected
                | slipway_api::services::RevisionStatus::RolledBack
                | slipway_api::services::RevisionStatus::Failed
        )
    }) {
        println!(
            "  last revision {} {}: {}",
            r.number,
            r.status.as_str(),
            r.message.as_deref().unwrap_or("")
        );
    }
    for t in &s.traffic {
        println!(
            "  traffic r{}: {} requests, {} errors, p99 ≤ {} ms",
            t.revision, t.requests, t.errors, t.p99_ms
        );
    }
}

async fn status(client: &Client, name: Option<&str>, format: Format) -> anyhow::Result<()> {
    match name {
        Some(n) => {
            let s = client.service(n).await?;
            if format == Format::Json {
                return output::json(&s);
            }
            print_status(&s);
        }
        None => {
            let all = client.services().await?;
            if format == Format::Json {
                return output::json(&all);
            }
            for s in &all {
                print_status(s);
            }
        }
    }
    Ok(())
}

async fn ls(client: &Client, format: Format) -> anyhow::Result<()> {
    let all = client.services().await?;
    if format == Format::Json {
        return output::json(&all);
    }
    println!(
        "{:<20} {:<22} {:>7} {:>9}  PHASE",
        "NAME", "INGRESS", "ACTIVE", "INSTANCES"
    );
    for s in all {
        println!(
            "{:<20} {:<22} {:>7} {:>9}  {}",
            s.name,
            s.ingress.to_string(),
            s.active.map_or("-".into(), |a| a.to_string()),
            s.instances.len(),
            s.phase.as_str()
        );
    }
    Ok(())
}

async fn history(client: &Client, name: &str, format: Format) -> anyhow::Result<()> {
    let s = client.service(name).await?;
    if format == Format::Json {
        return output::json(&s.revisions);
    }
    let now = slipway_core::now_ms();
    println!(
        "{:>8}  {:<12} {:>8}  {:<50} NOTE",
        "REVISION", "STATUS", "AGE", "IMAGE"
    );
    for r in &s.revisions {
        println!(
            "{:>8}  {:<12} {:>8}  {:<50} {}",
            r.number,
            r.status.as_str(),
            output::short_duration(now.saturating_sub(r.created_ms)),
            r.image,
            r.message.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `slipway events [-f] [--service NAME]`.
pub async fn events(
    client: &Client,
    service: Option<&str>,
    follow: bool,
    format: Format,
) -> anyhow::Result<()> {
    let mut stream = client.events(service, follow).await?;
    while let Some(e) = stream.next().await {
        let e = e?;
        if format == Format::Json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let rev = e.revision.map(|r| format!(" r{r}")).unwrap_or_default();
            println!("{} {}{rev}: {}", e.at_ms, e.service, e.message);
        }
    }
    Ok(())
}
