//! What the control plane's long operations run on this host: a backup of a cluster (then the
//! expire of what retention no longer needs), a WAL switch that gets everything committed into
//! the archive, and the restore of one database from another cluster's backups into a new
//! database (a point-in-time clone). Each runs under a [`crate::jobs::JobTable`] so a retried
//! call joins it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::{BackupReply, RestoreDatabaseReply};

use crate::backup::base::{self, BackupOptions};
use crate::backup::manifest::BackupKind;
use crate::backup::{expire, RecoveryTarget, Repository, RestoreOptions};
use crate::pg::sql::{quote_ident, quote_literal};
use crate::pg::{Instance, InstanceSpec, RunAs, Upstream, WalArchiving};

/// One backup of `stanza` from `inst` (primary, or a standby of `primary`), then the expire
/// of what `retention_days` no longer needs (0: none).
pub async fn run_backup(
    inst: Arc<Instance>,
    archiving: WalArchiving,
    stanza: String,
    kind: BackupKind,
    primary: Option<Upstream>,
    retention_days: u32,
) -> Result<BackupReply, String> {
    let repo = Repository::open(&archiving.repo).map_err(|e| e.to_string())?;
    let parallel = inst.spec().cores.clamp(1, 4) as usize;
    let opts = BackupOptions { kind, parallel, primary, ..Default::default() };
    let m = base::take(&inst, &repo, &stanza, opts).await.map_err(|e| e.to_string())?;
    let mut reply = BackupReply {
        label: m.label.clone(),
        kind: if m.kind == BackupKind::Full { "full" } else { "incr" }.into(),
        size_bytes: m.size_bytes,
        stored_bytes: m.stored_bytes,
        from_standby: m.from_standby,
        start_lsn: m.start_lsn.clone(),
        stop_lsn: m.stop_lsn.clone(),
        started_at: m.started_at.clone(),
        stopped_at: m.stopped_at.clone(),
        ..Default::default()
    };
    if retention_days > 0 {
        match expire::expire(&repo, &stanza, retention_days, chrono::Utc::now(), false).await {
            Ok(r) => {
                reply.expired_backups = r.plan.remove.len() as u32;
                reply.expired_wal_files = r.wal_removed as u64;
            }
            Err(e) => {
                tracing::warn!(stanza, error = %e, "expire after the backup failed");
                reply.expire_error = e.to_string();
            }
        }
    }
    Ok(reply)
}

/// On a primary: closes the current WAL segment and waits (up to `wait`) until PostgreSQL
/// reports it archived. Returns its name.
pub async fn switch_wal(inst: &Instance, wait: Duration) -> Result<String, String> {
    let client = inst.superuser_client().await.map_err(|e| e.to_string())?;
    let sql = |e: tokio_postgres::Error| crate::pg::sql::describe(&e);
    let segment: String = client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.map_err(sql)?.get(0);
    let deadline = Instant::now() + wait;
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, '') FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(sql)?;
        let (archived, failed): (String, String) = (row.get(0), row.get(1));
        // Names of one timeline sort by position; a later timeline sorts after.
        if archived.len() >= 24 && archived[..24] >= segment[..] {
            return Ok(segment);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "WAL segment {segment} was not archived within {} s (last archived: {archived:?}, last failed: \
                 {failed:?}): check archiving (steward_archive_* metrics, the server log)",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

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
    if let Err(e) = tokio::fs::remove_dir_all(&r.work_dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %r.work_dir.display(), error = %e, "removing the scratch restore failed");
        }
    }
}

/// Marks a database as filled by an operation, so a retry leaves it alone.
fn marker(operation_id: &str) -> String {
    format!("steward: restored by operation {operation_id}")
}

/// Restores `source_database` of `source_cluster`'s backups at `target_time` into `database`
/// of this host's primary: see the RestoreDatabase RPC.
pub async fn restore_database(r: DatabaseRestore) -> Result<RestoreDatabaseReply, String> {
    let client = r.target.superuser_client().await.map_err(|e| e.to_string())?;
    let sql = |e: tokio_postgres::Error| crate::pg::sql::describe(&e);
    let done: Option<String> = client
        .query_opt("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", &[&r.database])
        .await
        .map_err(sql)?
        .and_then(|row| row.get(0));
    if done.as_deref() == Some(marker(&r.operation_id).as_str()) {
        return Ok(RestoreDatabaseReply { already_done: true, ..Default::default() });
    }
    let run_as = r.target.run_as().clone();
    // A scratch directory left by an interrupted attempt goes first.
    cleanup(&r, &run_as).await;
    std::fs::create_dir_all(&r.work_dir).map_err(|e| format!("creating {}: {e}", r.work_dir.display()))?;
    run_as.chown(&r.work_dir).map_err(|e| e.to_string())?;
    let result = fill(&r, &client, &run_as).await;
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

async fn fill(
    r: &DatabaseRestore,
    client: &tokio_postgres::Client,
    run_as: &RunAs,
) -> Result<RestoreDatabaseReply, String> {
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
    let bins = r.target.binaries();
    let home = &r.work_dir;
    let mut pg_dump = run_as.command(&bins.bin("pg_dump"), home);
    pg_dump.arg("--format=custom").arg("--file").arg(&dump).arg("--host").arg(&r.work_dir);
    pg_dump.args(["--port", "5432", "--username", "postgres", "--dbname", &r.source_database]);
    crate::pg::runas::run(&mut pg_dump, "pg_dump of the restored copy")
        .await
        .map_err(|e| format!("{e} (does database {} exist at that time?)", r.source_database))?;
    let dump_bytes = std::fs::metadata(&dump).map(|m| m.len()).unwrap_or(0);

    // The new database starts empty: anything a failed attempt loaded goes.
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&r.database)))
        .await
        .map_err(sql)?;
    r.target.ensure_database(&r.database, &r.role, &r.password_scram).await.map_err(|e| e.to_string())?;
    let target = r.target.spec();
    let mut pg_restore = run_as.command(&bins.bin("pg_restore"), home);
    pg_restore.args(["--no-owner", "--no-privileges", "--exit-on-error", "--role", &r.role]);
    pg_restore.arg("--host").arg(&target.socket_dir).args(["--port", &target.port.to_string()]);
    pg_restore.args(["--username", "postgres", "--dbname", &r.database]).arg(&dump);
    crate::pg::runas::run(&mut pg_restore, "pg_restore into the new database").await.map_err(|e| e.to_string())?;
    client
        .batch_execute(&format!(
            "COMMENT ON DATABASE {} IS {}",
            quote_ident(&r.database),
            quote_literal(&marker(&r.operation_id))
        ))
        .await
        .map_err(sql)?;
    Ok(RestoreDatabaseReply { backup_label: report.label, dump_bytes, already_done: false })
}

/// Where scratch restores of `operation_id` go under the agent's data path.
pub fn restore_work_dir(data_path: &Path, operation_id: &str) -> PathBuf {
    data_path.join("restores").join(operation_id)
}
