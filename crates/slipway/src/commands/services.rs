//! `slipway deploy | status | history | rollback | scale | services | events`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use slipway_app::client::AdminClient;

/// Exit code when a deploy was rolled back.
pub const EXIT_ROLLED_BACK: i32 = 2;

/// `slipway deploy FILE`: creates or updates a service and follows the rollout.
pub async fn deploy(client: &AdminClient, file: &Path, detach: bool) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Validate locally first for a precise message before anything is sent.
    let spec = slipway_core::service::ServiceSpec::from_toml(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let v = client
        .call_raw(Method::POST, "/api/v1/services", text.into_bytes())
        .await?;
    let revision = v["revision"].as_u64().unwrap_or(0);
    println!("service {} revision {revision} deploying", spec.name);
    if detach {
        return Ok(0);
    }
    let path = format!("/api/v1/services/{}", spec.name);
    let mut last_phase = String::new();
    loop {
        let s = client.call(Method::GET, &path, None).await?;
        let phase = s["phase"].as_str().unwrap_or("").to_owned();
        if phase != last_phase {
            println!("  {phase}");
            last_phase = phase;
        }
        // Its own outcome, even if a newer revision (a trigger) started meanwhile.
        let own = s["deploys"].as_array().and_then(|d| {
            d.iter()
                .find(|d| d["revision"].as_u64() == Some(revision))
                .cloned()
        });
        if let Some(own) = own {
            let r = &own["result"];
            return Ok(match r["outcome"].as_str() {
                Some("done") => {
                    println!("revision {revision} is live");
                    0
                }
                Some("rolled-back") => {
                    println!(
                        "revision {revision} was rolled back: {}",
                        r["message"].as_str().unwrap_or("")
                    );
                    EXIT_ROLLED_BACK
                }
                _ => {
                    println!(
                        "revision {revision} failed: {}",
                        r["message"].as_str().unwrap_or("")
                    );
                    1
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_status(s: &serde_json::Value) {
    println!(
        "{}  ingress {}  active revision {}  replicas {}",
        s["name"].as_str().unwrap_or("?"),
        s["ingress"].as_str().unwrap_or("?"),
        s["active"],
        s["replicas"]
    );
    println!("  phase: {}", s["phase"].as_str().unwrap_or(""));
    let weights: Vec<String> = s["weights"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| format!("r{}={}", w[0], w[1]))
        .collect();
    println!("  weights: {}", weights.join(" "));
    for i in s["instances"].as_array().cloned().unwrap_or_default() {
        println!(
            "  instance {} revision {} {}",
            i["id"].as_str().unwrap_or("?"),
            i["revision"],
            i["addr"].as_str().unwrap_or("?")
        );
    }
    for t in s["traffic"].as_array().cloned().unwrap_or_default() {
        println!(
            "  traffic r{}: {} requests, {} errors, p99 ≤ {} ms",
            t["revision"], t["requests"], t["errors"], t["p99_ms"]
        );
    }
}

/// `slipway status [SERVICE]`.
pub async fn status(client: &AdminClient, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let v = match name {
        Some(n) => {
            client
                .call(Method::GET, &format!("/api/v1/services/{n}"), None)
                .await?
        }
        None => client.call(Method::GET, "/api/v1/services", None).await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Some(list) = v.as_array() {
        for s in list {
            print_status(s);
        }
    } else {
        print_status(&v);
    }
    Ok(())
}

/// `slipway services`.
pub async fn services(client: &AdminClient) -> anyhow::Result<()> {
    let v = client.call(Method::GET, "/api/v1/services", None).await?;
    println!(
        "{:<20} {:<22} {:>7} {:>9}  PHASE",
        "NAME", "INGRESS", "ACTIVE", "INSTANCES"
    );
    for s in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{:<20} {:<22} {:>7} {:>9}  {}",
            s["name"].as_str().unwrap_or("?"),
            s["ingress"].as_str().unwrap_or("?"),
            s["active"].as_u64().map_or("-".into(), |a| a.to_string()),
            s["instances"].as_array().map_or(0, Vec::len),
            s["phase"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `slipway history SERVICE`.
pub async fn history(client: &AdminClient, name: &str) -> anyhow::Result<()> {
    let v = client
        .call(Method::GET, &format!("/api/v1/services/{name}"), None)
        .await?;
    println!("{:>8}  {:<12} {:<50} NOTE", "REVISION", "STATUS", "IMAGE");
    for r in v["revisions"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:>8}  {:<12} {:<50} {}",
            r["number"],
            r["status"].as_str().unwrap_or("?"),
            r["image"].as_str().unwrap_or("?"),
            r["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `slipway rollback SERVICE [--to N]`.
pub async fn rollback(client: &AdminClient, name: &str, to: Option<u64>) -> anyhow::Result<i32> {
    let q = to.map(|t| format!("?to={t}")).unwrap_or_default();
    let v = client
        .call(
            Method::POST,
            &format!("/api/v1/services/{name}/rollback{q}"),
            None,
        )
        .await?;
    let r = &v["result"];
    println!(
        "{}{}",
        r["outcome"].as_str().unwrap_or("?"),
        r["message"]
            .as_str()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    );
    Ok(if r["outcome"] == "done" { 0 } else { 1 })
}

/// `slipway scale SERVICE N`.
pub async fn scale(client: &AdminClient, name: &str, replicas: u32) -> anyhow::Result<()> {
    client
        .call(
            Method::POST,
            &format!("/api/v1/services/{name}/scale?replicas={replicas}"),
            None,
        )
        .await?;
    println!("{name} scaled to {replicas}");
    Ok(())
}

/// `slipway events [-f]`.
pub async fn events(client: &AdminClient, follow: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    client
        .stream_to(&format!("/api/v1/events?follow={follow}"), &mut out)
        .await
}

/// Whether a service of that name exists (for `slipway rm`).
pub async fn exists(client: &AdminClient, name: &str) -> bool {
    client
        .call(Method::GET, &format!("/api/v1/services/{name}"), None)
        .await
        .is_ok()
}

/// `slipway rm SERVICE`.
pub async fn remove(client: &AdminClient, name: &str) -> anyhow::Result<()> {
    client
        .call(Method::DELETE, &format!("/api/v1/services/{name}"), None)
        .await?;
    println!("{name}");
    Ok(())
}

/// `slipway promote | abort | pause | resume SERVICE`.
pub async fn control(client: &AdminClient, name: &str, verb: &str) -> anyhow::Result<()> {
    client
        .call(
            Method::POST,
            &format!("/api/v1/services/{name}/{verb}"),
            None,
        )
        .await?;
    println!("{name}: {verb}");
    Ok(())
}
