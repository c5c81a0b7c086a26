//! The provision operation: make sure the cluster's instance runs on its host, create the
//! database and owner role, then mark the database `active`. A `restore` operation provisions
//! the same way and then fills the new database from another database's backups. Each step is idempotent, so a new
//! leader simply runs the operation again from the start.

use std::time::Duration;

use steward_proto::v1::{
    EnsureDatabaseRequest, EnsureInstanceRequest, LoadArchiveRequest, RestoreDatabaseRequest, SwitchWalRequest,
};

use super::topology::ensure_request;

use super::Ctx;
use crate::state::model::{cluster_state, host_state, member_role, op_kind, Cluster, Host, Member, Operation};
use crate::state::{query, Command};

/// Attempts before a provision is declared failed.
pub const MAX_ATTEMPTS: i64 = 8;

#[derive(Debug, thiserror::Error)]
pub(super) enum StepError {
    /// Worth retrying later (agent unreachable, host down, ...).
    #[error("{0}")]
    Retry(String),
    /// This node stopped leading or the operation vanished: stop quietly.
    #[error("{0}")]
    Abandon(String),
}

/// Drives one provision operation until it succeeds, fails for good, or this node stops leading.
pub async fn run(ctx: &Ctx, op: Operation) {
    let mut attempts = op.attempts;
    loop {
        if !ctx.node.is_leader() {
            return;
        }
        match attempt(ctx, &op, attempts).await {
            Ok(()) => {
                let cmd = Command::FinishProvision {
                    operation_id: op.id.clone(),
                    succeeded: true,
                    error: String::new(),
                    at: crate::now(),
                };
                if let Err(e) = ctx.node.write(cmd).await {
                    tracing::warn!(op = %op.id, error = %e, "recording provision success failed; will retry");
                    continue;
                }
                tracing::info!(op = %op.id, database = %op.database_id, "database provisioned");
                return;
            }
            Err(StepError::Abandon(why)) => {
                tracing::info!(op = %op.id, %why, "provision handed over");
                return;
            }
            Err(StepError::Retry(error)) => {
                attempts += 1;
                ctx.metrics.agent_calls_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(op = %op.id, attempts, %error, "provision step failed");
                let cmd = if attempts >= MAX_ATTEMPTS {
                    Command::FinishProvision { operation_id: op.id.clone(), succeeded: false, error, at: crate::now() }
                } else {
                    Command::UpdateOperation {
                        id: op.id.clone(),
                        step: "retrying".into(),
                        attempts,
                        error,
                        at: crate::now(),
                    }
                };
                let last = attempts >= MAX_ATTEMPTS;
                if let Err(e) = ctx.node.write(cmd).await {
                    tracing::warn!(op = %op.id, error = %e, "recording provision progress failed");
                }
                if last {
                    return;
                }
                let backoff = Duration::from_millis(500u64.saturating_mul(1 << attempts.min(6)));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

pub(super) async fn step(ctx: &Ctx, op: &Operation, attempts: i64, name: &str) -> Result<(), StepError> {
    let cmd = Command::UpdateOperation {
        id: op.id.clone(),
        step: name.into(),
        attempts,
        error: String::new(),
        at: crate::now(),
    };
    match ctx.node.write(cmd).await {
        Ok(crate::state::Response::Done) => Ok(()),
        Ok(_) => Err(StepError::Abandon("operation is no longer running".into())),
        Err(e) => Err(StepError::Retry(e.to_string())),
    }
}

async fn ensure(
    ctx: &Ctx,
    hosts: &[Host],
    req: EnsureInstanceRequest,
    host_id: &str,
    timeout: Duration,
) -> Result<(), StepError> {
    let host =
        hosts.iter().find(|h| h.id == host_id).ok_or_else(|| StepError::Abandon(format!("host {host_id} vanished")))?;
    if host.state != host_state::ACTIVE {
        return Err(StepError::Retry(format!("host {} is {}; waiting for it to come back", host.id, host.state)));
    }
    let mut agent = ctx.agents.get(&host.agent_addr).await.map_err(|e| StepError::Retry(e.to_string()))?;
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    agent
        .ensure_instance(r)
        .await
        .map_err(|s| StepError::Retry(format!("agent {} ensure_instance: {}", host.id, s.message())))?;
    Ok(())
}

/// Brings `cluster` to what it needs: for a new one the primary (initdb), then for HA the cloned
/// standbys and synchronous replication, and marks its members and itself ready; for a ready
/// one, makes sure its primary runs as configured. Provisions and moves to a new cluster share it.
pub(super) async fn ensure_cluster(
    ctx: &Ctx,
    op: &Operation,
    attempts: i64,
    cluster: &Cluster,
) -> Result<(), StepError> {
    let pool = ctx.node.store.pool();
    let read = |e: sqlx::Error| StepError::Retry(format!("reading state: {e}"));
    let members = query::members(pool, &cluster.id).await.map_err(read)?;
    let hosts = query::member_hosts(pool, &cluster.id).await.map_err(read)?;
    let primary = members
        .iter()
        .find(|m| m.host_id == cluster.primary_host)
        .ok_or_else(|| StepError::Abandon("cluster has no primary member".into()))?;
    let request = |m: &Member, sync: bool| {
        ensure_request(cluster, &members, &hosts, m, sync)
            .ok_or_else(|| StepError::Abandon(format!("member {} has no host", m.host_id)))
    };
    let slow = Duration::from_secs(300);
    if cluster.state == cluster_state::CREATING {
        step(ctx, op, attempts, "ensure_primary").await?;
        let ha = cluster.availability == "ha";
        if let Err(e) = ensure(ctx, &hosts, request(primary, false)?, &primary.host_id, slow).await {
            if e.to_string().contains("is fenced on this host") {
                // The new primary lost its lease while the cluster was still being built (e.g. a
                // very slow initdb): nothing was promised to clients yet, so re-arm it at a new
                // epoch, which lifts the fence, and try again.
                let cmd = Command::Failover {
                    cluster_id: cluster.id.clone(),
                    from_epoch: cluster.epoch,
                    new_primary: primary.host_id.clone(),
                    reason: "primary fenced during creation".into(),
                    at: crate::now(),
                };
                ctx.node.write(cmd).await.map_err(|e| StepError::Retry(e.to_string()))?;
            }
            return Err(e);
        }
        if ha {
            step(ctx, op, attempts, "clone_standbys").await?;
            for m in members.iter().filter(|m| m.role == member_role::STANDBY) {
                ensure(ctx, &hosts, request(m, true)?, &m.host_id, slow).await?;
            }
            step(ctx, op, attempts, "enable_synchronous_replication").await?;
            ensure(ctx, &hosts, request(primary, true)?, &primary.host_id, slow).await?;
        }
        for m in members.iter().filter(|m| m.state != cluster_state::READY) {
            let cmd = Command::SetMember {
                cluster_id: cluster.id.clone(),
                host_id: m.host_id.clone(),
                role: m.role.clone(),
                state: cluster_state::READY.into(),
                at: crate::now(),
            };
            ctx.node.write(cmd).await.map_err(|e| StepError::Retry(e.to_string()))?;
        }
        let cmd = Command::SetClusterState {
            cluster_id: cluster.id.clone(),
            state: cluster_state::READY.into(),
            at: crate::now(),
        };
        ctx.node.write(cmd).await.map_err(|e| StepError::Retry(e.to_string()))?;
    } else {
        step(ctx, op, attempts, "ensure_primary").await?;
        ensure(ctx, &hosts, request(primary, true)?, &primary.host_id, slow).await?;
    }
    Ok(())
}

async fn attempt(ctx: &Ctx, op: &Operation, attempts: i64) -> Result<(), StepError> {
    let pool = ctx.node.store.pool();
    let read = |e: sqlx::Error| StepError::Retry(format!("reading state: {e}"));
    let db = query::database(pool, &op.database_id)
        .await
        .map_err(read)?
        .ok_or_else(|| StepError::Abandon("database vanished".into()))?;
    let cluster = query::cluster(pool, &db.cluster_id)
        .await
        .map_err(read)?
        .ok_or_else(|| StepError::Abandon("cluster vanished".into()))?;
    ensure_cluster(ctx, op, attempts, &cluster).await?;
    let hosts = query::member_hosts(pool, &cluster.id).await.map_err(read)?;

    step(ctx, op, attempts, "ensure_database").await?;
    let host = hosts
        .iter()
        .find(|h| h.id == cluster.primary_host)
        .ok_or_else(|| StepError::Abandon("primary host vanished".into()))?;
    let mut agent = ctx.agents.get(&host.agent_addr).await.map_err(|e| StepError::Retry(e.to_string()))?;
    let mut req = tonic::Request::new(EnsureDatabaseRequest {
        cluster_id: cluster.id.clone(),
        epoch: cluster.epoch as u64,
        database: db.pg_name.clone(),
        role: db.role_name.clone(),
        password_scram: steward_agent::pg::scram_verifier(&db.password),
    });
    req.set_timeout(Duration::from_secs(60));
    agent
        .ensure_database(req)
        .await
        .map_err(|s| StepError::Retry(format!("agent {} ensure_database: {}", host.id, s.message())))?;

    if op.kind == op_kind::UNARCHIVE {
        step(ctx, op, attempts, "load_archive").await?;
        let mut req = tonic::Request::new(LoadArchiveRequest {
            cluster_id: cluster.id.clone(),
            epoch: cluster.epoch as u64,
            operation_id: op.id.clone(),
            key: db.archive_key.clone(),
            sha256: db.archive_sha256.clone(),
            database: db.pg_name.clone(),
            role: db.role_name.clone(),
            password_scram: steward_agent::pg::scram_verifier(&db.password),
        });
        req.set_timeout(Duration::from_secs(6 * 3600));
        let r = agent
            .load_archive(req)
            .await
            .map_err(|s| StepError::Retry(format!("agent {} load_archive: {}", host.id, s.message())))?
            .into_inner();
        tracing::info!(op = %op.id, database = %db.id, bytes = r.bytes, "database loaded from its archive");
    }
    if op.kind == op_kind::RESTORE {
        let src = query::restore_source(pool, &db.id)
            .await
            .map_err(read)?
            .ok_or_else(|| StepError::Abandon("restore source vanished".into()))?;
        step(ctx, op, attempts, "archive_source_wal").await?;
        // Best effort: the source's latest commits reach the archive (a copy "as of now" then
        // has them); a copy at an earlier time does not need it.
        if let Err(e) = switch_source_wal(ctx, &src.source_cluster_id).await {
            tracing::warn!(op = %op.id, source = %src.source_cluster_id, error = %e, "source WAL switch failed");
        }
        step(ctx, op, attempts, "restore_data").await?;
        let mut req = tonic::Request::new(RestoreDatabaseRequest {
            cluster_id: cluster.id.clone(),
            epoch: cluster.epoch as u64,
            operation_id: op.id.clone(),
            source_cluster_id: src.source_cluster_id.clone(),
            source_database: src.source_pg_name.clone(),
            target_time: src.target_time.clone(),
            database: db.pg_name.clone(),
            role: db.role_name.clone(),
            password_scram: steward_agent::pg::scram_verifier(&db.password),
        });
        req.set_timeout(Duration::from_secs(6 * 3600));
        let r = agent
            .restore_database(req)
            .await
            .map_err(|s| StepError::Retry(format!("agent {} restore_database: {}", host.id, s.message())))?
            .into_inner();
        tracing::info!(op = %op.id, database = %db.id, label = %r.backup_label, dump_bytes = r.dump_bytes,
            "database filled from backup");
    }
    Ok(())
}

/// Asks the primary of `cluster_id` to close its WAL segment and wait until it is archived.
async fn switch_source_wal(ctx: &Ctx, cluster_id: &str) -> Result<(), String> {
    let pool = ctx.node.store.pool();
    let cluster = query::cluster(pool, cluster_id).await.map_err(|e| e.to_string())?.ok_or("no such cluster")?;
    let host = query::host(pool, &cluster.primary_host).await.map_err(|e| e.to_string())?.ok_or("no primary host")?;
    let mut agent = ctx.agents.get(&host.agent_addr).await.map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(SwitchWalRequest { cluster_id: cluster.id.clone(), epoch: cluster.epoch as u64 });
    req.set_timeout(Duration::from_secs(150));
    agent.switch_wal(req).await.map_err(|s| s.message().to_string())?;
    Ok(())
}
