//! `slipway image pack | ls | inspect`.

use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use slipway_core::{Digest, media};
use slipway_image::client::RegistryClient;
use slipway_image::{Compression, ConfigOverrides, ImageRef, Input};

/// `slipway image pack` flags.
#[derive(clap::Args)]
pub struct PackArgs {
    /// Files or directories to add, as SRC[:DEST] (DEST is an absolute path in the image).
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// The image to create, e.g. hello:1.0.0.
    #[arg(long, short = 't')]
    pub tag: String,
    /// Base image (default: scratch), e.g. base:1 or host:port/base:1.
    #[arg(long)]
    pub from: Option<String>,
    /// Registry host:port to push to (default: the --server's registry).
    #[arg(long)]
    pub to: Option<String>,
    /// ENTRYPOINT, repeatable for each argument.
    #[arg(long)]
    pub entrypoint: Vec<String>,
    /// CMD, repeatable for each argument.
    #[arg(long)]
    pub cmd: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub workdir: Option<String>,
    /// User (uid[:gid] or name).
    #[arg(long)]
    pub user: Option<String>,
    /// Exposed port, e.g. 8080 (repeatable).
    #[arg(long)]
    pub expose: Vec<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// The signal that asks the image's process to stop (STOPSIGNAL), e.g. SIGQUIT.
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Layer compression: gzip, zstd or none.
    #[arg(long, default_value = "gzip")]
    pub compression: String,
    /// Hide the progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// `slipway image pack`.
pub async fn pack(server_host: &str, token: Option<&str>, a: PackArgs) -> anyhow::Result<()> {
    let target = ImageRef::parse(&a.tag)?;
    let host =
        a.to.clone()
            .or_else(|| target.host.clone())
            .unwrap_or_else(|| server_host.to_owned());
    let client = RegistryClient::new(&host).with_token(token.map(str::to_owned));
    let repo = target.repo.to_string();
    let inputs = a
        .inputs
        .iter()
        .map(|i| Input::parse(i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut labels = std::collections::BTreeMap::new();
    for l in &a.label {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?} must be KEY=VALUE"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let overrides = ConfigOverrides {
        entrypoint: (!a.entrypoint.is_empty()).then(|| a.entrypoint.clone()),
        cmd: (!a.cmd.is_empty()).then(|| a.cmd.clone()),
        env: a.env.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        exposed_ports: a.expose.clone(),
        labels,
        stop_signal: a.stop_signal.clone(),
    };
    let compression = Compression::parse(&a.compression)?;

    // The base image's config and layers, reused by digest.
    let mut base_layers: Vec<(String, Digest, u64)> = Vec::new();
    let mut base_config = None;
    if let Some(from) = &a.from {
        let base = ImageRef::parse(from)?;
        let base_host = base.host.clone().unwrap_or_else(|| host.clone());
        let bclient = RegistryClient::new(&base_host).with_token(token.map(str::to_owned));
        let (_, bytes) = bclient
            .get_manifest(base.repo.as_str(), &base.reference.to_string())
            .await
            .with_context(|| format!("cannot read base image {from}"))?;
        let mut m: serde_json::Value = serde_json::from_slice(&bytes)?;
        if m["manifests"].is_array() {
            let child = m["manifests"]
                .as_array()
                .and_then(|a| {
                    a.iter().find(|e| {
                        e["platform"]["os"] == "linux" && e["platform"]["architecture"] == "amd64"
                    })
                })
                .and_then(|e| e["digest"].as_str())
                .with_context(|| format!("base image {from} has no linux/amd64 manifest"))?
                .to_owned();
            let (_, bytes) = bclient.get_manifest(base.repo.as_str(), &child).await?;
            m = serde_json::from_slice(&bytes)?;
        }
        let cfg_digest: Digest = m["config"]["digest"]
            .as_str()
            .context("base manifest has no config")?
            .parse()?;
        base_config = Some(serde_json::from_slice::<serde_json::Value>(
            &bclient.get_blob(base.repo.as_str(), &cfg_digest).await?,
        )?);
        for l in m["layers"].as_array().cloned().unwrap_or_default() {
            let d: Digest = l["digest"]
                .as_str()
                .context("base layer without digest")?
                .parse()?;
            let mt = l["mediaType"]
                .as_str()
                .unwrap_or("application/vnd.oci.image.layer.v1.tar+gzip")
                .to_owned();
            let size = l["size"].as_u64().unwrap_or(0);
            if !client.blob_exists(&repo, &d).await? {
                let same_host = base_host == host;
                if !(same_host && client.mount_blob(&repo, base.repo.as_str(), &d).await?) {
                    let tmp = tempfile::NamedTempFile::new()?;
                    bclient
                        .get_blob_to_file(base.repo.as_str(), &d, tmp.path())
                        .await?;
                    client.push_blob_file(&repo, &d, tmp.path(), None).await?;
                }
            }
            base_layers.push((mt, d, size));
        }
    }

    let layer =
        tokio::task::spawn_blocking(move || slipway_image::build_layer(&inputs, compression))
            .await??;
    let config = slipway_image::image_config(
        base_config.as_ref(),
        std::slice::from_ref(&layer.diff_id),
        &overrides,
    )?;
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(layer.size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("layer {}", &layer.digest.hex()[..12]));
    if client.blob_exists(&repo, &layer.digest).await? {
        bar.set_position(layer.size);
    } else {
        let b = bar.clone();
        client
            .push_blob_file(
                &repo,
                &layer.digest,
                layer.file.path(),
                Some(Arc::new(move |n| b.set_position(n))),
            )
            .await
            .with_context(|| format!("cannot push to {}", client.base()))?;
    }
    bar.finish();
    client
        .push_blob_bytes(&repo, Bytes::from(config.clone()))
        .await?;
    let mut layers = base_layers;
    layers.push((
        layer.media_type.to_owned(),
        layer.digest.clone(),
        layer.size,
    ));
    let manifest = slipway_image::image_manifest(&config, &layers);
    let digest = client
        .push_manifest(
            &repo,
            &target.reference.to_string(),
            media::OCI_MANIFEST,
            Bytes::from(manifest),
        )
        .await?;
    eprintln!(
        "pushed {host}/{repo}:{} ({} layers)",
        target.reference,
        layers.len()
    );
    println!("{digest}");
    Ok(())
}

/// `slipway image ls`.
pub async fn ls(
    server_host: &str,
    token: Option<&str>,
    format: crate::output::Format,
) -> anyhow::Result<()> {
    let client = RegistryClient::new(server_host).with_token(token.map(str::to_owned));
    let mut rows = Vec::new();
    for repo in client.catalog().await? {
        for tag in client.tags(&repo).await.unwrap_or_default() {
            let (_, bytes) = client.get_manifest(&repo, &tag).await?;
            let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let size: u64 = m["layers"]
                .as_array()
                .map(|l| l.iter().filter_map(|x| x["size"].as_u64()).sum())
                .unwrap_or(0);
            rows.push(serde_json::json!({"repository": repo, "tag": tag, "digest": Digest::sha256_of(&bytes).to_string(), "size": size}));
        }
    }
    if format == crate::output::Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<32} {:<16} {:<20} {:>10}",
        "REPOSITORY", "TAG", "DIGEST", "SIZE"
    );
    for r in rows {
        let d = r["digest"].as_str().unwrap_or("");
        println!(
            "{:<32} {:<16} {:<20} {:>10}",
            r["repository"].as_str().unwrap_or(""),
            r["tag"].as_str().unwrap_or(""),
            &d[..d.len().min(19)],
            // The layers' compressed size, as stored.
            r["size"]
                .as_u64()
                .map_or_else(String::new, |n| indicatif::HumanBytes(n).to_string())
        );
    }
    Ok(())
}

/// `slipway image inspect`.
pub async fn inspect(
    server_host: &str,
    token: Option<&str>,
    reference: &str,
) -> anyhow::Result<()> {
    let r = ImageRef::parse(reference)?;
    let host = r.host.clone().unwrap_or_else(|| server_host.to_owned());
    let client = RegistryClient::new(&host).with_token(token.map(str::to_owned));
    let (media_type, bytes) = client
        .get_manifest(r.repo.as_str(), &r.reference.to_string())
        .await?;
    let manifest: serde_json::Value = serde_json::from_slice(&bytes)?;
    let config = match manifest["config"]["digest"]
        .as_str()
        .and_then(|d| d.parse::<Digest>().ok())
    {
        Some(d) => serde_json::from_slice(&client.get_blob(r.repo.as_str(), &d).await?)?,
        None => serde_json::Value::Null,
    };
    let out = serde_json::json!({
        "reference": reference,
        "digest": Digest::sha256_of(&bytes).to_string(),
        "mediaType": media_type,
        "manifest": manifest,
        "config": config,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
