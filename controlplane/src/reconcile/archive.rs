//! The archive operation (a database's owner retires it) and the removal of a deleted
//! database's archive after its grace period. The agent of the cluster's primary ends the
//! database's sessions, stores a logical dump in the repository, verifies it by restoring it,
//! and only then drops the database; the operation records where the archive is. An archive
//! that cannot be made leaves the database as it was (its role's login restored). Loading an
//! archive back is a provision (`unarchive`), see `provision.rs`.

use std::time::Duration;

use steward_proto::v1::{ArchiveDatabaseRequest, DeleteArchiveRequest, EnsureDatabaseRequest};

use super::Ctx;
use crate::state::model::{host_state, Database, Operation};
use crate::state::{query, Command};

/// Attempts before an archive is given up (and the database left as it was).
const MAX_ATTEMPTS: i64 = 4;

/// Drives one archive operation until it ends or this node stops leading.
pub async fn run(ctx: &Ctx, op: Operation) {
    let mut attempts = op.attempts;
    loop {
        if !ctx.node.is_leader() {
            return;
        }
        let finish = match attempt(ctx, &op).await {
            Ok(r) => Command::FinishArchive {
                operation_id: op.id.clone(),
                succeeded: true,
                location: r.location,
                key: r.key,
                bytes: r.bytes as i64,
                sha256: r.sha256,
                error: String::new(),
                at: crate::now(),
            },
            Err(error) => {
                attempts += 1;
                tracing::warn!(op = %op.id, attempts, %error, "archive attempt failed");
                if attempts < MAX_ATTEMPTS {
                    super::retry_later(ctx, &op.id, "archive", attempts, error).await;
                    continue;
                }
                // Give up: the database must be usable as before (its role got NOLOGIN).
                if let Err(e) = restore_login(ctx, &op).await {
                    tracing::warn!(op = %op.id, error = %e, "restoring the database's login failed");
                }
                Command::FinishArchive {
                    operation_id: op.id.clone(),
                    succeeded: false,
                    location: String::new(),
                    key: String::new(),
                    bytes: 0,
                    sha256: String::new(),
                    error,
                    at: crate::now(),
                }
            }
        };
        match ctx.node.write(finish).await {
            Ok(_) => {
                tracing::info!(op = %op.id, database = %op.database_id, "archive operation finished");
                return;
            }
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "recording the archive's end failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The database, its cluster's epoch and the primary's agent address.
async fn placement(ctx: &Ctx, op: &Operation) -> Result<(Database, u64, String), String> {
    let pool = ctx.node.store.pool();
    let db = query::database(pool, &op.database_id).await.map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let cluster = query::cluster(pool, &db.cluster_id).await.map_err(|e| e.to_string())?.ok_or("cluster vanished")?;
    let host = query::host(pool, &cluster.primary_host).await.map_err(|e| e.to_string())?.ok_or("host vanished")?;
    if host.state != host_state::ACTIVE {
        return Err(format!("the primary's host {} is {}", host.id, host.state));
    }
    Ok((db, cluster.epoch as u64, host.agent_addr))
}

async fn attempt(ctx: &Ctx, op: &Operation) -> Result<steward_proto::v1::ArchiveDatabaseReply, String> {
    let (db, epoch, addr) = placement(ctx, op).await?;
    let cmd = Command::UpdateOperation {
        id: op.id.clone(),
        step: "dump_verify_drop".into(),
        attempts: op.attempts,
        error: String::new(),
        at: crate::now(),
    };
    ctx.node.write(cmd).await.map_err(|e| e.to_string())?;
    let mut agent = ctx.agents.get(&addr).await.map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(ArchiveDatabaseRequest {
        cluster_id: db.cluster_id.clone(),
        epoch,
        operation_id: op.id.clone(),
        database_id: db.id.clone(),
        database: db.pg_name.clone(),
        role: db.role_name.clone(),
    });
    req.set_timeout(Duration::from_secs(6 * 3600));
    let r = agent.archive_database(req).await.map_err(|s| format!("agent archive_database: {}", s.message()))?;
    Ok(r.into_inner())
}

/// `EnsureDatabase` gives the role its login and password back.
async fn restore_login(ctx: &Ctx, op: &Operation) -> Result<(), String> {
    let (db, epoch, addr) = placement(ctx, op).await?;
    let mut agent = ctx.agents.get(&addr).await.map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(EnsureDatabaseRequest {
        cluster_id: db.cluster_id.clone(),
        epoch,
        database: db.pg_name.clone(),
        role: db.role_name.clone(),
        password_scram: steward_agent::pg::scram_verifier(&db.password),
    });
    req.set_timeout(Duration::from_secs(60));
    agent.ensure_database(req).await.map_err(|s| s.message().to_string())?;
    Ok(())
}

/// Removes the archives of databases deleted longer than `grace` ago, through any active
/// host's agent (they share the repository).
pub async fn purge(ctx: &Ctx, grace: Duration) -> Result<(), String> {
    let pool = ctx.node.store.pool();
    let before = chrono::Utc::now() - chrono::Duration::from_std(grace).map_err(|e| e.to_string())?;
    let due = query::archives_to_purge(pool, &before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .await
        .map_err(|e| e.to_string())?;
    if due.is_empty() {
        return Ok(());
    }
    let hosts = query::hosts(pool).await.map_err(|e| e.to_string())?;
    let host = hosts
        .iter()
        .find(|h| h.state == host_state::ACTIVE && ctx.liveness.last_seen(&h.id).is_some())
        .ok_or("no active host to remove archives through")?;
    let mut agent = ctx.agents.get(&host.agent_addr).await.map_err(|e| e.to_string())?;
    for db in due {
        let mut req = tonic::Request::new(DeleteArchiveRequest { key: db.archive_key.clone() });
        req.set_timeout(Duration::from_secs(120));
        let removed = agent.delete_archive(req).await.map_err(|s| s.message().to_string())?.into_inner().removed;
        tracing::info!(database = %db.id, key = %db.archive_key, removed, "archive of a deleted database removed");
        ctx.node
            .write(Command::ArchivePurged { id: db.id.clone(), at: crate::now() })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
