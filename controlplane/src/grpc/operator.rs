//! The operator gRPC service behind `stewardctl`: Raft status and membership, hosts, clusters,
//! databases and operations. Authenticated with the admin token; membership changes are
//! forwarded to the leader.

use std::collections::BTreeSet;
use std::sync::Arc;

use openraft::ChangeMembers;
use steward_proto::v1::operator_client::OperatorClient;
use steward_proto::v1::operator_server::Operator;
use steward_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::api::auth::token_hash;
use crate::raft::node::RaftNode;
use crate::raft::NodeInfo;
use crate::reconcile::liveness::Liveness;
use crate::state::model::token_scope;
use crate::state::query;

/// Serves operators.
pub struct OperatorService {
    pub node: Arc<RaftNode>,
    pub liveness: Arc<Liveness>,
    pub admin_token_hash: Arc<String>,
    /// Reconciler context, for operator actions that drive agents (switchover).
    pub ctx: Arc<crate::reconcile::Ctx>,
    /// For join tokens, which pin the CA's fingerprint.
    pub ca: Arc<crate::pki::CertAuthority>,
}

fn bearer<T>(req: &Request<T>) -> Result<String, Status> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Status::unauthenticated("missing 'authorization: Bearer <admin or operator token>' metadata"))
}

fn members(node: &RaftNode) -> Vec<RaftMember> {
    let m = node.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| RaftMember {
            id: *id,
            grpc_addr: n.grpc_addr.clone(),
            api_addr: n.api_addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl OperatorService {
    /// A host as operators see it: state (active, draining, down), last heartbeat, databases.
    /// A host as operators see it, with the number of live databases it carries.
    fn host_info(&self, h: crate::state::model::Host, databases: i64) -> HostInfo {
        HostInfo {
            last_heartbeat: self.liveness.get(&h.id).map(|s| s.wall).unwrap_or_default(),
            state: h.shown_state().to_string(),
            drain_note: if h.draining { self.ctx.drain_note(&h.id) } else { String::new() },
            databases: u32::try_from(databases.max(0)).unwrap_or(u32::MAX),
            id: h.id,
            hostname: h.hostname,
            agent_addr: h.agent_addr,
            zone: h.zone,
            cores: h.cores as u32,
            memory_bytes: h.memory_bytes as u64,
            disk_free_bytes: h.disk_free_bytes as u64,
            pg_host: h.pg_host,
            pg_port: h.pg_port as u32,
        }
    }

    /// Checks the bearer token: the admin token, or an admin or operator token that is not
    /// revoked. Returns it (calls forwarded to the leader carry it on).
    async fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = bearer(req)?;
        let hash = token_hash(&token);
        if hash == *self.admin_token_hash {
            return Ok(token);
        }
        let pool = self.node.store.pool();
        let mut found = query::token_by_hash(pool, &hash).await.map_err(internal)?;
        if found.is_none() {
            self.read().await?;
            found = query::token_by_hash(pool, &hash).await.map_err(internal)?;
        }
        match found {
            Some(t) if t.scope == token_scope::ADMIN || t.scope == token_scope::OPERATOR => Ok(token),
            Some(_) => Err(Status::permission_denied("team tokens cannot use the operator API")),
            None => Err(Status::unauthenticated("unknown or revoked token")),
        }
    }

    /// Writes a command about one host (drain, revoke); an unknown host is NOT_FOUND.
    async fn change_host(&self, cmd: crate::state::Command) -> Result<(), Status> {
        match self.node.write(cmd).await.map_err(|e| Status::unavailable(e.to_string()))? {
            crate::state::Response::Done => Ok(()),
            crate::state::Response::NotFound { message } => {
                Err(Status::not_found(format!("{message} (see stewardctl hosts)")))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    /// A host as operators see it, after a change.
    async fn host_reply(&self, host_id: &str) -> Result<Response<HostInfo>, Status> {
        let h = query::host(self.node.store.pool(), host_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("host {host_id} is not registered")))?;
        let pool = self.node.store.pool();
        let databases = query::live_databases_on_host(pool, host_id).await.map_err(internal)?.len();
        Ok(Response::new(self.host_info(h, i64::try_from(databases).unwrap_or(i64::MAX))))
    }

    async fn read(&self) -> Result<(), Status> {
        self.node.linearizable_read().await.map_err(|e| Status::unavailable(e.to_string()))
    }

    async fn leader_client(&self) -> Result<OperatorClient<tonic::transport::Channel>, Status> {
        let (_, info) = self.node.leader().ok_or_else(|| Status::unavailable("no leader is known; retry shortly"))?;
        Ok(OperatorClient::new(self.node.peers.get(&info.grpc_addr).map_err(internal)?))
    }

    fn forwarded<T>(token: &str, msg: T) -> Result<Request<T>, Status> {
        let mut req = Request::new(msg);
        let v = format!("Bearer {token}").parse().map_err(|_| Status::internal("token not representable"))?;
        req.metadata_mut().insert("authorization", v);
        Ok(req)
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn raft_status(&self, req: Request<RaftStatusRequest>) -> Result<Response<RaftStatusReply>, Status> {
        self.authorize(&req).await?;
        let m = self.node.raft.metrics().borrow().clone();
        Ok(Response::new(RaftStatusReply {
            node_id: self.node.id,
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            state: format!("{:?}", m.state),
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            members: members(&self.node),
            snapshots_installed: self.node.stats.snapshots_installed.load(std::sync::atomic::Ordering::Relaxed),
            first_log_index: self.node.log.first_index().await.unwrap_or(0),
        }))
    }

    async fn add_node(&self, req: Request<AddNodeRequest>) -> Result<Response<MembershipReply>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if r.id == 0 || r.grpc_addr.is_empty() || r.api_addr.is_empty() {
            return Err(Status::invalid_argument("id (> 0), grpc_addr and api_addr are required"));
        }
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.add_node(Self::forwarded(&token, r)?).await;
        }
        let info = NodeInfo { grpc_addr: r.grpc_addr.clone(), api_addr: r.api_addr.clone() };
        self.node
            .raft
            .add_learner(r.id, info, true)
            .await
            .map_err(|e| Status::failed_precondition(format!("adding node {} as learner: {e}", r.id)))?;
        let mut voters: BTreeSet<u64> =
            self.node.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(r.id);
        self.node
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(|e| Status::failed_precondition(format!("promoting node {} to voter: {e}", r.id)))?;
        tracing::info!(node = r.id, grpc = %r.grpc_addr, "control-plane node added");
        Ok(Response::new(MembershipReply { members: members(&self.node) }))
    }

    async fn remove_node(&self, req: Request<RemoveNodeRequest>) -> Result<Response<MembershipReply>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.remove_node(Self::forwarded(&token, r)?).await;
        }
        let membership = self.node.raft.metrics().borrow().membership_config.membership().clone();
        if membership.get_node(&r.id).is_none() {
            return Err(Status::not_found(format!("node {} is not a member", r.id)));
        }
        let voters: BTreeSet<u64> = membership.voter_ids().filter(|v| *v != r.id).collect();
        if voters.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last voter"));
        }
        self.node
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(|e| Status::failed_precondition(format!("removing node {}: {e}", r.id)))?;
        let mut gone = BTreeSet::new();
        gone.insert(r.id);
        if let Err(e) = self.node.raft.change_membership(ChangeMembers::RemoveNodes(gone), false).await {
            tracing::warn!(node = r.id, error = %e, "node left the voters but is still listed as learner");
        }
        tracing::info!(node = r.id, "control-plane node removed");
        Ok(Response::new(MembershipReply { members: members(&self.node) }))
    }

    async fn list_hosts(&self, req: Request<ListHostsRequest>) -> Result<Response<ListHostsReply>, Status> {
        let token = self.authorize(&req).await?;
        // Heartbeats reach the leader only: it alone knows when each host was last heard.
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.list_hosts(Self::forwarded(&token, req.into_inner())?).await;
        }
        self.read().await?;
        // Two queries whatever the fleet's size (one per host took seconds at 1,000 hosts).
        let pool = self.node.store.pool();
        let hosts = query::hosts(pool).await.map_err(internal)?;
        let counts: std::collections::HashMap<String, i64> =
            query::live_database_counts_by_host(pool).await.map_err(internal)?.into_iter().collect();
        let hosts = hosts
            .into_iter()
            .map(|h| {
                let databases = counts.get(&h.id).copied().unwrap_or(0);
                self.host_info(h, databases)
            })
            .collect();
        Ok(Response::new(ListHostsReply { hosts }))
    }

    async fn list_clusters(&self, req: Request<ListClustersRequest>) -> Result<Response<ListClustersReply>, Status> {
        let token = self.authorize(&req).await?;
        // Members' observed state (running, recovery, LSNs) comes from heartbeats, which only the
        // leader receives: a follower would report every member stopped.
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.list_clusters(Self::forwarded(&token, req.into_inner())?).await;
        }
        self.read().await?;
        let pool = self.node.store.pool();
        let counts = query::database_counts(pool).await.map_err(internal)?;
        let mut clusters = Vec::new();
        for c in query::clusters(pool).await.map_err(internal)? {
            let observed = |host: &str| self.liveness.instance(host, &c.id).1;
            let primary_lsn = observed(&c.primary_host).map(|i| i.received_lsn).unwrap_or(0);
            let members = query::members(pool, &c.id)
                .await
                .map_err(internal)?
                .into_iter()
                .map(|m| {
                    let o = observed(&m.host_id).unwrap_or_default();
                    MemberInfo {
                        lag_bytes: if m.host_id == c.primary_host {
                            0
                        } else {
                            primary_lsn.saturating_sub(o.replayed_lsn)
                        },
                        host_id: m.host_id,
                        port: m.port as u32,
                        role: m.role,
                        state: m.state,
                        running: o.running,
                        in_recovery: o.in_recovery,
                        timeline: o.timeline,
                        received_lsn: o.received_lsn,
                        replayed_lsn: o.replayed_lsn,
                        fenced: o.fenced,
                    }
                })
                .collect();
            clusters.push(ClusterInfo {
                databases: counts.iter().find(|(id, _)| id == &c.id).map(|(_, n)| *n as u32).unwrap_or(0),
                id: c.id,
                pg_major: c.pg_major as u32,
                primary_host: c.primary_host,
                epoch: c.epoch as u64,
                port: c.port as u32,
                state: c.state,
                availability: c.availability,
                members,
            });
        }
        Ok(Response::new(ListClustersReply { clusters }))
    }

    async fn list_databases(&self, req: Request<ListDatabasesRequest>) -> Result<Response<ListDatabasesReply>, Status> {
        self.authorize(&req).await?;
        self.read().await?;
        let dbs = query::all_databases(self.node.store.pool()).await.map_err(internal)?;
        let databases = dbs
            .into_iter()
            .map(|d| DatabaseInfo {
                id: d.id,
                name: d.name,
                owner: d.owner,
                state: d.state,
                cluster_id: d.cluster_id,
                availability: d.availability,
                created_at: d.created_at,
            })
            .collect();
        Ok(Response::new(ListDatabasesReply { databases }))
    }

    async fn switchover(&self, req: Request<SwitchoverRequest>) -> Result<Response<SwitchoverReply>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.switchover(Self::forwarded(&token, r)?).await;
        }
        let target = (!r.target_host.is_empty()).then_some(r.target_host.as_str());
        match crate::reconcile::switchover::run(&self.ctx, &r.cluster_id, target).await {
            Ok(s) => Ok(Response::new(SwitchoverReply {
                old_primary: s.old_primary,
                new_primary: s.new_primary,
                epoch: s.epoch,
                write_pause_ms: s.write_pause.as_millis() as u64,
            })),
            Err(crate::reconcile::switchover::SwitchoverError::Refused(m)) => Err(Status::failed_precondition(m)),
            Err(crate::reconcile::switchover::SwitchoverError::Failed(m)) => Err(Status::aborted(m)),
        }
    }

    async fn get_operation(&self, req: Request<GetOperationRequest>) -> Result<Response<OperationInfo>, Status> {
        self.authorize(&req).await?;
        self.read().await?;
        let id = req.into_inner().id;
        let op = query::operation(self.node.store.pool(), &id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("operation {id} does not exist")))?;
        Ok(Response::new(operation_info(op)))
    }

    async fn list_operations(
        &self,
        req: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsReply>, Status> {
        self.authorize(&req).await?;
        self.read().await?;
        let r = req.into_inner();
        let state = (!r.state.is_empty()).then_some(r.state.as_str());
        let kind = (!r.kind.is_empty()).then_some(r.kind.as_str());
        let limit = if r.limit == 0 { 100 } else { i64::from(r.limit.min(10_000)) };
        let ops = query::recent_operations(self.node.store.pool(), state, kind, limit).await.map_err(internal)?;
        Ok(Response::new(ListOperationsReply { operations: ops.into_iter().map(operation_info).collect() }))
    }

    async fn start_backup(&self, req: Request<StartBackupRequest>) -> Result<Response<OperationInfo>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.start_backup(Self::forwarded(&token, r)?).await;
        }
        let kind = match r.kind.as_str() {
            "" | "incr" => "incr",
            "full" => "full",
            other => return Err(Status::invalid_argument(format!("kind '{other}' is not 'full' or 'incr'"))),
        };
        self.read().await?;
        let pool = self.node.store.pool();
        if query::cluster(pool, &r.cluster_id).await.map_err(internal)?.is_none() {
            return Err(Status::not_found(format!(
                "cluster {} does not exist (see stewardctl clusters)",
                r.cluster_id
            )));
        }
        let retention = query::databases_in_cluster(pool, &r.cluster_id)
            .await
            .map_err(internal)?
            .iter()
            .map(|d| d.backup_retention_days)
            .max()
            .unwrap_or(0);
        let id = crate::reconcile::backup::start(&self.ctx, &r.cluster_id, kind, retention, "operator")
            .await
            .map_err(Status::failed_precondition)?;
        let op = query::operation(pool, &id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::internal("the backup operation vanished"))?;
        Ok(Response::new(operation_info(op)))
    }

    async fn list_audit(&self, req: Request<ListAuditRequest>) -> Result<Response<ListAuditReply>, Status> {
        self.authorize(&req).await?;
        self.read().await?;
        let r = req.into_inner();
        let target = (!r.target.is_empty()).then_some(r.target.as_str());
        let limit = if r.limit == 0 { 100 } else { i64::from(r.limit.min(10_000)) };
        let rows = query::audit(self.node.store.pool(), target, limit).await.map_err(internal)?;
        Ok(Response::new(ListAuditReply { entries: rows.into_iter().map(audit_entry).collect() }))
    }

    async fn move_database(&self, req: Request<MoveDatabaseRequest>) -> Result<Response<MoveDatabaseReply>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.move_database(Self::forwarded(&token, r)?).await;
        }
        if r.database_id.is_empty() {
            return Err(Status::invalid_argument("database_id is required (see stewardctl databases)"));
        }
        self.read().await?;
        let to = (!r.target_cluster_id.is_empty()).then_some(r.target_cluster_id.as_str());
        let started = crate::reconcile::moves::start(&self.ctx, &r.database_id, to, "operator", r.check_only)
            .await
            .map_err(start_error)?;
        let operation = match &started.operation_id {
            Some(id) => query::operation(self.node.store.pool(), id).await.map_err(internal)?.map(operation_info),
            None => None,
        };
        Ok(Response::new(MoveDatabaseReply {
            operation,
            target_cluster_id: started.target_cluster_id,
            problems: started.problems,
        }))
    }

    async fn abort_move(&self, req: Request<AbortMoveRequest>) -> Result<Response<OperationInfo>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.abort_move(Self::forwarded(&token, r)?).await;
        }
        self.read().await?;
        let id = crate::reconcile::moves::abort(&self.ctx, &r.database_id, "operator").await.map_err(start_error)?;
        let op = query::operation(self.node.store.pool(), &id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::internal("the move's operation vanished"))?;
        Ok(Response::new(operation_info(op)))
    }

    async fn drain_host(&self, req: Request<DrainHostRequest>) -> Result<Response<HostInfo>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.drain_host(Self::forwarded(&token, r)?).await;
        }
        let cmd = crate::state::Command::SetHostDraining {
            host_id: r.host_id.clone(),
            draining: !r.undrain,
            at: crate::now(),
            actor: "operator".into(),
        };
        self.change_host(cmd).await?;
        if !r.undrain {
            self.ctx.set_drain_note(&r.host_id, "starting");
        }
        self.host_reply(&r.host_id).await
    }

    async fn list_backups(&self, req: Request<ListBackupsRequest>) -> Result<Response<ListBackupsReply>, Status> {
        self.authorize(&req).await?;
        self.read().await?;
        let r = req.into_inner();
        let cluster = (!r.cluster_id.is_empty()).then_some(r.cluster_id.as_str());
        let limit = if r.limit == 0 { 100 } else { i64::from(r.limit.min(10_000)) };
        let rows = query::backups(self.node.store.pool(), cluster, limit).await.map_err(internal)?;
        let backups = rows
            .into_iter()
            .map(|b| BackupInfo {
                operation_id: b.operation_id,
                cluster_id: b.cluster_id,
                kind: b.kind,
                kind_taken: b.kind_taken,
                requested_by: b.requested_by,
                retention_days: u32::try_from(b.retention_days).unwrap_or(0),
                state: b.state,
                host_id: b.host_id,
                from_standby: b.from_standby,
                label: b.label,
                size_bytes: u64::try_from(b.size_bytes).unwrap_or(0),
                stored_bytes: u64::try_from(b.stored_bytes).unwrap_or(0),
                stop_lsn: b.stop_lsn,
                error: b.error,
                created_at: b.created_at,
                finished_at: b.finished_at,
            })
            .collect();
        Ok(Response::new(ListBackupsReply { backups }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenReply>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        let role = steward_proto::tls::Role::parse(&r.role).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if role == steward_proto::tls::Role::Operator {
            return Err(Status::invalid_argument(
                "join tokens are for agents and control-plane nodes; issue operator certificates with `steward-controlplane pki issue`",
            ));
        }
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.create_join_token(Self::forwarded(&token, r)?).await;
        }
        let ttl = if r.ttl_seconds == 0 { 3600 } else { r.ttl_seconds.min(30 * 86_400) };
        let fingerprint = self.ca.fingerprint().map_err(internal)?;
        let join = steward_proto::tls::join::JoinToken::generate(&fingerprint).map_err(internal)?;
        let now = chrono::Utc::now();
        let expires_at = (now + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(3600)))
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let cmd = crate::state::Command::AddJoinToken {
            hash: join.hash(),
            role: role.to_string(),
            expires_at: expires_at.clone(),
            at: crate::now(),
            actor: "operator".into(),
        };
        self.node.write(cmd).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(CreateJoinTokenReply { token: join.to_string(), expires_at }))
    }

    async fn revoke_host(&self, req: Request<RevokeHostRequest>) -> Result<Response<HostInfo>, Status> {
        let token = self.authorize(&req).await?;
        let r = req.into_inner();
        if !self.node.is_leader() {
            let mut c = self.leader_client().await?;
            return c.revoke_host(Self::forwarded(&token, r)?).await;
        }
        let cmd = crate::state::Command::RevokeHost {
            host_id: r.host_id.clone(),
            at: crate::now(),
            actor: "operator".into(),
        };
        self.change_host(cmd).await?;
        tracing::warn!(host_id = %r.host_id, "host revoked");
        self.host_reply(&r.host_id).await
    }
}

fn start_error(e: crate::reconcile::moves::StartError) -> Status {
    use crate::reconcile::moves::StartError;
    match e {
        StartError::NotFound(m) => Status::not_found(m),
        StartError::Refused(m) => Status::failed_precondition(m),
        StartError::Unavailable(m) => Status::unavailable(m),
    }
}

fn audit_entry(a: query::AuditEntry) -> AuditEntry {
    AuditEntry { seq: a.seq, at: a.at, actor: a.actor, action: a.action, target: a.target, outcome: a.outcome }
}

fn operation_info(op: crate::state::model::Operation) -> OperationInfo {
    OperationInfo {
        id: op.id,
        kind: op.kind,
        database_id: op.database_id,
        state: op.state,
        step: op.step,
        attempts: u32::try_from(op.attempts).unwrap_or(0),
        error: op.error,
        created_at: op.created_at,
        updated_at: op.updated_at,
        detail: op.detail,
    }
}
