//! Read queries over the replicated state. Callers make reads linearizable first (see
//! `raft::node::RaftNode::linearizable_read`); these functions only read the local copy.

use sqlx::SqlitePool;

use super::model::{Backup, Cluster, Database, Host, Member, Move, Operation, RestoreSource, Team, Token};

/// The team whose token hashes to `token_hash`.
/// The live (not revoked) token with this hash.
pub async fn token_by_hash(pool: &SqlitePool, hash: &str) -> Result<Option<Token>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tokens WHERE hash = ? AND revoked_at IS NULL").bind(hash).fetch_optional(pool).await
}

/// Every token, oldest first.
pub async fn tokens(pool: &SqlitePool) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tokens ORDER BY created_at, id").fetch_all(pool).await
}

pub async fn token(pool: &SqlitePool, id: &str) -> Result<Option<Token>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM tokens WHERE id = ?").bind(id).fetch_optional(pool).await
}

/// Ids of hosts whose certificates are revoked.
pub async fn revoked_hosts(pool: &SqlitePool) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM hosts WHERE revoked_at IS NOT NULL").fetch_all(pool).await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

pub async fn team(pool: &SqlitePool, name: &str) -> Result<Option<Team>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM teams WHERE name = ?").bind(name).fetch_optional(pool).await
}

pub async fn database(pool: &SqlitePool, id: &str) -> Result<Option<Database>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM databases WHERE id = ?").bind(id).fetch_optional(pool).await
}

/// Databases of one owner, oldest first.
pub async fn databases_of(pool: &SqlitePool, owner: &str) -> Result<Vec<Database>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM databases WHERE owner = ? AND state <> 'deleted' ORDER BY created_at, id")
        .bind(owner)
        .fetch_all(pool)
        .await
}

pub async fn all_databases(pool: &SqlitePool) -> Result<Vec<Database>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM databases ORDER BY created_at, id").fetch_all(pool).await
}

pub async fn databases_in_cluster(pool: &SqlitePool, cluster_id: &str) -> Result<Vec<Database>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM databases WHERE cluster_id = ? AND state <> 'deleted'")
        .bind(cluster_id)
        .fetch_all(pool)
        .await
}

pub async fn operation(pool: &SqlitePool, id: &str) -> Result<Option<Operation>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM operations WHERE id = ?").bind(id).fetch_optional(pool).await
}

/// Recent operations, newest first, filtered by state and kind when given.
pub async fn recent_operations(
    pool: &SqlitePool,
    state: Option<&str>,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<Operation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM operations WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR kind = ?2)
         ORDER BY created_at DESC, id LIMIT ?3",
    )
    .bind(state)
    .bind(kind)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn running_operations(pool: &SqlitePool) -> Result<Vec<Operation>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM operations WHERE state = 'running' ORDER BY created_at").fetch_all(pool).await
}

/// The latest operation of a database (provision, restore, archive, ...).
pub async fn provision_operation_of(pool: &SqlitePool, database_id: &str) -> Result<Option<Operation>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM operations WHERE database_id = ? ORDER BY created_at DESC, id LIMIT 1")
        .bind(database_id)
        .fetch_optional(pool)
        .await
}

pub async fn hosts(pool: &SqlitePool) -> Result<Vec<Host>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM hosts ORDER BY id").fetch_all(pool).await
}

/// The hosts of a cluster's members (one row each), for the operations that talk to them:
/// reading every host per operation does not scale to a large fleet.
pub async fn member_hosts(pool: &SqlitePool, cluster_id: &str) -> Result<Vec<Host>, sqlx::Error> {
    sqlx::query_as(
        "SELECT h.* FROM hosts h WHERE h.id IN (SELECT host_id FROM cluster_members WHERE cluster_id = ?) ORDER BY h.id",
    )
    .bind(cluster_id)
    .fetch_all(pool)
    .await
}

pub async fn host(pool: &SqlitePool, id: &str) -> Result<Option<Host>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM hosts WHERE id = ?").bind(id).fetch_optional(pool).await
}

pub async fn clusters(pool: &SqlitePool) -> Result<Vec<Cluster>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM clusters ORDER BY id").fetch_all(pool).await
}

/// HA clusters in `state` (what the failover check watches), without scanning single-instance ones.
pub async fn ha_clusters_in_state(pool: &SqlitePool, state: &str) -> Result<Vec<Cluster>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM clusters WHERE availability = 'ha' AND state = ? ORDER BY id")
        .bind(state)
        .fetch_all(pool)
        .await
}

/// HA clusters whose recorded primary is `host_id` (the leases a heartbeat may renew).
pub async fn ha_clusters_led_by(pool: &SqlitePool, host_id: &str) -> Result<Vec<Cluster>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM clusters WHERE primary_host = ? AND availability = 'ha'")
        .bind(host_id)
        .fetch_all(pool)
        .await
}

/// Whether `host_id` holds a member of any HA cluster (it then heartbeats faster).
pub async fn host_in_ha_cluster(pool: &SqlitePool, host_id: &str) -> Result<bool, sqlx::Error> {
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT 1 FROM cluster_members m JOIN clusters c ON c.id = m.cluster_id
         WHERE m.host_id = ? AND c.availability = 'ha' LIMIT 1",
    )
    .bind(host_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

pub async fn cluster(pool: &SqlitePool, id: &str) -> Result<Option<Cluster>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM clusters WHERE id = ?").bind(id).fetch_optional(pool).await
}

/// Number of live databases per cluster, for placement.
/// `(host, port)` of every cluster member: the ports a new instance must avoid.
pub async fn member_ports(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT host_id, port FROM cluster_members ORDER BY host_id, cluster_id").fetch_all(pool).await
}

/// Live databases per host, counting every cluster the host holds a member of (placement's fill).
pub async fn database_counts_by_host(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.host_id, COUNT(*) FROM databases d JOIN cluster_members m ON m.cluster_id = d.cluster_id
         WHERE d.state <> 'deleted' GROUP BY m.host_id",
    )
    .fetch_all(pool)
    .await
}

/// `(host, cluster)` of every `single` cluster, by cluster id.
pub async fn single_clusters(pool: &SqlitePool) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT primary_host, id FROM clusters WHERE availability = 'single' ORDER BY id")
        .fetch_all(pool)
        .await
}

pub async fn database_counts(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT cluster_id, COUNT(*) FROM databases WHERE state <> 'deleted' GROUP BY cluster_id")
        .fetch_all(pool)
        .await
}

/// `(state, count)` rows for a table with a `state` column, for metrics.
pub async fn count_by_state(pool: &SqlitePool, table: &'static str) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT state, COUNT(*) FROM {table} GROUP BY state")).fetch_all(pool).await
}

/// Members of a cluster, primary first.
pub async fn members(pool: &SqlitePool, cluster_id: &str) -> Result<Vec<Member>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM cluster_members WHERE cluster_id = ?
         ORDER BY CASE role WHEN 'primary' THEN 0 WHEN 'standby' THEN 1 ELSE 2 END, host_id",
    )
    .bind(cluster_id)
    .fetch_all(pool)
    .await
}

pub async fn backup(pool: &SqlitePool, operation_id: &str) -> Result<Option<Backup>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM backups WHERE operation_id = ?").bind(operation_id).fetch_optional(pool).await
}

/// Backups, newest first: of one cluster, or of all; at most `limit`.
pub async fn backups(pool: &SqlitePool, cluster_id: Option<&str>, limit: i64) -> Result<Vec<Backup>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM backups WHERE (?1 IS NULL OR cluster_id = ?1) ORDER BY created_at DESC, operation_id LIMIT ?2",
    )
    .bind(cluster_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Per cluster, what the backup scheduler needs: when the last successful full and any
/// successful backup were requested, when the last failure ended, and whether one runs.
/// The longest backup retention among each cluster's active databases (clusters without one are
/// absent): what the backup schedule keeps.
pub async fn active_retention_by_cluster(
    pool: &SqlitePool,
) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT cluster_id, max(backup_retention_days) FROM databases WHERE state = 'active' GROUP BY cluster_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

pub async fn backup_history(pool: &SqlitePool) -> Result<Vec<BackupHistory>, sqlx::Error> {
    sqlx::query_as(
        "SELECT cluster_id,
            max(CASE WHEN state = 'succeeded' AND kind_taken = 'full' THEN created_at END) AS last_full,
            max(CASE WHEN state = 'succeeded' THEN created_at END) AS last_any,
            max(CASE WHEN state = 'failed' THEN finished_at END) AS last_failure,
            max(state = 'running') AS running
         FROM backups GROUP BY cluster_id",
    )
    .fetch_all(pool)
    .await
}

/// One cluster's row of [`backup_history`] (RFC 3339 times).
#[derive(Debug, Clone, Default, sqlx::FromRow, PartialEq)]
pub struct BackupHistory {
    pub cluster_id: String,
    pub last_full: Option<String>,
    pub last_any: Option<String>,
    pub last_failure: Option<String>,
    pub running: bool,
}

/// Where a point-in-time copy takes its data from (None for other databases).
pub async fn restore_source(pool: &SqlitePool, database_id: &str) -> Result<Option<RestoreSource>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM restores WHERE database_id = ?").bind(database_id).fetch_optional(pool).await
}

/// The earliest end of a successful backup of the cluster (RFC 3339), if any.
pub async fn first_backup_finished(pool: &SqlitePool, cluster_id: &str) -> Result<Option<String>, sqlx::Error> {
    let row: (Option<String>,) =
        sqlx::query_as("SELECT min(finished_at) FROM backups WHERE cluster_id = ? AND state = 'succeeded'")
            .bind(cluster_id)
            .fetch_one(pool)
            .await?;
    Ok(row.0)
}

/// One audit log entry.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
}

/// The audit log about one target, newest first. Its own statement, not one shared with
/// [`AUDIT_ALL`] through `(?1 IS NULL OR target = ?1)`: SQLite plans a statement before it sees
/// its parameters, and for that form it plans a scan of the whole log instead of `audit_target`.
const AUDIT_OF_TARGET: &str = "SELECT * FROM audit WHERE target = ? ORDER BY seq DESC LIMIT ?";

/// The whole audit log, newest first.
const AUDIT_ALL: &str = "SELECT * FROM audit ORDER BY seq DESC LIMIT ?";

/// Audit entries, newest first: about one target, or all; at most `limit`.
pub async fn audit(pool: &SqlitePool, target: Option<&str>, limit: i64) -> Result<Vec<AuditEntry>, sqlx::Error> {
    match target {
        Some(t) => sqlx::query_as(AUDIT_OF_TARGET).bind(t).bind(limit).fetch_all(pool).await,
        None => sqlx::query_as(AUDIT_ALL).bind(limit).fetch_all(pool).await,
    }
}

/// Deleted databases whose archive is still in the repository, deleted before `before`
/// (RFC 3339).
pub async fn archives_to_purge(pool: &SqlitePool, before: &str) -> Result<Vec<Database>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM databases WHERE state = 'deleted' AND archive_key <> '' AND deleted_at < ?")
        .bind(before)
        .fetch_all(pool)
        .await
}

/// The move of operation `operation_id`.
pub async fn move_of(pool: &SqlitePool, operation_id: &str) -> Result<Option<Move>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM moves WHERE operation_id = ?").bind(operation_id).fetch_optional(pool).await
}

/// Moves that have not ended (copying or switched), oldest first.
pub async fn running_moves(pool: &SqlitePool) -> Result<Vec<Move>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM moves WHERE state IN ('copying', 'switched') ORDER BY created_at")
        .fetch_all(pool)
        .await
}

/// The states of a live database (not archived, deleted or failed), as an SQL list.
macro_rules! live_states {
    () => {
        "('provisioning', 'active', 'deprecated', 'archiving', 'restoring')"
    };
}

/// Live databases per host (as [`live_databases_on_host`] counts them), in one query, for
/// listing every host at once. Hosts without any are absent.
pub async fn live_database_counts_by_host(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT m.host_id, COUNT(*) FROM databases d JOIN cluster_members m ON m.cluster_id = d.cluster_id
         WHERE d.state IN ",
        live_states!(),
        " GROUP BY m.host_id"
    ))
    .fetch_all(pool)
    .await
}

/// Live databases (not archived, deleted or failed) with an instance on `host_id`: what a drain
/// has to move away.
pub async fn live_databases_on_host(pool: &SqlitePool, host_id: &str) -> Result<Vec<Database>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT d.* FROM databases d
         WHERE d.state IN ",
        live_states!(),
        "

           AND d.cluster_id IN (SELECT cluster_id FROM cluster_members WHERE host_id = ?)
         ORDER BY d.created_at, d.id"
    ))
    .bind(host_id)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Store;

    /// SQLite's plan of `sql` (planned before any parameter is bound, as when it runs).
    async fn plan(pool: &SqlitePool, sql: &str) -> String {
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}")).fetch_all(pool).await.unwrap();
        rows.into_iter().map(|r| r.3).collect::<Vec<_>>().join("; ")
    }

    #[tokio::test]
    async fn the_audit_of_one_target_is_read_through_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let p = plan(store.pool(), AUDIT_OF_TARGET).await;
        assert!(p.contains("USING INDEX audit_target"), "plan: {p}");
        // The all-targets form reads the log backwards by its key, no sort.
        let p = plan(store.pool(), AUDIT_ALL).await;
        assert!(!p.contains("TEMP B-TREE"), "plan: {p}");
    }

    /// Columns of `table` under a UNIQUE index (its primary key's included).
    async fn unique_columns(pool: &SqlitePool, table: &str) -> Vec<String> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT ii.name FROM pragma_index_list(?1) AS il, pragma_index_info(il.name) AS ii
             WHERE il.\"unique\" = 1 ORDER BY ii.name",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter().map(|r| r.0).collect()
    }

    #[tokio::test]
    async fn a_team_token_hash_is_unique_through_tokens_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(unique_columns(store.pool(), "teams").await, ["name"]);
        assert_eq!(unique_columns(store.pool(), "tokens").await, ["hash", "id"]);
    }
}
