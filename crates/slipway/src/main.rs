//! The `slipway` binary: parses the command line, runs a command, decides the exit
//! code. Everything else lives in the library crates.

#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary owns the terminal"
)]

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use slipway_app::client::{AdminClient, DEFAULT_SERVER};
use slipway_app::config::{ConfigError, FileConfig, Overrides, Settings};

/// Exit code for an invalid configuration (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

/// Image-driven deployment in one binary.
#[derive(Parser)]
#[command(name = "slipway", version, about)]
struct Cli {
    /// The slipway server client commands talk to.
    #[arg(long, global = true, env = "SLIPWAY_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry (and, later, the deployment engine).
    Serve(ServeArgs),
    /// Remove blobs (and, with `gc.delete_untagged`, manifests) nothing references.
    Gc {
        /// Report what would be freed without deleting anything.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run an image as a container.
    Run(commands::containers::RunArgs),
    /// List containers.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a container: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// Container name.
        name: String,
        /// Seconds to wait before SIGKILL (default: the server's runtime.stop_grace).
        #[arg(long, short = 't')]
        time: Option<u64>,
    },
    /// Remove a service (all its instances and its ingress), or else a container and
    /// everything it left behind (volumes stay).
    Rm {
        /// Service or container name.
        name: String,
        /// Stop it first if it is running.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Print a container's output.
    Logs {
        /// Container name.
        name: String,
        /// Keep following until the container is done.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Create or update a service from a TOML spec and follow the rollout (exit 0 when
    /// live, 2 when rolled back, 1 when failed).
    Deploy {
        /// The service spec.
        file: PathBuf,
        /// Return once the rollout has started.
        #[arg(long)]
        detach: bool,
    },
    /// Show services, their revisions, instances, weights and traffic.
    Status {
        /// One service (default: all).
        service: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a service's revisions.
    History {
        /// Service name.
        service: String,
    },
    /// Go back to the previous (or a given) revision.
    Rollback {
        /// Service name.
        service: String,
        /// Revision number.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Change a service's number of instances without downtime.
    Scale {
        /// Service name.
        service: String,
        /// Instances.
        replicas: u32,
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
    /// Hold the rollout in progress at its next step.
    Pause {
        /// Service name.
        service: String,
    },
    /// Let a paused rollout go on.
    Resume {
        /// Service name.
        service: String,
    },
    /// List services.
    Services,
    /// Show what happened (rollouts, failures, rollbacks).
    Events {
        /// Keep following.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Build and inspect images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image from files, directories or binaries, without a daemon, and push it.
    Pack(Box<commands::image::PackArgs>),
    /// List the images in Slipway's registry.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's manifest and config as JSON.
    Inspect {
        /// Image reference.
        reference: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "SLIPWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (default /var/lib/slipway).
    #[arg(long, env = "SLIPWAY_DATA")]
    data: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:5000).
    #[arg(long, env = "SLIPWAY_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain; enables TLS together with --tls-key.
    #[arg(long, env = "SLIPWAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long, env = "SLIPWAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print the resolved settings.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    slipway_app::init_tracing();
    // Client commands make a request or two: a single-threaded runtime starts faster.
    let mut builder = if matches!(cli.command, Command::Serve(_)) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = || AdminClient::new(&cli.server);
    match cli.command {
        Command::Run(args) => return commands::containers::run(&client()?, args).await,
        Command::Ps { json } => commands::containers::ps(&client()?, json).await?,
        Command::Stop { name, time } => commands::containers::stop(&client()?, &name, time).await?,
        Command::Rm { name, force } => {
            let c = client()?;
            if commands::services::exists(&c, &name).await {
                commands::services::remove(&c, &name).await?;
            } else {
                commands::containers::rm(&c, &name, force).await?;
            }
        }
        Command::Deploy { file, detach } => {
            return commands::services::deploy(&client()?, &file, detach).await;
        }
        Command::Status { service, json } => {
            commands::services::status(&client()?, service.as_deref(), json).await?
        }
        Command::History { service } => commands::services::history(&client()?, &service).await?,
        Command::Rollback { service, to } => {
            return commands::services::rollback(&client()?, &service, to).await;
        }
        Command::Scale { service, replicas } => {
            commands::services::scale(&client()?, &service, replicas).await?
        }
        Command::Services => commands::services::services(&client()?).await?,
        Command::Promote { service } => {
            commands::services::control(&client()?, &service, "promote").await?
        }
        Command::Abort { service } => {
            commands::services::control(&client()?, &service, "abort").await?
        }
        Command::Pause { service } => {
            commands::services::control(&client()?, &service, "pause").await?
        }
        Command::Resume { service } => {
            commands::services::control(&client()?, &service, "resume").await?
        }
        Command::Events { follow } => commands::services::events(&client()?, follow).await?,
        Command::Logs { name, follow } => {
            commands::containers::logs(&client()?, &name, follow).await?
        }
        Command::Image { command } => {
            let c = client()?;
            match command {
                ImageCommand::Pack(args) => commands::image::pack(c.host(), *args).await?,
                ImageCommand::Ls { json } => commands::image::ls(c.host(), json).await?,
                ImageCommand::Inspect { reference } => {
                    commands::image::inspect(c.host(), &reference).await?
                }
            }
        }
        other => run_admin(other, &cli.server).await?,
    }
    Ok(0)
}

async fn run_admin(command: Command, server: &str) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Gc { dry_run, json } => gc(server, dry_run, json).await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let settings = Settings::resolve(FileConfig::load(&file)?, Overrides::default())?;
            println!("{} is valid", file.display());
            println!("listen = {}", settings.listen);
            println!("data_dir = {}", settings.data_dir.display());
            println!(
                "tls = {}",
                if settings.tls.is_some() { "on" } else { "off" }
            );
            println!(
                "gc = {} (grace {}, delete_untagged {})",
                settings
                    .gc
                    .interval
                    .map_or("on demand".to_owned(), |i| format!(
                        "every {}",
                        slipway_core::format_duration(i.0)
                    )),
                slipway_core::format_duration(settings.gc.grace_period.0),
                settings.gc.delete_untagged
            );
            println!("webhooks = {}", settings.webhooks.len());
            println!("runtime = {}", settings.runtime.binary);
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let settings = Settings::resolve(
        file,
        Overrides {
            listen: args.listen,
            data_dir: args.data,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
        },
    )?;
    slipway_app::serve(settings, shutdown_signal(), |_| {}).await
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the process can still be stopped by SIGKILL.
            std::future::pending::<()>().await;
        }
    }
}

async fn gc(server: &str, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(server)?;
    let path = if dry_run {
        "/api/v1/gc?dry_run=true"
    } else {
        "/api/v1/gc"
    };
    let report = client
        .post_json(path)
        .await
        .context("garbage collection failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if dry_run { "would free" } else { "freed" };
    let empty = Vec::new();
    let blobs = report["blobs"].as_array().unwrap_or(&empty);
    let manifests = report["manifests"].as_array().unwrap_or(&empty);
    for m in manifests {
        println!(
            "manifest {}@{}",
            m[0].as_str().unwrap_or("?"),
            m[1].as_str().unwrap_or("?")
        );
    }
    for b in blobs {
        println!("blob {} ({} bytes)", b[0].as_str().unwrap_or("?"), b[1]);
    }
    println!(
        "{verb} {} bytes: {} blobs, {} untagged manifests",
        report["bytes_freed"],
        blobs.len(),
        manifests.len()
    );
    Ok(())
}
