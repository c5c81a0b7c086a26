//! `steward-controlplane dev`: a single-node control plane and three agents on loopback, each
//! agent with its own data directory and PostgreSQL port, for trying Steward on one machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use steward_proto::tls::pki::{issue_into, LeafRequest};
use steward_proto::tls::{Identity, Role, TlsDir};

use crate::config::NodeConfig;
use crate::raft::node::RaftSettings;
use crate::raft::NodeInfo;

/// Flags of `steward-controlplane dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Where everything lives (control-plane state, agents' PostgreSQL data, admin token).
    #[arg(long, default_value = "./.steward")]
    pub data_dir: PathBuf,
    /// REST port on 127.0.0.1.
    #[arg(long, default_value_t = 7480)]
    pub api_port: u16,
    /// gRPC port on 127.0.0.1 (Raft, agents, stewardctl).
    #[arg(long, default_value_t = 7400)]
    pub grpc_port: u16,
    /// Number of local agents (simulated hosts).
    #[arg(long, default_value_t = 3)]
    pub agents: u16,
    /// First agent's command port; agent N uses this + N - 1.
    #[arg(long, default_value_t = 7411)]
    pub agent_port: u16,
    /// First agent's PostgreSQL port; agent N starts at this + 10 × (N - 1) (each host may run
    /// several instances, on consecutive ports).
    #[arg(long, default_value_t = 55431)]
    pub pg_port: u16,
    /// Memory each agent gives PostgreSQL, in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mb: u64,
}

/// Runs the development stack until Ctrl-C, then stops everything including PostgreSQL.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let run_as = steward_agent::pg::RunAs::detect().context("choosing the OS user for PostgreSQL")?;
    steward_agent::pg::paths::check_traversable(&run_as, &data_dir).with_context(|| {
        format!("PostgreSQL must be able to reach {}; pass --data-dir under /tmp or /var/lib", data_dir.display())
    })?;
    let grpc: SocketAddr = ([127, 0, 0, 1], args.grpc_port).into();
    let api: SocketAddr = ([127, 0, 0, 1], args.api_port).into();
    let info = NodeInfo { grpc_addr: grpc.to_string(), api_addr: api.to_string() };
    let cfg = NodeConfig {
        node_id: 1,
        data_dir: data_dir.join("controlplane"),
        state_dir: crate::config::raft_dir(&data_dir.join("controlplane")),
        grpc_listen: grpc,
        api_listen: api,
        advertise: info.clone(),
        initial_members: BTreeMap::from([(1, info)]),
        admin_token_file: data_dir.join("admin.token"),
        raft: RaftSettings::default(),
        agent_heartbeat_ms: 1000,
        host_down_after: Duration::from_secs(5),
        backup_policy: Default::default(),
        archive_grace: Duration::from_secs(7 * 86_400),
        tls_dir: data_dir.join("controlplane").join("tls"),
        join_token: None,
        join_url: None,
        cert_lifetime: steward_proto::tls::pki::LEAF_LIFETIME,
        rate_limit: 50,
        request_timeout: Duration::from_secs(30),
    };
    let ca_dir = TlsDir(cfg.tls_dir.clone());
    let node = crate::server::start(cfg).await?;
    // Everything speaks TLS in dev too: the node created the CA; agents and the operator get
    // certificates from it here (production hosts join with tokens instead).
    let operator_tls = TlsDir(data_dir.join("operator-tls"));
    issue_once(&ca_dir, &operator_tls, Identity::new(Role::Operator, "dev-operator"))?;
    // The agents run in this process, but PostgreSQL's archive_command needs the steward-agent
    // executable: `make dev` builds it next to this one.
    let archive_exe = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("steward-agent")));
    let archive_exe = archive_exe.filter(|e| e.is_file());
    let repo = data_dir.join("repo");
    match &archive_exe {
        Some(exe) => println!("WAL archive:   {} (archive_command runs {})", repo.display(), exe.display()),
        None => println!("WAL archive:   off (build steward-agent next to this binary to archive WAL)"),
    }
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let listen: SocketAddr = ([127, 0, 0, 1], args.agent_port + i).into();
        let agent_tls = data_dir.join(format!("agent-{}", i + 1)).join("tls");
        issue_once(&ca_dir, &TlsDir(agent_tls.clone()), Identity::new(Role::Agent, format!("dev-host-{}", i + 1)))?;
        let acfg = steward_agent::config::AgentConfig {
            control_plane: vec![grpc.to_string()],
            listen,
            advertise: listen.to_string(),
            data_path: data_dir.join(format!("agent-{}", i + 1)),
            zone: format!("zone-{}", i + 1),
            host_id: Some(format!("dev-host-{}", i + 1)),
            pg_host: "127.0.0.1".into(),
            pg_listen: "127.0.0.1".into(),
            pg_port: args.pg_port + 10 * i,
            memory_budget_bytes: Some(args.memory_mb << 20),
            pg_major: None,
            stop_postgres_on_exit: true,
            repo: archive_exe.as_ref().map(|_| repo.display().to_string()),
            archive_processes: 2,
            archive_exe: archive_exe.clone(),
            tls_dir: agent_tls.clone(),
            join: None,
            metrics_listen: None,
        };
        let agent = steward_agent::daemon::start(acfg).await.with_context(|| format!("starting agent {}", i + 1))?;
        agents.push(agent);
    }
    println!();
    println!("Steward dev stack is running ({} agents, data in {}).", agents.len(), data_dir.display());
    let ca_pem = ca_dir.ca_cert();
    println!("  REST API:    https://{} (CA: {})", node.api_addr, ca_pem.display());
    println!(
        "  gRPC:        {} (stewardctl --server {} --tls-dir {})",
        node.grpc_addr,
        node.grpc_addr,
        operator_tls.0.display()
    );
    println!("  admin token: {}  (also in {})", node.admin_token, data_dir.join("admin.token").display());
    println!();
    println!("Try:");
    println!("  export STEWARD_ADMIN_TOKEN=$(cat {})", data_dir.join("admin.token").display());
    println!("  export STEWARD_TLS_DIR={}", operator_tls.0.display());
    println!("  curl -s --cacert {} -X POST https://{}/v1/teams -H \"Authorization: Bearer $STEWARD_ADMIN_TOKEN\" -H 'Content-Type: application/json' -d '{{\"name\":\"shop\",\"contact\":\"shop@example.com\"}}'", ca_pem.display(), node.api_addr);
    println!("Press Ctrl-C to stop everything (PostgreSQL included).");
    steward_agent::daemon::shutdown_signal().await;
    println!("Stopping agents and PostgreSQL...");
    for a in agents {
        a.shutdown().await;
    }
    node.shutdown().await;
    println!("Stopped.");
    Ok(())
}

/// Issues `identity` a certificate into `out` from the CA in `ca`, unless `out` has one.
fn issue_once(ca: &TlsDir, out: &TlsDir, identity: Identity) -> anyhow::Result<()> {
    if out.has_identity() {
        return Ok(());
    }
    let req = LeafRequest {
        identity,
        hosts: vec!["127.0.0.1".into(), "localhost".into()],
        lifetime: steward_proto::tls::pki::LEAF_LIFETIME,
    };
    issue_into(ca, &req, out).with_context(|| format!("issuing a certificate into {}", out.0.display()))?;
    Ok(())
}
