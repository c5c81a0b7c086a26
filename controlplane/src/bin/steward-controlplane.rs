//! `steward-controlplane`: a control-plane node, or the whole development stack.

use anyhow::Context;
use clap::{Parser, Subcommand};
use steward_controlplane::config::NodeArgs;
use steward_controlplane::dev::DevArgs;

/// Steward control plane: Raft-replicated database inventory, REST API for product teams,
/// gRPC for agents and operators.
#[derive(Parser)]
#[command(name = "steward-controlplane", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one control-plane node.
    ///
    /// Three-node example (same --initial-member list on every node, its own --node-id each):
    ///   steward-controlplane run --node-id 1 --data-dir /var/lib/steward/controlplane
    ///     --grpc-listen 10.0.0.1:7400 --api-listen 10.0.0.1:7480
    ///     --initial-member 1=10.0.0.1:7400,10.0.0.1:7480
    ///     --initial-member 2=10.0.0.2:7400,10.0.0.2:7480
    ///     --initial-member 3=10.0.0.3:7400,10.0.0.3:7480
    #[command(verbatim_doc_comment)]
    Run(Box<NodeArgs>),
    /// Run a single-node control plane with three local agents on loopback (development).
    Dev(DevArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // Colour only on a terminal: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sqlx=warn,h2=warn,tower=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Run(args) => {
            let cfg = (*args).resolve().context("invalid configuration")?;
            let node = steward_controlplane::server::start(cfg).await?;
            steward_agent::daemon::shutdown_signal().await;
            tracing::info!("shutting down");
            node.shutdown().await;
            Ok(())
        }
        Cmd::Dev(args) => steward_controlplane::dev::run(args).await,
    }
}
