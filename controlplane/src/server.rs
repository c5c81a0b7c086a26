//! Assembles one control-plane node: Raft over the durable stores, the gRPC server (Raft
//! transport, agent-facing and operator services), the REST server and the reconcilers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use steward_proto::v1::control_plane_server::ControlPlaneServer;
use steward_proto::v1::operator_server::OperatorServer;
use steward_proto::v1::raft_server::RaftServer;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use crate::api::{self, auth, AppState};
use steward_proto::tls::transport::Gate;

use crate::config::NodeConfig;
use crate::grpc;
use crate::grpc::agent_service::AgentFacing;
use crate::grpc::operator::OperatorService;
use crate::metrics::Metrics;
use crate::raft::node::RaftNode;
use crate::raft::service::RaftService;
use crate::reconcile::{self, liveness::Liveness};

/// A started node; `shutdown` stops it.
pub struct RunningNode {
    pub node: Arc<RaftNode>,
    pub admin_token: String,
    pub api_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Reads the admin token from `path`, or creates one there (mode 0600) if the file is missing.
pub fn load_or_create_admin_token(path: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("STEWARD_ADMIN_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => anyhow::bail!(
            "admin token file {} is empty: put a token in it or delete it to generate one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let token = auth::new_token("adm");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating admin token file {}", path.display()))?;
            writeln!(f, "{token}")?;
            f.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading admin token file {}", path.display())),
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Starts every part of a node and returns once its listeners are bound.
pub async fn start(cfg: NodeConfig) -> anyhow::Result<RunningNode> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let admin_token = load_or_create_admin_token(&cfg.admin_token_file)?;
    let admin_token_hash = Arc::new(auth::token_hash(&admin_token));
    let tls = crate::pki::prepare(&cfg).await.context("preparing this node's TLS certificate")?;
    let node =
        RaftNode::start(cfg.node_id, &crate::config::raft_dir(&cfg.data_dir), &cfg.state_dir, &cfg.raft, tls.clone())
            .await
            .context("starting raft")?;
    let ca = Arc::new(crate::pki::CertAuthority::new(tls.dir().clone(), cfg.cert_lifetime));
    let metrics = Arc::new(Metrics::default());
    let liveness = Arc::new(Liveness::default());
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC address {} (is another node running?)", cfg.grpc_listen))?;
    let api_listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("binding REST address {}", cfg.api_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;

    let ctx = reconcile::Ctx::new(
        node.clone(),
        liveness.clone(),
        metrics.clone(),
        cfg.host_down_after,
        cfg.backup_policy,
        cfg.archive_grace,
    );
    let grpc = tonic::transport::Server::builder()
        .add_service(Gate::new(
            RaftServer::new(RaftService::new(node.clone())).max_decoding_message_size(64 << 20),
            grpc::raft_access,
        ))
        .add_service(Gate::new(
            ControlPlaneServer::new(AgentFacing {
                node: node.clone(),
                liveness: liveness.clone(),
                metrics: metrics.clone(),
                heartbeat_interval_ms: cfg.agent_heartbeat_ms,
                ca: ca.clone(),
            }),
            grpc::agent_access,
        ))
        .add_service(Gate::new(
            OperatorServer::new(OperatorService {
                node: node.clone(),
                liveness: liveness.clone(),
                admin_token_hash: admin_token_hash.clone(),
                ctx: ctx.clone(),
                ca: ca.clone(),
            }),
            grpc::operator_access,
        ));
    let grpc_tls = tls.server_config(true, &[b"h2"])?;
    let rx = stop_rx.clone();
    let accepted = metrics.clone();
    tasks.spawn(async move {
        let incoming = steward_proto::tls::transport::incoming(grpc_listener, grpc_tls).map(move |conn| {
            if conn.is_ok() {
                accepted.grpc_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            conn
        });
        if let Err(e) = grpc.serve_with_incoming_shutdown(incoming, wait_stop(rx)).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let app = api::router(AppState {
        node: node.clone(),
        admin_token_hash,
        metrics: metrics.clone(),
        liveness: liveness.clone(),
        ca: ca.clone(),
        limits: Arc::new(api::limits::Limits::new(cfg.rate_limit, cfg.request_timeout)),
        ctx: ctx.clone(),
    });
    let rest_tls = tls.server_config(false, &[b"h2", b"http/1.1"])?;
    let rx = stop_rx.clone();
    tasks.spawn(api::serve::serve(api_listener, rest_tls, app, wait_stop(rx)));

    let rx = stop_rx.clone();
    let (c, t) = (cfg.clone(), tls.clone());
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::pki::maintain(c, t) => {}
            _ = wait_stop(rx) => {}
        }
    });
    let rx = stop_rx.clone();
    let n = node.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::grpc::revocation::follow(n) => {}
            _ = wait_stop(rx) => {}
        }
    });

    let rx = stop_rx.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = reconcile::run(ctx) => {}
            _ = wait_stop(rx) => {}
        }
    });

    // Only the lowest-id initial member initializes the group (calling it on one node is enough,
    // and avoids competing initial elections).
    if let Some((&first, _)) = cfg.initial_members.iter().next() {
        if first == cfg.node_id {
            node.bootstrap(cfg.initial_members.clone()).await.context("initializing the raft group")?;
        }
    }
    tracing::info!(node_id = cfg.node_id, grpc = %grpc_addr, api = %api_addr, "control-plane node started");
    Ok(RunningNode { node, admin_token, api_addr, grpc_addr, stop, tasks })
}

impl RunningNode {
    /// Stops the servers and Raft.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.node.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => { self.tasks.abort_all(); break }
            }
        }
    }
}
