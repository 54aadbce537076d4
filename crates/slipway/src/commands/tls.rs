#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

//! `slipway tls init`: a private CA and a server certificate signed by it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// `slipway tls init`
#[derive(Args, Debug)]
pub struct TlsInitArgs {
    /// Where to write ca.pem, ca-key.pem, server.pem and server-key.pem.
    #[arg(long, default_value = "/var/lib/slipway/tls")]
    dir: PathBuf,
    /// A name or address clients use for the server (repeatable); localhost,
    /// 127.0.0.1 and ::1 are always included.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Validity of the server certificate, in days.
    #[arg(long, default_value_t = 365)]
    days: i64,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

fn write(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Runs `slipway tls init`.
pub fn init(a: TlsInitArgs) -> anyhow::Result<()> {
    if a.days < 1 {
        anyhow::bail!("--days: must be at least 1");
    }
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let files = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"].map(|f| a.dir.join(f));
    if !a.force
        && let Some(f) = files.iter().find(|f| f.exists())
    {
        anyhow::bail!(
            "{} exists: pass --force to replace the CA and certificate",
            f.display()
        );
    }
    let now = time::OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "Slipway CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(10 * 365);
    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let ca_cert = ca.self_signed(&ca_key).context("cannot sign the CA")?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in a.hosts {
        if !names.contains(&h) {
            names.push(h);
        }
    }
    let mut server = CertificateParams::new(names.clone()).context("--host: invalid name")?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.last().cloned().unwrap_or_default(),
    );
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.not_before = now - time::Duration::days(1);
    server.not_after = now + time::Duration::days(a.days);
    let key = KeyPair::generate().context("cannot generate the server key")?;
    let cert = server
        .signed_by(&key, &ca_cert, &ca_key)
        .context("cannot sign the server certificate")?;
    write(&files[0], &ca_cert.pem(), false)?;
    write(&files[1], &ca_key.serialize_pem(), true)?;
    write(&files[2], &cert.pem(), false)?;
    write(&files[3], &key.serialize_pem(), true)?;
    let d = a.dir.display();
    println!(
        "wrote {d}/ca.pem, {d}/server.pem and their keys (names: {})",
        names.join(", ")
    );
    println!("serve with:   slipway serve --tls-cert {d}/server.pem --tls-key {d}/server-key.pem");
    println!("trust with:   slipway --ca {d}/ca.pem …  (or SLIPWAY_CA={d}/ca.pem)");
    Ok(())
}
