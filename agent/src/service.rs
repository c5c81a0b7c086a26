//! The agent's gRPC command service: idempotent, epoch-checked commands from the control
//! plane, and peer-lease requests from the primary's agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::agent_server::Agent;
use steward_proto::v1::{
    AgentStatusReply, AgentStatusRequest, ArchiveDatabaseReply, ArchiveDatabaseRequest, BackupReply, BackupRequest,
    DeleteArchiveReply, DeleteArchiveRequest, EnsureDatabaseReply, EnsureDatabaseRequest, EnsureInstanceReply,
    EnsureInstanceRequest, FenceReply, FenceRequest, LoadArchiveReply, LoadArchiveRequest, MoveSourceReply,
    MoveSourceRequest, MoveSourceStep, MoveTargetReply, MoveTargetRequest, MoveTargetStep, PeerLeaseReply,
    PeerLeaseRequest, PromoteReply, PromoteRequest, RestoreDatabaseReply, RestoreDatabaseRequest, SwitchWalReply,
    SwitchWalRequest,
};
use tonic::{Request, Response, Status};

use crate::backup::manifest::BackupKind;
use crate::host::{Host, Refusal};
use crate::lease::{may_grant, PeerPromise};
use crate::state::ClusterRecord;

fn valid_cluster_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Status::invalid_argument("cluster_id must be 1-128 letters, digits, '-' or '_'"));
    }
    Ok(())
}

/// Operation and database ids name scratch directories and repository keys.
fn valid_operation_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(Status::invalid_argument("operation and database ids must be 1-64 letters, digits or '-'"));
    }
    Ok(())
}

fn move_status(e: crate::tasks::moves::MoveError) -> Status {
    match e {
        crate::tasks::moves::MoveError::Refused(m) => Status::aborted(m),
        crate::tasks::moves::MoveError::Failed(m) => Status::internal(m),
    }
}

fn refusal(e: Refusal) -> Status {
    match e {
        Refusal::StaleEpoch { .. } | Refusal::NotAllowed(_) | Refusal::Unknown(_) => {
            Status::failed_precondition(e.to_string())
        }
        Refusal::PortTaken { .. } => Status::already_exists(e.to_string()),
        Refusal::State(_) | Refusal::Pg(_) => Status::internal(e.to_string()),
    }
}

fn record_from(r: &EnsureInstanceRequest, port: u16) -> Result<ClusterRecord, Status> {
    let role = match r.role.as_str() {
        "" | "primary" => "primary",
        "standby" => "standby",
        other => return Err(Status::invalid_argument(format!("role '{other}' is not 'primary' or 'standby'"))),
    };
    let upstream_port =
        u16::try_from(r.upstream_port).map_err(|_| Status::invalid_argument("upstream_port out of range"))?;
    if role == "standby" && (r.upstream_host.is_empty() || upstream_port == 0 || r.slot_name.is_empty()) {
        return Err(Status::invalid_argument("a standby needs upstream_host, upstream_port and slot_name"));
    }
    Ok(ClusterRecord {
        epoch: r.epoch,
        port,
        pg_major: r.pg_major,
        role: role.into(),
        member_name: r.member_name.clone(),
        upstream_host: r.upstream_host.clone(),
        upstream_port,
        replication_password: r.replication_password.clone(),
        synchronous_standby_names: r.synchronous_standby_names.clone(),
        slots: r.slots.clone(),
        slot_name: r.slot_name.clone(),
        peer_agents: r.peer_agents.clone(),
        lease_ms: r.lease_ms,
        fenced: false,
    })
}

/// The tonic service.
pub struct AgentService {
    pub host: Arc<Host>,
}

impl AgentService {
    /// The backup repository this agent was started with.
    fn repo(&self) -> Result<String, Status> {
        self.host
            .archiving
            .as_ref()
            .map(|a| a.repo.clone())
            .ok_or_else(|| Status::failed_precondition("this agent has no backup repository: start it with --repo"))
    }

    /// One side of a move on this host's serving primary, after checking the request's names.
    async fn move_side(
        &self,
        cluster_id: &str,
        epoch: u64,
        operation_id: &str,
        database: &str,
        role: &str,
    ) -> Result<crate::tasks::moves::MoveSide, Status> {
        valid_cluster_id(cluster_id)?;
        valid_operation_id(operation_id)?;
        for (what, name) in [("database", database), ("role", role)] {
            crate::pg::sql::validate_identifier(what, name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let inst = self.serving_primary(cluster_id, epoch).await?;
        Ok(crate::tasks::moves::MoveSide {
            inst,
            operation_id: operation_id.to_string(),
            database: database.to_string(),
            role: role.to_string(),
            work_dir: crate::tasks::moves::work_dir(&self.host.cfg.data_path, operation_id),
        })
    }

    /// This host's running primary of the cluster at `epoch` (refusing older epochs).
    async fn serving_primary(&self, cluster_id: &str, epoch: u64) -> Result<Arc<crate::pg::Instance>, Status> {
        let rec = self.host.admit(cluster_id, epoch, None).await.map_err(refusal)?;
        if !rec.is_primary() || rec.fenced {
            return Err(Status::failed_precondition("this member is not a serving primary"));
        }
        let inst = self.host.instance(cluster_id, &rec).await.map_err(|e| Status::internal(e.to_string()))?;
        if !inst.is_running().await {
            return Err(Status::failed_precondition(format!("PostgreSQL of cluster {cluster_id} is not running here")));
        }
        Ok(inst)
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ensure_instance(
        &self,
        req: Request<EnsureInstanceRequest>,
    ) -> Result<Response<EnsureInstanceReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument("port must be 1-65535"))?;
        let wanted = record_from(&r, port)?;
        let current = self.host.state.lock().await.clusters.get(&r.cluster_id).cloned();
        // A fenced primary at the same epoch stays down: only a newer epoch may restart it.
        if let Some(c) = &current {
            if c.fenced && c.epoch == r.epoch && wanted.is_primary() {
                return Err(Status::failed_precondition(format!(
                    "cluster {} is fenced on this host at epoch {}: send a newer epoch",
                    r.cluster_id, r.epoch
                )));
            }
        }
        // Hold the instance lock from admitting the record until the instance runs: the monitor
        // must never see a new primary's record as "not running and nobody working on it" and
        // fence it before its initdb even started.
        let ops = self.host.ops.lock().await;
        let rec = self.host.admit(&r.cluster_id, r.epoch, Some(wanted)).await.map_err(refusal)?;
        tracing::info!(cluster = %r.cluster_id, epoch = r.epoch, port, role = %rec.role, "ensure instance");
        let (inst, initialized) =
            self.host.apply_locked(&r.cluster_id, &rec).await.map_err(|e| Status::internal(e.to_string()))?;
        drop(ops);
        if rec.is_primary() && rec.lease_ms > 0 {
            // The control plane just asked for this primary: count that as a grant.
            let mut rt = self.host.runtime.lock().await;
            rt.entry(r.cluster_id.clone())
                .or_default()
                .lease
                .granted(Instant::now(), Duration::from_millis(u64::from(rec.lease_ms)));
        }
        let mut status =
            self.host.statuses().await.into_iter().find(|s| s.cluster_id == r.cluster_id).unwrap_or_default();
        status.running = inst.is_running().await;
        Ok(Response::new(EnsureInstanceReply { status: Some(status), initialized }))
    }

    async fn ensure_database(
        &self,
        req: Request<EnsureDatabaseRequest>,
    ) -> Result<Response<EnsureDatabaseReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        let rec = self.host.admit(&r.cluster_id, r.epoch, None).await.map_err(refusal)?;
        if !rec.is_primary() || rec.fenced {
            return Err(Status::failed_precondition("this member is not a serving primary"));
        }
        let inst = self.host.instance(&r.cluster_id, &rec).await.map_err(|e| Status::internal(e.to_string()))?;
        if !inst.is_running().await {
            self.host.apply(&r.cluster_id, &rec).await.map_err(|e| Status::internal(e.to_string()))?;
        }
        tracing::info!(cluster = %r.cluster_id, database = %r.database, role = %r.role, "ensure database");
        let created = inst
            .ensure_database(&r.database, &r.role, &r.password_scram)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(EnsureDatabaseReply { created }))
    }

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<BackupReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        if r.operation_id.is_empty() || r.operation_id.len() > 128 {
            return Err(Status::invalid_argument("operation_id must be 1-128 characters"));
        }
        let kind = match r.kind.as_str() {
            "full" => BackupKind::Full,
            "incr" => BackupKind::Incr,
            other => return Err(Status::invalid_argument(format!("kind '{other}' is not 'full' or 'incr'"))),
        };
        let archiving =
            self.host.archiving.clone().ok_or_else(|| {
                Status::failed_precondition("this agent has no backup repository: start it with --repo")
            })?;
        let rec = self.host.admit(&r.cluster_id, r.epoch, None).await.map_err(refusal)?;
        if rec.fenced {
            return Err(Status::failed_precondition(format!("cluster {} is fenced on this host", r.cluster_id)));
        }
        let inst = self.host.instance(&r.cluster_id, &rec).await.map_err(|e| Status::internal(e.to_string()))?;
        if !inst.is_running().await {
            return Err(Status::failed_precondition(format!(
                "PostgreSQL of cluster {} is not running on this host",
                r.cluster_id
            )));
        }
        // A standby's backup asks its primary to switch WAL, with the replication role.
        let primary = (!rec.is_primary()).then(|| crate::pg::Upstream {
            host: rec.upstream_host.clone(),
            port: rec.upstream_port,
            password: rec.replication_password.clone(),
        });
        tracing::info!(cluster = %r.cluster_id, op = %r.operation_id, kind = %r.kind, from_standby = primary.is_some(),
            "backup requested");
        let job = crate::tasks::run_backup(inst, archiving, r.cluster_id.clone(), kind, primary, r.retention_days);
        let reply = self.host.backups.run(&r.operation_id, job).await.map_err(Status::internal)?;
        Ok(Response::new(reply))
    }

    async fn switch_wal(&self, req: Request<SwitchWalRequest>) -> Result<Response<SwitchWalReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        let inst = self.serving_primary(&r.cluster_id, r.epoch).await?;
        let archived_segment =
            crate::tasks::switch_wal(&inst, Duration::from_secs(120)).await.map_err(Status::unavailable)?;
        Ok(Response::new(SwitchWalReply { archived_segment }))
    }

    async fn restore_database(
        &self,
        req: Request<RestoreDatabaseRequest>,
    ) -> Result<Response<RestoreDatabaseReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        valid_cluster_id(&r.source_cluster_id)?;
        let op_ok =
            |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !op_ok(&r.operation_id) {
            return Err(Status::invalid_argument("operation_id must be 1-64 letters, digits or '-'"));
        }
        for (what, name) in [("database", &r.database), ("role", &r.role), ("source_database", &r.source_database)] {
            crate::pg::sql::validate_identifier(what, name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let target_time = match r.target_time.as_str() {
            "" => None,
            t => Some(
                chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|e| Status::invalid_argument(format!("target_time {t:?} is not RFC 3339: {e}")))?,
            ),
        };
        let archiving =
            self.host.archiving.clone().ok_or_else(|| {
                Status::failed_precondition("this agent has no backup repository: start it with --repo")
            })?;
        let target = self.serving_primary(&r.cluster_id, r.epoch).await?;
        tracing::info!(cluster = %r.cluster_id, op = %r.operation_id, source = %r.source_cluster_id,
            database = %r.database, target_time = %r.target_time, "database restore requested");
        let job = crate::tasks::restore_database(crate::tasks::DatabaseRestore {
            target,
            archiving,
            work_dir: crate::tasks::restore_work_dir(&self.host.cfg.data_path, &r.operation_id),
            operation_id: r.operation_id.clone(),
            source_cluster: r.source_cluster_id,
            source_database: r.source_database,
            target_time,
            database: r.database,
            role: r.role,
            password_scram: r.password_scram,
        });
        let reply = self.host.restores.run(&r.operation_id, job).await.map_err(Status::internal)?;
        Ok(Response::new(reply))
    }

    async fn archive_database(
        &self,
        req: Request<ArchiveDatabaseRequest>,
    ) -> Result<Response<ArchiveDatabaseReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        valid_operation_id(&r.operation_id)?;
        valid_operation_id(&r.database_id)?;
        for (what, name) in [("database", &r.database), ("role", &r.role)] {
            crate::pg::sql::validate_identifier(what, name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let repo = self.repo()?;
        let inst = self.serving_primary(&r.cluster_id, r.epoch).await?;
        tracing::info!(cluster = %r.cluster_id, op = %r.operation_id, database = %r.database, "archive requested");
        let job = crate::tasks::archive_database(crate::tasks::ArchiveRequest {
            inst,
            repo,
            work_dir: self.host.cfg.data_path.join("archives").join(&r.operation_id),
            operation_id: r.operation_id.clone(),
            database_id: r.database_id,
            database: r.database,
            role: r.role,
        });
        let reply = self.host.archives.run(&r.operation_id, job).await.map_err(Status::internal)?;
        Ok(Response::new(reply))
    }

    async fn load_archive(&self, req: Request<LoadArchiveRequest>) -> Result<Response<LoadArchiveReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        valid_operation_id(&r.operation_id)?;
        for (what, name) in [("database", &r.database), ("role", &r.role)] {
            crate::pg::sql::validate_identifier(what, name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        crate::backup::repo::check_key(&r.key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let repo = self.repo()?;
        let inst = self.serving_primary(&r.cluster_id, r.epoch).await?;
        let job = crate::tasks::load_archive(crate::tasks::LoadRequest {
            inst,
            repo,
            work_dir: self.host.cfg.data_path.join("archives").join(&r.operation_id),
            operation_id: r.operation_id.clone(),
            key: r.key,
            sha256: r.sha256,
            database: r.database,
            role: r.role,
            password_scram: r.password_scram,
        });
        let reply = self.host.loads.run(&r.operation_id, job).await.map_err(Status::internal)?;
        Ok(Response::new(reply))
    }

    async fn delete_archive(&self, req: Request<DeleteArchiveRequest>) -> Result<Response<DeleteArchiveReply>, Status> {
        let r = req.into_inner();
        if !r.key.starts_with("archives/") || !r.key.ends_with(".dump") {
            return Err(Status::invalid_argument("key must name an archive: archives/<database>/<operation>.dump"));
        }
        crate::backup::repo::check_key(&r.key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let repo = self.repo()?;
        let removed = crate::tasks::delete_archive(&repo, &r.key).await.map_err(Status::unavailable)?;
        Ok(Response::new(DeleteArchiveReply { removed }))
    }

    async fn move_source(&self, req: Request<MoveSourceRequest>) -> Result<Response<MoveSourceReply>, Status> {
        use crate::tasks::moves;
        let r = req.into_inner();
        let step = MoveSourceStep::try_from(r.step).map_err(|_| Status::invalid_argument("unknown move step"))?;
        let side = self.move_side(&r.cluster_id, r.epoch, &r.operation_id, &r.database, &r.role).await?;
        let _one_at_a_time = self.host.moves.lock(&r.operation_id).await;
        tracing::debug!(op = %r.operation_id, database = %r.database, ?step, "move source step");
        let reply = match step {
            MoveSourceStep::MoveSourceCheck => {
                moves::source_problems(&side).await.map(|problems| MoveSourceReply { problems, ..Default::default() })
            }
            MoveSourceStep::MoveSourcePrepare => {
                moves::source_prepare(&side, &r.move_password_scram, r.keep_owner, r.reset_slot).await
            }
            MoveSourceStep::MoveSourceStatus => moves::source_status(&side).await,
            MoveSourceStep::MoveSourceBlock => moves::source_block(&side).await,
            MoveSourceStep::MoveSourceUnblock => moves::source_unblock(&side).await,
            MoveSourceStep::MoveSourceDrop => moves::source_drop(&side).await,
        };
        reply.map(Response::new).map_err(move_status)
    }

    async fn move_target(&self, req: Request<MoveTargetRequest>) -> Result<Response<MoveTargetReply>, Status> {
        use crate::tasks::moves;
        let r = req.into_inner();
        let step = MoveTargetStep::try_from(r.step).map_err(|_| Status::invalid_argument("unknown move step"))?;
        let side = self.move_side(&r.cluster_id, r.epoch, &r.operation_id, &r.database, &r.role).await?;
        let _one_at_a_time = self.host.moves.lock(&r.operation_id).await;
        tracing::debug!(op = %r.operation_id, database = %r.database, ?step, "move target step");
        let reply = match step {
            MoveTargetStep::MoveTargetPrepare => {
                crate::pg::sql::validate_identifier("source_database", &r.source_database)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let source_port = u16::try_from(r.source_port)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| Status::invalid_argument("source_port must be 1-65535"))?;
                if r.source_host.is_empty() || r.move_password.is_empty() {
                    return Err(Status::invalid_argument("source_host and move_password are required"));
                }
                let plan = moves::TargetPlan {
                    password_scram: &r.password_scram,
                    schema_sql: &r.schema_sql,
                    roles: &r.roles,
                    keep_owner: r.keep_owner,
                    source_host: &r.source_host,
                    source_port,
                    source_database: &r.source_database,
                    move_password: &r.move_password,
                    source_slot_exists: r.source_slot_exists,
                };
                moves::target_prepare(&side, &plan).await
            }
            MoveTargetStep::MoveTargetStatus => moves::target_status(&side).await,
            MoveTargetStep::MoveTargetFinish => {
                moves::target_finish(&side, &r.password_scram, &r.sequences, &r.schema_fingerprint).await
            }
            MoveTargetStep::MoveTargetAbort => moves::target_abort(&side).await,
        };
        reply.map(Response::new).map_err(move_status)
    }

    async fn status(&self, _req: Request<AgentStatusRequest>) -> Result<Response<AgentStatusReply>, Status> {
        crate::monitor::observe_all(&self.host).await;
        let facts = crate::heartbeat::facts(&self.host).await;
        Ok(Response::new(AgentStatusReply { facts: Some(facts), instances: self.host.statuses().await }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        tracing::info!(cluster = %r.cluster_id, epoch = r.epoch, "promote requested");
        self.host
            .promote(&r.cluster_id, r.epoch, &r.synchronous_standby_names, &r.slots, r.old_primary_fenced)
            .await
            .map_err(refusal)?;
        crate::monitor::observe_all(&self.host).await;
        let status = self.host.statuses().await.into_iter().find(|s| s.cluster_id == r.cluster_id);
        Ok(Response::new(PromoteReply { status }))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        tracing::info!(cluster = %r.cluster_id, epoch = r.epoch, graceful = r.graceful, "fence requested");
        let final_lsn = if r.graceful {
            self.host.fence_gracefully(&r.cluster_id, r.epoch).await.map_err(refusal)?
        } else {
            self.host.admit(&r.cluster_id, r.epoch, None).await.map_err(refusal)?;
            self.host.fence(&r.cluster_id, "requested by the control plane").await;
            0
        };
        Ok(Response::new(FenceReply { final_lsn }))
    }

    async fn peer_lease(&self, req: Request<PeerLeaseRequest>) -> Result<Response<PeerLeaseReply>, Status> {
        let r = req.into_inner();
        let rec = self.host.state.lock().await.clusters.get(&r.cluster_id).cloned();
        let Some(rec) = rec else {
            return Ok(Response::new(PeerLeaseReply { granted: false, reason: "unknown cluster".into() }));
        };
        if let Err(reason) = may_grant(rec.epoch, !rec.is_primary(), r.epoch) {
            return Ok(Response::new(PeerLeaseReply { granted: false, reason }));
        }
        let until = Instant::now() + Duration::from_millis(u64::from(r.lease_ms.min(60_000)));
        let mut rt = self.host.runtime.lock().await;
        let e = rt.entry(r.cluster_id.clone()).or_default();
        e.promise = Some(PeerPromise { epoch: r.epoch, until: e.promise.map_or(until, |p| p.until.max(until)) });
        Ok(Response::new(PeerLeaseReply { granted: true, reason: String::new() }))
    }
}
