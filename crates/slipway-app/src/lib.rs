//! `slipway serve` as a library: configuration, wiring, listeners, background tasks,
//! lifecycle and shutdown. (The admin API's wire types and client are `slipway-api`.)
//!
//! Entry points: [`config::Settings::resolve`], then [`serve`]. Integration tests and
//! the binary run the same code.
//!
//! **Architecture invariant:** this is the only crate that reads configuration or
//! wires concrete types together. It never prints to stdout or exits the process;
//! that is the binary's job.

mod agent;
mod api_error;
mod audit;
mod auth;
mod cluster;
pub mod config;
mod containers;
mod http;
mod metrics;
mod mirror;
mod nodes;
mod peer;
mod server;
mod services;
mod tasks;

pub use agent::{AgentSettings, agent, parse_join};
pub use server::serve;

/// Initialises `tracing` on stderr. The filter comes from `SLIPWAY_LOG`, then
/// `RUST_LOG`, then `info`.
pub fn init_tracing() {
    let filter = std::env::var("SLIPWAY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
