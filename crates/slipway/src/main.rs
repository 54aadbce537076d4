//! The `slipway` binary: parses the command line, runs a command, decides the exit
//! code (every code is in `exit.rs`). Everything else lives in the library crates;
//! the server is reached only through `slipway-api` (and the registry's `/v2`).

#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the binary owns the terminal"
)]

mod commands;
mod credentials;
mod exit;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slipway_api::{Client, ClientConfig, DEFAULT_SERVER};
use slipway_app::config::{FileConfig, Overrides, Settings};

use commands::containers::{ContainerCommand, RunArgs};
use commands::services::{DeployArgs, RollbackArgs, ScaleArgs, ServiceCommand};
use exit::Exit;
use output::Format;

/// Image-driven deployment in one binary.
#[derive(Parser)]
#[command(
    name = "slipway",
    version,
    about = "Image-driven deployment in one binary: an OCI registry, containers, and rollouts with zero failed requests",
    after_help = exit_codes_help()
)]
struct Cli {
    /// The slipway server client commands talk to (http:// or https://).
    #[arg(long, global = true, env = "SLIPWAY_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// PEM CA certificates to trust for an https server (default: the system's;
    /// also SLIPWAY_CA).
    #[arg(long, visible_alias = "ca", global = true, env = "SLIPWAY_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Output format of read commands and outcomes: text or json.
    #[arg(long, short = 'o', global = true, default_value = "text")]
    output: Format,
    /// Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for (code, what) in Exit::TABLE {
        s.push_str(&format!("  {:>3}  {what}\n", code as u8));
    }
    s
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry, the runtime and the deployment engine.
    Serve(ServeArgs),
    /// Run a node agent: instances on this machine for the control planes.
    Agent(AgentArgs),
    /// Services: deploy, ls, status, history, rollback, scale, pause, resume,
    /// promote, abort, rm, logs.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Containers: run, ls, stop, rm, logs, inspect.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Build and inspect images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show what happened (rollouts, failures, rollbacks).
    Events {
        /// Keep following.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this service's events.
        #[arg(long)]
        service: Option<String>,
    },
    /// Remove blobs (and, with `gc.delete_untagged`, manifests) nothing references.
    Gc {
        /// Report what would be freed without deleting anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Short for `container run`.
    Run(Box<RunArgs>),
    /// Short for `container ls`.
    Ps,
    /// Short for `container stop`.
    Stop(commands::containers::StopArgs),
    /// Short for `container rm`: removes a container (never a service; see
    /// `service rm`).
    Rm(commands::containers::RmArgs),
    /// Short for `container logs`.
    Logs(commands::containers::LogsArgs),
    /// Short for `service deploy`.
    Deploy(DeployArgs),
    /// Short for `service status`.
    Status(commands::services::StatusArgs),
    /// Short for `service history`.
    History(commands::services::HistoryArgs),
    /// Short for `service rollback`.
    Rollback(RollbackArgs),
    /// Short for `service scale`.
    Scale(ScaleArgs),
    /// Log in to the server; every later command uses the stored token
    /// (SLIPWAY_TOKEN overrides it).
    Login(commands::auth::LoginArgs),
    /// Forget the stored token of the server.
    Logout,
    /// Who the server takes you for.
    Whoami,
    /// Users: add, ls, rm, passwd, import (htpasswd).
    #[command(subcommand)]
    User(commands::auth::UserCommand),
    /// API tokens (robot accounts): create, ls, revoke.
    #[command(subcommand)]
    Token(commands::auth::TokenCommand),
    /// Read the audit log.
    Audit(commands::auth::AuditArgs),
    /// Secrets for services: set (value from stdin), ls, rm.
    #[command(subcommand)]
    Secret(commands::auth::SecretCommand),
    /// Nodes: ls, cordon, uncordon, rm.
    #[command(subcommand)]
    Node(commands::nodes::NodeCommand),
    /// TLS for the listener.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Create a CA and a server certificate signed by it.
    Init(commands::tls::TlsInitArgs),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image from files, directories or binaries, without a daemon, and push it.
    Pack(Box<commands::image::PackArgs>),
    /// List the images in Slipway's registry.
    Ls,
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
    /// Once listening, write the bound address (`host:port`) to this file, for
    /// supervisors and scripts that start Slipway on port 0.
    #[arg(long, env = "SLIPWAY_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Turn authentication off even on a non-loopback listener: anyone who can
    /// reach it can push, deploy and run containers as root. For isolated test
    /// networks only.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Keep the control-plane state (services, revisions) in etcd:
    /// `etcd://HOST:PORT[,HOST:PORT...]` (etcd 3.4 or later). Default: the
    /// embedded store in the data directory.
    #[arg(long, env = "SLIPWAY_STATE", value_name = "URL")]
    state: Option<String>,
    /// This node's name (default: the host name).
    #[arg(long, env = "SLIPWAY_NODE_NAME")]
    node_name: Option<String>,
    /// This node's labels, for `[placement] constraints`: `zone=a,disk=ssd`.
    #[arg(long, env = "SLIPWAY_NODE_LABELS", value_name = "K=V,...")]
    node_labels: Option<String>,
    /// The cluster's shared secret (at least 16 characters): agents join with
    /// it and control planes call agents with it. With --state only.
    #[arg(long, env = "SLIPWAY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Run no instances on this control plane's machine (agents run them).
    #[arg(long)]
    no_instances: bool,
    /// The address other machines reach this node's instances at (default:
    /// the listen address).
    #[arg(long, env = "SLIPWAY_ADVERTISE", value_name = "IP")]
    advertise: Option<std::net::IpAddr>,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The control planes: `http://HOST:PORT[,http://HOST:PORT...]`.
    #[arg(long, env = "SLIPWAY_JOIN", value_name = "URL")]
    join: String,
    /// The cluster's join token (`slipway serve --join-token`).
    #[arg(long, env = "SLIPWAY_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// This node's name (default: the host name).
    #[arg(long, env = "SLIPWAY_NODE_NAME")]
    name: Option<String>,
    /// The address control planes and proxies reach this node at.
    #[arg(long, env = "SLIPWAY_ADVERTISE", value_name = "IP")]
    advertise: std::net::IpAddr,
    /// Labels for `[placement] constraints`: `zone=a,disk=ssd`.
    #[arg(long, env = "SLIPWAY_NODE_LABELS", value_name = "K=V,...")]
    labels: Option<String>,
    /// Where the agent API listens (default: 0.0.0.0:7480).
    #[arg(long, env = "SLIPWAY_AGENT_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Data directory (default /var/lib/slipway-agent).
    #[arg(long, env = "SLIPWAY_DATA")]
    data: Option<PathBuf>,
    /// Ports handed to instances: FIRST-LAST (default 20000-29999).
    #[arg(long, value_name = "FIRST-LAST")]
    port_range: Option<String>,
    /// The OCI runtime (default runc).
    #[arg(long, env = "SLIPWAY_RUNTIME")]
    runtime: Option<String>,
    /// How often it heartbeats, e.g. 1s (the control planes' [cluster]
    /// heartbeat_ttl must be longer).
    #[arg(long, default_value = "1s")]
    heartbeat_interval: String,
    /// Once listening, write the bound address here.
    #[arg(long)]
    ready_file: Option<PathBuf>,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    slipway_app::init_tracing();
    let daemon = matches!(cli.command, Command::Serve(_) | Command::Agent(_));
    if !daemon {
        quiet_on_closed_stdout();
    }
    // Client commands make a request or two: a single-threaded runtime starts faster.
    let mut builder = if daemon {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Error as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(Exit::of_error(&e) as u8)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let format = if cli.json { Format::Json } else { cli.output };
    let config = ClientConfig {
        server: cli.server.clone(),
        ca_file: cli.ca_file.clone().or_else(|| {
            std::env::var_os("SLIPWAY_CA")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        }),
        token: std::env::var("SLIPWAY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| credentials::token_for(&cli.server)),
    };
    let client = || Client::new(&config);
    use commands::{containers as ctr, services as svc};
    let done = |()| Exit::Ok;
    Ok(match cli.command {
        Command::Serve(args) => serve(args).await.map(done)?,
        Command::Agent(args) => agent(args).await.map(done)?,
        Command::Config(ConfigCommand::Check { file }) => config_check(&file).map(done)?,
        Command::Gc { dry_run } => commands::gc(&client()?, dry_run, format).await.map(done)?,
        Command::Events { follow, service } => {
            svc::events(&client()?, service.as_deref(), follow, format)
                .await
                .map(done)?
        }
        Command::Service(c) => svc::run(&client()?, c, format).await?,
        Command::Container(c) => ctr::run(&client()?, c, format).await?,
        Command::Image(c) => {
            let client = client()?;
            match c {
                ImageCommand::Pack(args) => {
                    commands::image::pack(client.host(), client.token(), *args).await?
                }
                ImageCommand::Ls => {
                    commands::image::ls(client.host(), client.token(), format).await?
                }
                ImageCommand::Inspect { reference } => {
                    commands::image::inspect(client.host(), client.token(), &reference).await?
                }
            }
            Exit::Ok
        }
        Command::Run(a) => ctr::run(&client()?, ContainerCommand::Run(a), format).await?,
        Command::Ps => ctr::run(&client()?, ContainerCommand::Ls, format).await?,
        Command::Stop(a) => ctr::run(&client()?, ContainerCommand::Stop(a), format).await?,
        Command::Rm(a) => ctr::run(&client()?, ContainerCommand::Rm(a), format).await?,
        Command::Logs(a) => ctr::run(&client()?, ContainerCommand::Logs(a), format).await?,
        Command::Deploy(a) => svc::run(&client()?, ServiceCommand::Deploy(a), format).await?,
        Command::Status(a) => svc::run(&client()?, ServiceCommand::Status(a), format).await?,
        Command::History(a) => svc::run(&client()?, ServiceCommand::History(a), format).await?,
        Command::Rollback(a) => svc::run(&client()?, ServiceCommand::Rollback(a), format).await?,
        Command::Scale(a) => svc::run(&client()?, ServiceCommand::Scale(a), format).await?,
        Command::Login(a) => {
            let c = client()?.with_token(None);
            commands::auth::login(&c, &cli.server, a).await.map(done)?
        }
        Command::Logout => commands::auth::logout(&cli.server).map(done)?,
        Command::Whoami => commands::auth::whoami(&client()?, format).await.map(done)?,
        Command::User(c) => commands::auth::user(|| Ok(client()?), c, format)
            .await
            .map(done)?,
        Command::Token(c) => commands::auth::token(&client()?, c, format)
            .await
            .map(done)?,
        Command::Audit(a) => commands::auth::audit(&client()?, a, format)
            .await
            .map(done)?,
        Command::Secret(c) => commands::auth::secret(&client()?, c, format)
            .await
            .map(done)?,
        Command::Node(c) => commands::nodes::run(&client()?, c, format)
            .await
            .map(done)?,
        Command::Tls(TlsCommand::Init(a)) => commands::tls::init(a).map(done)?,
    })
}

fn config_check(file: &std::path::Path) -> anyhow::Result<()> {
    let settings = Settings::resolve(FileConfig::load(file)?, Overrides::default())?;
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
    println!(
        "services.port_range = {}-{}",
        settings.port_range.0, settings.port_range.1
    );
    Ok(())
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
            insecure_no_auth: args.insecure_no_auth,
            state: args.state,
            node_name: args.node_name,
            node_labels: args.node_labels,
            join_token: args.join_token,
            no_instances: args.no_instances,
            advertise: args.advertise,
        },
    )?;
    let ready = args.ready_file;
    slipway_app::serve(settings, shutdown_signal(), move |addr| {
        write_ready(ready.as_deref(), addr);
    })
    .await
}

/// Writes the bound address to `--ready-file`: whole, then renamed, so a reader
/// never sees half an address.
fn write_ready(path: Option<&std::path::Path>, addr: std::net::SocketAddr) {
    let Some(path) = path else {
        return;
    };
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(".tmp");
    let written =
        std::fs::write(&tmp, format!("{addr}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        eprintln!("error: cannot write --ready-file {}: {e}", path.display());
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let usage = |flag: &str, why: String| {
        anyhow::Error::new(slipway_app::config::ConfigError::Invalid {
            field: flag.to_owned(),
            message: why,
        })
    };
    let join = slipway_app::parse_join(&args.join).map_err(|e| usage("--join", e))?;
    if args.token.trim().len() < 16 {
        return Err(usage(
            "--token",
            "the join token has at least 16 characters: give the one the control planes run with (--join-token)".into(),
        ));
    }
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_ascii_lowercase())
            .unwrap_or_else(|_| "node".to_owned()),
    };
    if !slipway_core::placement::valid_label(&name) || name.contains('/') {
        return Err(usage(
            "--name",
            format!("{name:?} must be 1-63 characters of letters, digits, '.', '_' or '-'"),
        ));
    }
    let labels = slipway_app::config::parse_labels(args.labels.as_deref().unwrap_or(""))
        .map_err(|e| usage("--labels", e))?;
    let port_range = match &args.port_range {
        Some(r) => {
            slipway_app::config::parse_port_range(r).map_err(|e| usage("--port-range", e))?
        }
        None => (20000, 29999),
    };
    let heartbeat_interval = slipway_core::parse_duration(&args.heartbeat_interval)
        .map_err(|e| usage("--heartbeat-interval", e.to_string()))?;
    let settings = slipway_app::AgentSettings {
        join,
        token: args.token.trim().to_owned(),
        name,
        advertise: args.advertise,
        labels,
        listen: args
            .listen
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 7480))),
        data_dir: args
            .data
            .unwrap_or_else(|| PathBuf::from("/var/lib/slipway-agent")),
        runtime_binary: args.runtime.unwrap_or_else(|| "runc".to_owned()),
        port_range,
        heartbeat_interval,
    };
    let ready = args.ready_file;
    slipway_app::agent(settings, shutdown_signal(), move |addr| {
        write_ready(ready.as_deref(), addr);
    })
    .await
}

/// A client command whose reader went away (`slipway image ls | head -1`) ends as
/// `cat` or `ls` would there, with status 141 (killed by SIGPIPE) and no panic
/// message. Rust ignores SIGPIPE, so the failed write panics inside `println!`;
/// daemons keep ignoring it (a client that hangs up must not end them).
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
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
