//! `slipway run | ps | stop | rm | logs`.

use anyhow::Context as _;
use http::Method;
use slipway_app::client::AdminClient;
use slipway_runtime::{ContainerInfo, RestartPolicy, RunRequest, Status};

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

/// A duration in its largest whole unit: 45s, 12m, 3h, 2d.
fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `slipway run`. Returns the process exit code.
pub async fn run(client: &AdminClient, a: RunArgs) -> anyhow::Result<i32> {
    let req = RunRequest {
        image: a.image,
        name: a.name,
        env: a.env,
        port: a.port,
        memory: a.memory,
        cpus: a.cpus,
        pids: a.pids,
        restart: RestartPolicy::parse(&a.restart).map_err(|e| anyhow::anyhow!("--{e}"))?,
        read_only: a.read_only,
        volumes: a.volumes,
        entrypoint: a.entrypoint.map(|e| vec![e]),
        command: (!a.command.is_empty()).then_some(a.command),
        labels: Default::default(),
    };
    let info: ContainerInfo = serde_json::from_value(
        client
            .call(
                Method::POST,
                "/api/v1/containers",
                Some(&serde_json::to_value(&req)?),
            )
            .await?,
    )?;
    if a.detach {
        println!("{}", info.name);
        return Ok(0);
    }
    // Attached: follow the logs until the container is done; Ctrl-C stops it.
    let name = info.name.clone();
    let path = format!("/api/v1/containers/{name}/logs?follow=true");
    let mut stdout = std::io::stdout();
    tokio::select! {
        r = client.stream_to(&path, &mut stdout) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopping {name}");
            client.call(Method::POST, &format!("/api/v1/containers/{name}/stop"), None).await?;
        }
    }
    let info: ContainerInfo = serde_json::from_value(
        client
            .call(Method::GET, &format!("/api/v1/containers/{name}"), None)
            .await?,
    )?;
    eprintln!("{name}: {}", status_word(&info));
    Ok(info.exit_code.unwrap_or(0))
}

/// `slipway ps`.
pub async fn ps(client: &AdminClient, json: bool) -> anyhow::Result<()> {
    let v = client.call(Method::GET, "/api/v1/containers", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let list: Vec<ContainerInfo> = serde_json::from_value(v)?;
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
pub async fn stop(client: &AdminClient, name: &str, time: Option<u64>) -> anyhow::Result<()> {
    let q = time.map(|t| format!("?grace={t}s")).unwrap_or_default();
    let v = client
        .call(
            Method::POST,
            &format!("/api/v1/containers/{name}/stop{q}"),
            None,
        )
        .await
        .with_context(|| format!("cannot stop {name}"))?;
    let info: ContainerInfo = serde_json::from_value(v)?;
    println!("{name}: {}", status_word(&info));
    Ok(())
}

/// `slipway rm`.
pub async fn rm(client: &AdminClient, name: &str, force: bool) -> anyhow::Result<()> {
    client
        .call(
            Method::DELETE,
            &format!("/api/v1/containers/{name}?force={force}"),
            None,
        )
        .await
        .with_context(|| format!("cannot remove {name}"))?;
    println!("{name}");
    Ok(())
}

/// `slipway logs`.
pub async fn logs(client: &AdminClient, name: &str, follow: bool) -> anyhow::Result<()> {
    let path = format!("/api/v1/containers/{name}/logs?follow={follow}");
    let mut out = std::io::stdout();
    client.stream_to(&path, &mut out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_their_largest_whole_unit() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(59_999), "59s");
        assert_eq!(short_duration(60_000), "1m");
        assert_eq!(short_duration(3_599_000), "59m");
        assert_eq!(short_duration(7_200_000), "2h");
        assert_eq!(short_duration(3 * 86_400_000), "3d");
    }
}
