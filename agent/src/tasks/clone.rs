//! A point-in-time copy of one database into a new one: restore the source cluster's backups
//! into a scratch directory, recover to the target, dump the database, load it into the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::RestoreDatabaseReply;

use super::dumps;
use crate::backup::{RecoveryTarget, Repository, RestoreOptions};
use crate::pg::{Instance, InstanceSpec, RunAs, WalArchiving};

/// What [`restore_database`] needs.
pub struct DatabaseRestore {
    /// This host's primary, which receives the database.
    pub target: Arc<Instance>,
    pub archiving: WalArchiving,
    /// Scratch space for the restored copy of the source cluster (removed afterwards).
    pub work_dir: PathBuf,
    pub operation_id: String,
    pub source_cluster: String,
    pub source_database: String,
    /// None: the latest archived WAL.
    pub target_time: Option<chrono::DateTime<chrono::FixedOffset>>,
    pub database: String,
    pub role: String,
    pub password_scram: String,
}

/// Stops the scratch copy's PostgreSQL, if one runs, and removes the scratch directory.
async fn cleanup(r: &DatabaseRestore, run_as: &RunAs) {
    if r.work_dir.join("pgdata").join("postmaster.pid").exists() {
        if let Err(e) = scratch_instance(r, run_as).stop_immediate().await {
            tracing::warn!(dir = %r.work_dir.display(), error = %e, "stopping the scratch restore failed");
        }
    }
    dumps::remove_dir(&r.work_dir).await;
}

/// Restores `source_database` of `source_cluster`'s backups at `target_time` into `database`
/// of this host's primary: see the RestoreDatabase RPC.
pub async fn restore_database(r: DatabaseRestore) -> Result<RestoreDatabaseReply, String> {
    if dumps::already_loaded(&r.target, &r.database, &r.operation_id).await? {
        return Ok(RestoreDatabaseReply { already_done: true, ..Default::default() });
    }
    let run_as = r.target.run_as().clone();
    // A scratch directory left by an interrupted attempt goes first.
    cleanup(&r, &run_as).await;
    dumps::make_dir(&r.work_dir, &run_as)?;
    let result = fill(&r, &run_as).await;
    cleanup(&r, &run_as).await;
    let reply = result?;
    tracing::info!(database = %r.database, source = %r.source_cluster, label = %reply.backup_label,
        dump_bytes = reply.dump_bytes, "database restored from backup");
    Ok(reply)
}

/// The scratch copy of the source cluster, reachable only through its unix socket.
fn scratch_instance(r: &DatabaseRestore, run_as: &RunAs) -> Instance {
    let spec = InstanceSpec {
        cluster_id: format!("restore-{}", r.operation_id),
        data_dir: r.work_dir.join("pgdata"),
        socket_dir: r.work_dir.clone(),
        // Unix socket only (listen_addresses ''): the port just names the socket file.
        port: 5432,
        listen_addresses: String::new(),
        memory_budget_bytes: 256 << 20,
        cores: 1,
        archive: None,
    };
    Instance::new(spec, r.target.binaries().clone(), run_as.clone())
}

async fn fill(r: &DatabaseRestore, run_as: &RunAs) -> Result<RestoreDatabaseReply, String> {
    let sql = |e: tokio_postgres::Error| crate::pg::sql::describe(&e);
    let repo = Repository::open(&r.archiving.repo).map_err(|e| e.to_string())?;
    let opts = RestoreOptions {
        label: None,
        target: r.target_time.map(RecoveryTarget::Time).unwrap_or(RecoveryTarget::Latest),
        agent_exe: r.archiving.agent_exe.clone(),
        parallel: 2,
        delta: false,
    };
    let pgdata = r.work_dir.join("pgdata");
    let report = crate::backup::restore(&repo, &r.source_cluster, &pgdata, run_as, &opts)
        .await
        .map_err(|e| format!("restoring cluster {}: {e}", r.source_cluster))?;
    let scratch = scratch_instance(r, run_as);
    scratch.write_config().await.map_err(|e| e.to_string())?;
    scratch.start().await.map_err(|e| format!("starting the restored copy: {e}"))?;
    let copy = scratch.superuser_client().await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(4 * 3600);
    while copy.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(sql)?.get::<_, bool>(0) {
        if Instant::now() >= deadline {
            return Err("the restored copy did not finish recovery within 4 h".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(copy);

    let dump = r.work_dir.join("database.dump");
    let dump_bytes = dumps::dump(&r.target, run_as, &r.work_dir, 5432, &r.source_database, &dump)
        .await
        .map_err(|e| format!("{e} (does database {} exist at that time?)", r.source_database))?;
    let owner = dumps::Owner::Role { role: &r.role, password_scram: &r.password_scram };
    dumps::load(&r.target, &dump, &r.database, owner, Some(&r.operation_id)).await?;
    Ok(RestoreDatabaseReply { backup_label: report.label, dump_bytes, already_done: false })
}

/// Where scratch restores of `operation_id` go under the agent's data path.
pub fn restore_work_dir(data_path: &Path, operation_id: &str) -> PathBuf {
    data_path.join("restores").join(operation_id)
}
