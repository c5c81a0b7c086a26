//! The `ControlPlane` gRPC service agents call: registration (a Raft write) and heartbeats
//! (kept in memory on the leader; only state transitions become Raft writes).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use steward_proto::tls::Role;
use steward_proto::v1::control_plane_server::ControlPlane;
use steward_proto::v1::{
    HeartbeatReply, HeartbeatRequest, HostFacts, LeaseGrant, RegisterReply, RegisterRequest, RenewCertificateReply,
    RenewCertificateRequest,
};
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
    /// Signs renewed agent certificates.
    pub ca: Arc<crate::pki::CertAuthority>,
}

/// The host id the caller's certificate names: an agent speaks only for itself.
fn caller_host<T>(req: &Request<T>) -> Result<String, Status> {
    match steward_proto::tls::transport::peer_identity(req) {
        Some(id) if id.role == Role::Agent => Ok(id.name.clone()),
        _ => Err(Status::unauthenticated("an agent certificate from the cluster CA is required")),
    }
}

fn same_host(cert_host: &str, facts: &HostFacts) -> Result<(), Status> {
    if cert_host != facts.host_id {
        return Err(Status::permission_denied(format!(
            "this agent's certificate is for host {cert_host}, not {}",
            facts.host_id
        )));
    }
    Ok(())
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
        draining: false,
        revoked_at: None,
    }
}

/// Heartbeat interval of hosts with HA members: failures must be seen within a second.
pub const HA_HEARTBEAT_MS: u32 = 200;

impl AgentFacing {
    /// Leases for the HA primaries this host runs, at the cluster's current epoch.
    async fn grant_leases(&self, host_id: &str, instances: &[steward_proto::v1::InstanceStatus]) -> Vec<LeaseGrant> {
        // A primary failing its write probe (a stuck disk) gets no lease: it fences itself when the
        // current one runs out, and the control plane can then promote a standby.
        let serving: Vec<_> = instances
            .iter()
            .filter(|i| i.running && !i.fenced && !i.in_recovery && i.role == "primary" && i.probe_ok)
            .collect();
        if serving.is_empty() {
            return Vec::new();
        }
        // One indexed query per heartbeat, not one per instance.
        let Ok(led) = query::ha_clusters_led_by(self.node.store.pool(), host_id).await else { return Vec::new() };
        let mut out = Vec::new();
        for i in serving {
            let Some(c) = led.iter().find(|c| c.id == i.cluster_id) else { continue };
            if c.epoch as u64 != i.epoch {
                continue;
            }
            let lease_ms = crate::reconcile::topology::DEFAULT_LEASE_MS;
            self.liveness
                .grant(&c.id, std::time::Instant::now() + std::time::Duration::from_millis(u64::from(lease_ms)));
            out.push(LeaseGrant { cluster_id: c.id.clone(), epoch: i.epoch, lease_ms });
        }
        out
    }

    /// Refuses a revoked host (its open connection may predate the revocation).
    async fn refuse_revoked(&self, host_id: &str) -> Result<(), Status> {
        let host = query::host(self.node.store.pool(), host_id).await.map_err(|e| Status::internal(e.to_string()))?;
        if host.is_some_and(|h| h.revoked_at.is_some()) {
            return Err(Status::permission_denied(format!(
                "host {host_id} is revoked: it may not register, heartbeat or renew its certificate"
            )));
        }
        Ok(())
    }

    async fn has_ha_member(&self, host_id: &str) -> bool {
        query::host_in_ha_cluster(self.node.store.pool(), host_id).await.unwrap_or(false)
    }
}

#[tonic::async_trait]
impl ControlPlane for AgentFacing {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        if !self.node.is_leader() {
            return Err(not_leader(&self.node));
        }
        let cert_host = caller_host(&req)?;
        let facts = req.into_inner().facts.ok_or_else(|| Status::invalid_argument("facts are required"))?;
        validate(&facts)?;
        same_host(&cert_host, &facts)?;
        self.refuse_revoked(&facts.host_id).await?;
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
        let cert_host = caller_host(&req)?;
        let req = req.into_inner();
        let facts = req.facts.ok_or_else(|| Status::invalid_argument("facts are required"))?;
        same_host(&cert_host, &facts)?;
        self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
        let host =
            query::host(self.node.store.pool(), &facts.host_id).await.map_err(|e| Status::internal(e.to_string()))?;
        if host.as_ref().is_some_and(|h| h.revoked_at.is_some()) {
            return Err(Status::permission_denied(format!("host {} is revoked", facts.host_id)));
        }
        let Some(host) = host else {
            return Ok(Response::new(HeartbeatReply {
                known: false,
                heartbeat_interval_ms: self.heartbeat_interval_ms,
                leases: vec![],
            }));
        };
        let instances = req.instances;
        let leases = self.grant_leases(&host.id, &instances).await;
        self.liveness.beat(&host.id, instances);
        if host.state == host_state::DOWN {
            let cmd =
                Command::SetHostState { host_id: host.id.clone(), state: host_state::ACTIVE.into(), at: crate::now() };
            self.node.write(cmd).await.map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::info!(host_id = %host.id, "host is back: marked active");
        }
        let interval = if self.has_ha_member(&host.id).await {
            HA_HEARTBEAT_MS.min(self.heartbeat_interval_ms)
        } else {
            self.heartbeat_interval_ms
        };
        Ok(Response::new(HeartbeatReply { known: true, heartbeat_interval_ms: interval, leases }))
    }

    async fn renew_certificate(
        &self,
        req: Request<RenewCertificateRequest>,
    ) -> Result<Response<RenewCertificateReply>, Status> {
        let host_id = caller_host(&req)?;
        self.refuse_revoked(&host_id).await?;
        let req = req.into_inner();
        if req.hosts.len() > 32 || req.hosts.iter().any(|h| h.len() > 253) {
            return Err(Status::invalid_argument("at most 32 host names of at most 253 characters"));
        }
        let identity = steward_proto::tls::Identity::new(Role::Agent, host_id.clone());
        let (certificate, ca) = self.ca.sign(&req.csr, identity, req.hosts).map_err(Status::invalid_argument)?;
        tracing::info!(host_id = %host_id, "renewed an agent certificate");
        Ok(Response::new(RenewCertificateReply { certificate, ca }))
    }
}
