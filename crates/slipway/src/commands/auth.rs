#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

//! `slipway login|logout|whoami`, `user …`, `token …`, `audit`.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use slipway_api::Client;
use slipway_api::auth::{CreateToken, CreateUser, GrantSpec, Rights};

use crate::credentials;
use crate::output::{self, Format};

/// Where a password comes from.
#[derive(Args, Debug, Clone, Default)]
pub struct PasswordArgs {
    /// Read the password from stdin (one line) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
    /// The password itself (visible to other users of this machine in the process
    /// list: prefer --password-stdin).
    #[arg(long, short = 'p', conflicts_with = "password_stdin")]
    password: Option<String>,
}

impl PasswordArgs {
    fn read(&self, prompt: &str) -> anyhow::Result<String> {
        match &self.password {
            Some(p) => {
                eprintln_note(
                    "warning: --password is visible in the process list; prefer --password-stdin",
                );
                Ok(p.clone())
            }
            None => read_secret(self.password_stdin, prompt),
        }
    }
}

/// Rights given to a user or token.
#[derive(Args, Debug, Clone, Default)]
pub struct RightsArgs {
    /// A role on every repository and service (`admin` for everything,
    /// including users and tokens).
    #[arg(long)]
    role: Option<String>,
    /// A role on a repository glob, `GLOB=ROLE` (repeatable), e.g. `team/*=developer`.
    #[arg(long = "repo", value_name = "GLOB=ROLE")]
    repos: Vec<String>,
    /// A role on a service glob, `GLOB=ROLE` (repeatable), e.g. `app=deployer`.
    #[arg(long = "service", value_name = "GLOB=ROLE")]
    services: Vec<String>,
    /// May read /metrics.
    #[arg(long)]
    metrics: bool,
}

fn grant(kind: &str, s: &str) -> anyhow::Result<GrantSpec> {
    let (glob, role) = s.rsplit_once('=').with_context(|| {
        format!(
            "--{}: {s:?} must be GLOB=ROLE, for example 'team/*=developer'",
            if kind == "repository" {
                "repo"
            } else {
                "service"
            }
        )
    })?;
    Ok(GrantSpec {
        kind: kind.into(),
        glob: glob.into(),
        role: role.into(),
    })
}

impl RightsArgs {
    fn rights(&self) -> anyhow::Result<Rights> {
        let mut r = Rights {
            metrics: self.metrics,
            ..Rights::default()
        };
        match self.role.as_deref() {
            Some("admin") => r.admin = true,
            Some(role) => {
                r.grants.push(grant("repository", &format!("*={role}"))?);
                r.grants.push(grant("service", &format!("*={role}"))?);
            }
            None => {}
        }
        for g in &self.repos {
            r.grants.push(grant("repository", g)?);
        }
        for g in &self.services {
            r.grants.push(grant("service", g)?);
        }
        Ok(r)
    }
}

/// Reads a secret value: stdin when asked or not a terminal, else a prompt.
pub fn read_secret(from_stdin: bool, prompt: &str) -> anyhow::Result<String> {
    use std::io::IsTerminal as _;
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        let s = s.strip_suffix('\n').unwrap_or(&s);
        let s = s.strip_suffix('\r').unwrap_or(s);
        return Ok(s.to_owned());
    }
    rpassword::prompt_password(prompt).context("cannot read the password")
}

fn rights_text(r: &Rights) -> String {
    let mut parts = Vec::new();
    if r.admin {
        parts.push("admin".to_owned());
    }
    if r.metrics && !r.admin {
        parts.push("metrics".to_owned());
    }
    parts.extend(
        r.grants
            .iter()
            .map(|g| format!("{}:{}={}", g.kind, g.glob, g.role)),
    );
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(" ")
    }
}

/// `slipway login`
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// User name.
    #[arg(long, short = 'u')]
    username: Option<String>,
    #[command(flatten)]
    password: PasswordArgs,
    /// Log in with an API token instead (read from stdin with `--token -`).
    #[arg(long)]
    token: Option<String>,
}

/// `slipway login`: stores a token for the server in the user's config.
pub async fn login(client: &Client, server: &str, a: LoginArgs) -> anyhow::Result<()> {
    let (user, token) = match a.token {
        Some(t) => {
            let t = if t == "-" { read_secret(true, "")? } else { t };
            let me = client.clone().with_token(Some(t.clone())).whoami().await?;
            (me.name, t)
        }
        None => {
            let user = match a.username {
                Some(u) => u,
                None if std::io::IsTerminal::is_terminal(&std::io::stdin())
                    && !a.password.password_stdin =>
                {
                    eprint_prompt("Username: ");
                    let mut u = String::new();
                    std::io::stdin()
                        .read_line(&mut u)
                        .context("cannot read the user name")?;
                    u.trim().to_owned()
                }
                None => anyhow::bail!("login: give --username (or --token for an API token)"),
            };
            let password = a.password.read("Password: ")?;
            let answer = client.login(&user, &password).await?;
            let token = answer
                .refresh_token
                .context("the server issued no refresh token")?;
            (user, token)
        }
    };
    let path = credentials::store(
        server,
        credentials::Login {
            user: user.clone(),
            token,
        },
    )?;
    println!(
        "logged in to {server} as {user} (token stored in {})",
        path.display()
    );
    Ok(())
}

/// `slipway logout`
pub fn logout(server: &str) -> anyhow::Result<()> {
    if credentials::forget(server)? {
        println!("logged out of {server}");
    } else {
        println!("not logged in to {server}");
    }
    Ok(())
}

/// `slipway whoami`
pub async fn whoami(client: &Client, format: Format) -> anyhow::Result<()> {
    let me = client.whoami().await?;
    if format == Format::Json {
        return output::json(&me);
    }
    if me.auth_enabled {
        println!("{} (via {})", me.name, me.via);
    } else {
        println!("authentication is off on this server (no users yet)");
    }
    Ok(())
}

/// `slipway user …`
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user.
    Add {
        /// Login name.
        name: String,
        #[command(flatten)]
        rights: RightsArgs,
        #[command(flatten)]
        password: PasswordArgs,
        /// Work on this data directory directly (the server must be stopped),
        /// to create the first admin.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// List users.
    Ls {
        /// Read this data directory directly.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Remove a user (its logins are revoked).
    Rm {
        /// Login name.
        name: String,
        /// Work on this data directory directly.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Change a user's password (its logins are revoked).
    Passwd {
        /// Login name.
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Work on this data directory directly.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Import users from an htpasswd file with bcrypt hashes (`htpasswd -B`).
    Import {
        /// The htpasswd file.
        file: PathBuf,
        #[command(flatten)]
        rights: RightsArgs,
        /// Work on this data directory directly.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn offline(dir: &std::path::Path) -> anyhow::Result<slipway_auth::Auth> {
    slipway_auth::Auth::open(dir, slipway_auth::AuthConfig::default())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn permissions(r: &Rights) -> anyhow::Result<slipway_auth::Permissions> {
    let mut grants = Vec::new();
    for g in &r.grants {
        let kind = if g.kind == "repository" {
            slipway_auth::Kind::Repository
        } else {
            slipway_auth::Kind::Service
        };
        grants.push(
            slipway_auth::Grant::parse(kind, &format!("{}={}", g.glob, g.role))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    Ok(slipway_auth::Permissions {
        admin: r.admin,
        metrics: r.metrics,
        grants,
    })
}

fn offline_err(e: slipway_auth::AuthError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Runs a `user` command.
pub async fn user(
    client: impl Fn() -> anyhow::Result<Client>,
    c: UserCommand,
    format: Format,
) -> anyhow::Result<()> {
    match c {
        UserCommand::Add {
            name,
            rights,
            password,
            data,
        } => {
            let rights = rights.rights()?;
            let pw = password.read("Password: ")?;
            match data {
                Some(d) => offline(&d)?
                    .add_user(&name, &pw, permissions(&rights)?)
                    .map_err(offline_err)?,
                None => {
                    client()?
                        .add_user(&CreateUser {
                            name: name.clone(),
                            password: pw,
                            rights: rights.clone(),
                        })
                        .await?
                }
            }
            println!("added user {name} ({})", rights_text(&rights));
        }
        UserCommand::Ls { data } => {
            let list: Vec<slipway_api::auth::UserInfo> = match data {
                Some(d) => offline(&d)?
                    .db()
                    .users()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .into_iter()
                    .map(|u| slipway_api::auth::UserInfo {
                        rights: rights_from(&u.permissions),
                        name: u.name,
                        created_ms: u.created_ms,
                    })
                    .collect(),
                None => client()?.users().await?,
            };
            if format == Format::Json {
                return output::json(&list);
            }
            println!("{:<20} RIGHTS", "NAME");
            for u in list {
                println!("{:<20} {}", u.name, rights_text(&u.rights));
            }
        }
        UserCommand::Rm { name, data } => {
            match data {
                Some(d) => offline(&d)?.remove_user(&name).map_err(offline_err)?,
                None => client()?.remove_user(&name).await?,
            }
            println!("removed user {name}");
        }
        UserCommand::Passwd {
            name,
            password,
            data,
        } => {
            let pw = password.read("New password: ")?;
            match data {
                Some(d) => offline(&d)?.set_password(&name, &pw).map_err(offline_err)?,
                None => client()?.set_password(&name, &pw).await?,
            }
            println!("changed the password of {name}");
        }
        UserCommand::Import { file, rights, data } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let rights = rights.rights()?;
            let Some(d) = data else {
                anyhow::bail!(
                    "user import: give --data DIR (imports work on the data directory, with the server stopped)"
                );
            };
            let added = offline(&d)?
                .import_htpasswd(&text, &permissions(&rights)?)
                .map_err(offline_err)?;
            println!("imported {} users: {}", added.len(), added.join(", "));
        }
    }
    Ok(())
}

fn rights_from(p: &slipway_auth::Permissions) -> Rights {
    Rights {
        admin: p.admin,
        metrics: p.metrics,
        grants: p
            .grants
            .iter()
            .map(|g| GrantSpec {
                kind: match g.kind {
                    slipway_auth::Kind::Repository => "repository".into(),
                    slipway_auth::Kind::Service => "service".into(),
                },
                glob: g.glob.clone(),
                role: g.role.to_string(),
            })
            .collect(),
    }
}

/// `slipway token …`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token; it is printed once.
    Create {
        /// Unique name (shown as `token:NAME` in the audit log).
        name: String,
        #[command(flatten)]
        rights: RightsArgs,
        /// Lifetime, e.g. `30d` or `12h` (default: never expires).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List API tokens.
    Ls,
    /// Revoke an API token by name or id.
    Revoke {
        /// Name or id.
        name: String,
    },
}

fn when(ms: Option<u64>) -> String {
    ms.map_or("-".into(), slipway_core::form::rfc3339)
}

/// Runs a `token` command.
pub async fn token(client: &Client, c: TokenCommand, format: Format) -> anyhow::Result<()> {
    match c {
        TokenCommand::Create {
            name,
            rights,
            expires,
        } => {
            let expires_in_s = expires
                .map(|e| {
                    slipway_core::parse_duration(&e)
                        .map(|d| d.as_secs())
                        .map_err(|err| anyhow::anyhow!("--expires: {err}"))
                })
                .transpose()?;
            let created = client
                .create_token(&CreateToken {
                    name,
                    rights: rights.rights()?,
                    expires_in_s,
                })
                .await?;
            if format == Format::Json {
                return output::json(&created);
            }
            println!("{}", created.token);
            eprintln_note(&format!(
                "token {} ({}); expires {}. It is shown only this once.",
                created.info.name,
                rights_text(&created.info.rights),
                when(created.info.expires_ms)
            ));
        }
        TokenCommand::Ls => {
            let list = client.tokens().await?;
            if format == Format::Json {
                return output::json(&list);
            }
            println!(
                "{:<16} {:<16} {:<8} {:<21} RIGHTS",
                "NAME", "ID", "STATE", "EXPIRES"
            );
            let now = slipway_core::now_ms();
            for t in list {
                let state = if t.revoked_ms.is_some() {
                    "revoked"
                } else if t.expires_ms.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<16} {:<16} {:<8} {:<21} {}",
                    t.name,
                    t.id,
                    state,
                    when(t.expires_ms),
                    rights_text(&t.rights)
                );
            }
        }
        TokenCommand::Revoke { name } => {
            let t = client.revoke_token(&name).await?;
            println!("revoked token {} ({})", t.name, t.id);
        }
    }
    Ok(())
}

#[expect(clippy::print_stderr, reason = "a note beside the token on stdout")]
fn eprintln_note(s: &str) {
    eprintln!("{s}");
}

#[expect(clippy::print_stderr, reason = "an interactive prompt")]
fn eprint_prompt(s: &str) {
    use std::io::Write as _;
    eprint!("{s}");
    let _ = std::io::stderr().flush();
}

/// `slipway audit`
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Only entries newer than this (e.g. `1h`, `30m`).
    #[arg(long)]
    since: Option<String>,
    /// Only this principal (`alice`, `token:ci`).
    #[arg(long)]
    principal: Option<String>,
    /// Only entries about this service.
    #[arg(long)]
    service: Option<String>,
    /// At most this many (the newest).
    #[arg(long)]
    limit: Option<usize>,
}

/// Runs `slipway audit`.
pub async fn audit(client: &Client, a: AuditArgs, format: Format) -> anyhow::Result<()> {
    use slipway_core::form::encode;
    let mut q = Vec::new();
    if let Some(s) = a.since {
        let d = slipway_core::parse_duration(&s).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
        q.push(format!(
            "since_ms={}",
            slipway_core::now_ms().saturating_sub(d.as_millis() as u64)
        ));
    }
    if let Some(p) = a.principal {
        q.push(format!("principal={}", encode(&p)));
    }
    if let Some(s) = a.service {
        q.push(format!("service={}", encode(&s)));
    }
    if let Some(n) = a.limit {
        q.push(format!("limit={n}"));
    }
    let entries = client.audit(&q.join("&")).await?;
    if format == Format::Json {
        return output::json(&entries);
    }
    for e in entries {
        println!(
            "{} {:<16} {:<15} {:<12} {:<40} {} {}",
            slipway_core::form::rfc3339(e.at_ms),
            e.principal,
            e.source,
            e.action,
            e.target,
            e.result,
            e.status
        );
    }
    Ok(())
}

/// `slipway secret …`
#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Set a secret's value, read from stdin; services that use it roll to a
    /// new revision.
    Set {
        /// Name (letters, digits, '.', '_', '-').
        name: String,
        /// Service globs that may use it (repeatable; default: every service).
        #[arg(long = "service", value_name = "GLOB")]
        services: Vec<String>,
    },
    /// List secrets (never their values).
    Ls,
    /// Remove a secret no service uses.
    Rm {
        /// Name.
        name: String,
    },
}

/// Runs a `secret` command.
pub async fn secret(client: &Client, c: SecretCommand, format: Format) -> anyhow::Result<()> {
    match c {
        SecretCommand::Set { name, services } => {
            let value = read_secret(true, "")?;
            let info = client
                .set_secret(&name, &slipway_api::auth::SetSecret { value, services })
                .await?;
            if format == Format::Json {
                return output::json(&info);
            }
            println!("set secret {} (version {})", info.name, info.version);
            if !info.rolled.is_empty() {
                println!("rolling: {}", info.rolled.join(", "));
            }
        }
        SecretCommand::Ls => {
            let list = client.secrets().await?;
            if format == Format::Json {
                return output::json(&list);
            }
            println!("{:<24} {:<8} {:<21} SERVICES", "NAME", "VERSION", "UPDATED");
            for s in list {
                println!(
                    "{:<24} {:<8} {:<21} {}",
                    s.name,
                    s.version,
                    slipway_core::form::rfc3339(s.updated_ms),
                    s.services.join(",")
                );
            }
        }
        SecretCommand::Rm { name } => {
            client.remove_secret(&name).await?;
            println!("removed secret {name}");
        }
    }
    Ok(())
}
