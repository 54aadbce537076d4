//! `slipway container …` (and the short forms `run`, `ps`, `stop`, `rm`, `logs`).

#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary owns the terminal"
)]

use std::time::Duration;

use anyhow::Context as _;
use slipway_api::Client;
use slipway_api::containers::{ContainerInfo, RestartPolicy, RunRequest, Status};

use crate::exit::Exit;
use crate::output::{self, Format, short_duration};

/// `stop NAME [-t SECS]`.
#[derive(clap::Args)]
pub struct StopArgs {
    /// Container name.
    pub name: String,
    /// Seconds to wait before SIGKILL (default: the server's runtime.stop_grace).
    #[arg(long, short = 't')]
    pub time: Option<u64>,
}

/// `rm NAME [-f]`.
#[derive(clap::Args)]
pub struct RmArgs {
    /// Container name.
    pub name: String,
    /// Stop it first if it is running.
    #[arg(long, short = 'f')]
    pub force: bool,
}

/// `logs NAME [-f]`.
#[derive(clap::Args)]
pub struct LogsArgs {
    /// Container name.
    pub name: String,
    /// Keep following until the container is done.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `container …`.
#[derive(clap::Subcommand)]
pub enum ContainerCommand {
    /// Run an image as a container.
    Run(Box<RunArgs>),
    /// List containers.
    Ls,
    /// Stop a container: its stop signal, then SIGKILL after the grace period.
    Stop(StopArgs),
    /// Remove a container and everything it left behind (volumes stay).
    Rm(RmArgs),
    /// Print a container's output.
    Logs(LogsArgs),
    /// Show a container's state.
    Inspect {
        /// Container name.
        name: String,
    },
}

/// Runs a `container` command.
pub async fn run(client: &Client, c: ContainerCommand, format: Format) -> anyhow::Result<Exit> {
    match c {
        ContainerCommand::Run(a) => run_container(client, *a, format).await,
        ContainerCommand::Ls => ps(client, format).await.map(|()| Exit::Ok),
        ContainerCommand::Stop(StopArgs { name, time }) => {
            stop(client, &name, time, format).await.map(|()| Exit::Ok)
        }
        ContainerCommand::Rm(RmArgs { name, force }) => {
            rm(client, &name, force).await.map(|()| Exit::Ok)
        }
        ContainerCommand::Logs(LogsArgs { name, follow }) => {
            let mut s = client.logs(&name, follow).await?;
            super::services::copy_out(&mut s).await.map(|()| Exit::Ok)
        }
        ContainerCommand::Inspect { name } => {
            output::json(&client.container(&name).await?).map(|()| Exit::Ok)
        }
    }
}

/// `slipway run` flags.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Image reference, e.g. hello:1.0.0 (from Slipway's registry) or host:port/name:tag.
    pub image: String,
    /// Container name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Port the workload listens on (host network); passed as $PORT.
    #[arg(long, short = 'p')]
    pub port: Option<u16>,
    /// Memory limit, e.g. 64m or 1g.
    #[arg(long, short = 'm')]
    pub memory: Option<String>,
    /// CPU limit, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids: Option<i64>,
    /// Restart policy: no, on-failure or always.
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Named volume NAME:/path (repeatable); kept when the container is removed.
    #[arg(long = "volume", short = 'v')]
    pub volumes: Vec<String>,
    /// Replace the image's entrypoint (one word; the command follows `--`).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// The signal `stop` sends first (default: the image's StopSignal, else SIGTERM).
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Add a capability to Docker's default set (repeatable), e.g. NET_ADMIN.
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from it (repeatable; ALL drops every one).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Run in a user namespace: root inside is an unprivileged host uid.
    #[arg(long)]
    pub userns: bool,
    /// Return once started instead of following the logs.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Command and arguments, replacing the image's CMD.
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn status_word(c: &ContainerInfo) -> String {
    match c.status {
        Status::Exited | Status::Stopped => {
            let code = c.exit_code.map_or("?".to_owned(), |c| c.to_string());
            let oom = if c.oom_killed { ", OOM killed" } else { "" };
            format!(
                "{} ({code}{oom})",
                if c.status == Status::Exited {
                    "exited"
                } else {
                    "stopped"
                }
            )
        }
        Status::Restarting => format!("restarting (backoff {} ms)", c.backoff_ms.unwrap_or(0)),
        Status::Running => "running".to_owned(),
        Status::Created => "created".to_owned(),
    }
}

/// The status with how long it has held, as `ps` shows it: "running 5m",
/// "exited (1) 3s ago".
fn status_with_age(c: &ContainerInfo, now_ms: u64) -> String {
    let word = status_word(c);
    match c.status {
        Status::Running => c.started_at_ms.map_or(word.clone(), |t| {
            format!("{word} {}", short_duration(now_ms.saturating_sub(t)))
        }),
        Status::Exited | Status::Stopped => c.finished_at_ms.map_or(word.clone(), |t| {
            format!("{word} {} ago", short_duration(now_ms.saturating_sub(t)))
        }),
        Status::Restarting | Status::Created => word,
    }
}

/// `slipway run`: follows the logs until the container is done (Ctrl-C stops it)
/// and exits with its code, or with `-d` prints its name.
async fn run_container(client: &Client, a: RunArgs, format: Format) -> anyhow::Result<Exit> {
    let restart = RestartPolicy::parse(&a.restart)
        .map_err(|e| anyhow::Error::new(slipway_api::ClientError::Config(format!("--{e}"))))?;
    let req = RunRequest {
        image: a.image,
        name: a.name,
        env: a.env,
        port: a.port,
        memory: a.memory,
        cpus: a.cpus,
        pids: a.pids,
        restart,
        read_only: a.read_only,
        volumes: a.volumes,
        entrypoint: a.entrypoint.map(|e| vec![e]),
        command: (!a.command.is_empty()).then_some(a.command),
        labels: Default::default(),
        stop_signal: a.stop_signal,
        cap_add: a.cap_add,
        cap_drop: a.cap_drop,
        userns: a.userns,
    };
    let info = client.run(&req).await?;
    if a.detach {
        if format == Format::Json {
            output::json(&info)?;
        } else {
            println!("{}", info.name);
        }
        return Ok(Exit::Ok);
    }
    let name = info.name.clone();
    let mut logs = client.logs(&name, true).await?;
    tokio::select! {
        r = super::services::copy_out(&mut logs) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopping {name}");
            client.stop(&name, None).await?;
        }
    }
    let info = client.container(&name).await?;
    eprintln!("{name}: {}", status_word(&info));
    // The container's own exit code (it is not one of Slipway's).
    let code = info.exit_code.unwrap_or(0);
    std::process::exit(code);
}

/// `slipway ps`.
async fn ps(client: &Client, format: Format) -> anyhow::Result<()> {
    let list = client.containers().await?;
    if format == Format::Json {
        return output::json(&list);
    }
    let now_ms = slipway_core::now_ms();
    println!(
        "{:<20} {:<32} {:<28} {:>8} {:>8} {:>6}",
        "NAME", "IMAGE", "STATUS", "PID", "RESTARTS", "PORT"
    );
    for c in list {
        println!(
            "{:<20} {:<32} {:<28} {:>8} {:>8} {:>6}",
            c.name,
            c.spec.image,
            status_with_age(&c, now_ms),
            c.pid.map_or("-".to_owned(), |p| p.to_string()),
            c.restart_count,
            c.spec.port.map_or("-".to_owned(), |p| p.to_string())
        );
    }
    Ok(())
}

/// `slipway stop`.
async fn stop(
    client: &Client,
    name: &str,
    time: Option<u64>,
    format: Format,
) -> anyhow::Result<()> {
    let info = client
        .stop(name, time.map(Duration::from_secs))
        .await
        .with_context(|| format!("cannot stop {name}"))?;
    if format == Format::Json {
        return output::json(&info);
    }
    println!("{name}: {}", status_word(&info));
    Ok(())
}

/// `slipway rm`.
async fn rm(client: &Client, name: &str, force: bool) -> anyhow::Result<()> {
    client
        .remove_container(name, force)
        .await
        .with_context(|| format!("cannot remove {name}"))?;
    println!("{name}");
    Ok(())
}
