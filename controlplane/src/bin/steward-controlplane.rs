//! `steward-controlplane`: a control-plane node, or the whole development stack.

use std::path::PathBuf;

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
    /// Certificates without a running cluster: create a CA, issue certificates from it
    /// (operators' certificates for stewardctl, or nodes' and hosts' when not using join
    /// tokens), and show what a TLS directory holds.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a cluster CA (ca.pem, ca.key) in DIR, unless one is there. Copy both into the TLS
    /// directory of each initial control-plane node before its first start.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate from the CA in --ca-dir into --out (ca.pem, node.pem, node.key).
    ///
    /// Example, an operator certificate for stewardctl:
    ///   steward-controlplane pki issue --ca-dir /var/lib/steward/controlplane/tls
    ///     --role operator --name alice --out ~/.config/steward/tls
    #[command(verbatim_doc_comment)]
    Issue {
        /// TLS directory holding ca.pem and ca.key (a control-plane node's).
        #[arg(long)]
        ca_dir: PathBuf,
        /// controlplane, agent or operator.
        #[arg(long)]
        role: String,
        /// Node id, host id or operator name.
        #[arg(long)]
        name: String,
        /// DNS name or IP address the holder serves on (repeat); not used for operators.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity, e.g. 90d or 12h.
        #[arg(long, default_value = "90d")]
        lifetime: String,
        /// Output TLS directory (created; an existing certificate there is replaced).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the identity and expiry of the certificate in a TLS directory.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn pki(cmd: PkiCmd) -> anyhow::Result<()> {
    use steward_proto::tls::pki::{ensure_ca, issue_into, read, LeafRequest};
    use steward_proto::tls::{Identity, Role, TlsDir};
    match cmd {
        PkiCmd::InitCa { dir } => {
            let dir = TlsDir(dir);
            if ensure_ca(&dir)? {
                println!("created a cluster CA in {}", dir.0.display());
            } else {
                println!("{} already holds a CA; left as it is", dir.0.display());
            }
        }
        PkiCmd::Issue { ca_dir, role, name, hosts, lifetime, out } => {
            let role = Role::parse(&role)?;
            let lifetime = steward_controlplane::reconcile::backup::parse_interval(&lifetime)
                .map_err(|e| anyhow::anyhow!("--lifetime: {e}"))?;
            anyhow::ensure!(!lifetime.is_zero(), "--lifetime must be longer than 0");
            let req = LeafRequest { identity: Identity::new(role, name), hosts, lifetime };
            issue_into(&TlsDir(ca_dir), &req, &TlsDir(out.clone()))?;
            println!("issued {} into {}", req.identity, out.display());
        }
        PkiCmd::Show { dir } => {
            let dir = TlsDir(dir);
            let identity = dir.identity()?;
            let pem = read(&dir.node_cert())?;
            let until = chrono::DateTime::<chrono::Utc>::from(steward_proto::tls::pki::validity(&pem)?.not_after);
            println!("{identity}, valid until {}", until.to_rfc3339());
            println!("CA key present: {}", dir.ca_key().exists());
        }
    }
    Ok(())
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
        Cmd::Pki(cmd) => pki(cmd),
    }
}
