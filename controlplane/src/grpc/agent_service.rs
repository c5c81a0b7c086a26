//! The `ControlPlane` gRPC service agents call: registration (a Raft write) and heartbeats
//! (kept in memory on the leader; only state transitions become Raft writes).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use steward_proto::v1::control_plane_server::ControlPlane;
use steward_proto::v1::{HeartbeatReply, HeartbeatRequest, HostFacts, RegisterReply, RegisterRequest};
use tonic::{Request, Response, Status};

use super::not_leader;
use crate::metrics::Metrics;
use crate::raft::node::RaftNode;
use crate::reconcile::liveness::Liveness;
use crate::state::model::{host_state, Host};
use crate::state::{query, Command};

/// Serves agents.
pub struct AgentFacing {
    pub node: Arc<RaftNode>,
    pub liveness: Arc<Liveness>,
    pub metrics: Arc<Metrics>,
    pub heartbeat_interval_ms: u32,
}

fn validate(f: &HostFacts) -> Result<(), Status> {
    let ok = |s: &str| !s.is_empty() && s.len() <= 256;
    if !ok(&f.host_id) || !f.host_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Status::invalid_argument("host_id must be 1-256 characters of letters, digits, '-' and '_'"));
    }
    if !ok(&f.agent_addr) || !ok(&f.pg_host) || f.pg_port == 0 || f.pg_port > 65535 {
        return Err(Status::invalid_argument("agent_addr, pg_host and pg_port (1-65535) are required"));
    }
    Ok(())
}

fn host_from(f: &HostFacts, at: &str) -> Host {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Host {
        id: f.host_id.clone(),
        hostname: f.hostname.clone(),
        agent_addr: f.agent_addr.clone(),
        zone: f.zone.clone(),
        cores: i64::from(f.cores),
        memory_bytes: clamp(f.memory_bytes),
        memory_budget_bytes: clamp(f.memory_budget_bytes),
        disk_free_bytes: clamp(f.disk_free_bytes),
        disk_total_bytes: clamp(f.disk_total_bytes),
        data_path: f.data_path.clone(),
        agent_version: f.agent_version.clone(),
        pg_major: i64::from(f.pg_major),
        pg_host: f.pg_host.clone(),
        pg_port: i64::from(f.pg_port),
        state: host_state::ACTIVE.into(),
        registered_at: at.to_string(),
        state_changed_at: at.to_string(),
    }
}

#[tonic::async_trait]
impl ControlPlane for AgentFacing {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        if !self.node.is_leader() {
            return Err(not_leader(&self.node));
        }
        let facts = req.into_inner().facts.ok_or_else(|| Status::invalid_argument("facts are required"))?;
        validate(&facts)?;
        let at = crate::now();
        let mut host = host_from(&facts, &at);
        if let Ok(Some(existing)) = query::host(self.node.store.pool(), &facts.host_id).await {
            host.registered_at = existing.registered_at;
        }
        self.node.write(Command::UpsertHost { host }).await.map_err(|e| Status::unavailable(e.to_string()))?;
        self.liveness.beat(&facts.host_id, Vec::new());
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(host_id = %facts.host_id, agent = %facts.agent_addr, zone = %facts.zone, "host registered");
        Ok(Response::new(RegisterReply { host_id: facts.host_id, heartbeat_interval_ms: self.heartbeat_interval_ms }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        if !self.node.is_leader() {
            return Err(not_leader(&self.node));
        }
        let req = req.into_inner();
        let facts = req.facts.ok_or_else(|| Status::invalid_argument("facts are required"))?;
        self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
        let host =
            query::host(self.node.store.pool(), &facts.host_id).await.map_err(|e| Status::internal(e.to_string()))?;
        let Some(host) = host else {
            return Ok(Response::new(HeartbeatReply {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval_ms,
            }));
        };
        self.liveness.beat(&host.id, req.instances);
        if host.state == host_state::DOWN {
            let cmd =
                Command::SetHostState { host_id: host.id.clone(), state: host_state::ACTIVE.into(), at: crate::now() };
            self.node.write(cmd).await.map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::info!(host_id = %host.id, "host is back: marked active");
        }
        Ok(Response::new(HeartbeatReply { known: true, heartbeat_interval_ms: self.heartbeat_interval_ms }))
    }
}
