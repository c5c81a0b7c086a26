//! `steward-agent`: the per-host daemon that runs PostgreSQL for the control plane.

use anyhow::Context;
use clap::{Parser, Subcommand};
use steward_agent::config::AgentArgs;

/// Steward host agent: runs PostgreSQL on this host and carries out the control plane's commands.
#[derive(Parser)]
#[command(name = "steward-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon: register with the control plane, heartbeat, serve commands.
    ///
    /// Example: steward-agent run --control-plane 10.0.0.1:7400 --advertise 10.0.0.7:7410 --data-path /var/lib/steward/agent
    Run(AgentArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,h2=warn,tower=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Run(args) => {
            let cfg = args.resolve().context("invalid agent configuration")?;
            let agent = steward_agent::daemon::start(cfg).await.context("starting the agent")?;
            steward_agent::daemon::shutdown_signal().await;
            tracing::info!("shutting down");
            agent.shutdown().await;
            Ok(())
        }
    }
}
