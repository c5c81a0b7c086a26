//! Applies one [`Command`] inside the caller's transaction. Deterministic: the same command on
//! the same state gives the same rows and [`Response`] on every node.

use sqlx::SqliteConnection;

use super::command::{Command, Response};
use super::lifecycle::{self, Action};
use super::model::{db_state, member_role, move_state, op_kind, op_state, Member};

/// Applies the command of one log entry: a [`Command::Batch`] command by command, anything else
/// as itself. An `Err` is a storage failure (the transaction is rolled back by the caller).
pub async fn apply_entry(conn: &mut SqliteConnection, cmd: &Command) -> Result<Response, sqlx::Error> {
    match cmd {
        Command::Batch { commands } => {
            let mut responses = Vec::with_capacity(commands.len());
            for c in commands {
                responses.push(apply(conn, c).await?);
            }
            Ok(Response::Batch { responses })
        }
        other => apply(conn, other).await,
    }
}

/// Applies `cmd`; an `Err` is a storage failure (the transaction is rolled back by the caller).
pub async fn apply(conn: &mut SqliteConnection, cmd: &Command) -> Result<Response, sqlx::Error> {
    match cmd {
        // Proposers never nest batches; answer deterministically rather than recurse.
        Command::Batch { .. } => Ok(Response::Conflict { message: "nested command batches are not applied".into() }),
        Command::CreateTeam { name, contact, token_hash, at, actor, token_id } => {
            let exists: Option<(String,)> =
                sqlx::query_as("SELECT name FROM teams WHERE name = ?").bind(name).fetch_optional(&mut *conn).await?;
            if exists.is_some() {
                audit(conn, at, actor, "team.create", name, "conflict").await?;
                return Ok(Response::Conflict { message: format!("team '{name}' already exists") });
            }
            sqlx::query("INSERT INTO teams (name, contact, token_hash, created_at) VALUES (?, ?, ?, ?)")
                .bind(name)
                .bind(contact)
                .bind(token_hash)
                .bind(at)
                .execute(&mut *conn)
                .await?;
            let id = token_id.clone().unwrap_or_else(|| format!("team-{name}"));
            sqlx::query(
                "INSERT INTO tokens (id, hash, scope, team, name, created_at) VALUES (?, ?, 'team', ?, 'created with the team', ?)",
            )
            .bind(&id)
            .bind(token_hash)
            .bind(name)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            audit(conn, at, actor, "team.create", name, "ok").await?;
            Ok(Response::Done)
        }
        Command::CreateToken { token, actor } => {
            if let Some(team) = &token.team {
                let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM teams WHERE name = ?")
                    .bind(team)
                    .fetch_optional(&mut *conn)
                    .await?;
                if exists.is_none() {
                    audit(conn, &token.created_at, actor, "token.create", &token.id, "no such team").await?;
                    return Ok(Response::NotFound { message: format!("team '{team}' does not exist") });
                }
            }
            sqlx::query("INSERT INTO tokens (id, hash, scope, team, name, created_at) VALUES (?, ?, ?, ?, ?, ?)")
                .bind(&token.id)
                .bind(&token.hash)
                .bind(&token.scope)
                .bind(&token.team)
                .bind(&token.name)
                .bind(&token.created_at)
                .execute(&mut *conn)
                .await?;
            audit(conn, &token.created_at, actor, "token.create", &token.id, "ok").await?;
            Ok(Response::Done)
        }
        Command::RevokeToken { id, at, actor } => {
            let r = sqlx::query("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(at)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("token {id} does not exist") });
            }
            audit(conn, at, actor, "token.revoke", id, "ok").await?;
            Ok(Response::Done)
        }
        Command::AddJoinToken { hash, role, expires_at, at, actor } => {
            sqlx::query("INSERT OR IGNORE INTO join_tokens (hash, role, expires_at, created_at) VALUES (?, ?, ?, ?)")
                .bind(hash)
                .bind(role)
                .bind(expires_at)
                .bind(at)
                .execute(&mut *conn)
                .await?;
            audit(conn, at, actor, "join_token.create", role, "ok").await?;
            Ok(Response::Done)
        }
        Command::UseJoinToken { hash, role, name, at } => {
            let r = sqlx::query(
                "UPDATE join_tokens SET used_at = ?, used_by = ?
                 WHERE hash = ? AND role = ? AND used_at IS NULL AND expires_at > ?",
            )
            .bind(at)
            .bind(name)
            .bind(hash)
            .bind(role)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            let target = format!("{role}/{name}");
            if r.rows_affected() == 0 {
                audit(conn, at, &target, "join", &target, "refused").await?;
                return Ok(Response::Conflict {
                    message: format!("the join token is unknown, already used, expired, or not for role '{role}'"),
                });
            }
            audit(conn, at, &target, "join", &target, "ok").await?;
            Ok(Response::Done)
        }
        Command::RevokeHost { host_id, at, actor } => {
            let r = sqlx::query("UPDATE hosts SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(at)
                .bind(host_id)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("host {host_id} does not exist") });
            }
            audit(conn, at, actor, "host.revoke", host_id, "ok").await?;
            Ok(Response::Done)
        }
        Command::SetDatabasePassword { id, password, at, actor } => {
            let r = sqlx::query("UPDATE databases SET password = ?, updated_at = ? WHERE id = ?")
                .bind(password)
                .bind(at)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            }
            audit(conn, at, actor, "database.credentials.rotate", id, "ok").await?;
            Ok(Response::Done)
        }
        Command::UpsertHost { host } => {
            sqlx::query(
                "INSERT INTO hosts (id, hostname, agent_addr, zone, cores, memory_bytes, memory_budget_bytes,
                    disk_free_bytes, disk_total_bytes, data_path, agent_version, pg_major, pg_host, pg_port,
                    state, registered_at, state_changed_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, agent_addr = excluded.agent_addr,
                    zone = excluded.zone, cores = excluded.cores, memory_bytes = excluded.memory_bytes,
                    memory_budget_bytes = excluded.memory_budget_bytes, disk_free_bytes = excluded.disk_free_bytes,
                    disk_total_bytes = excluded.disk_total_bytes, data_path = excluded.data_path,
                    agent_version = excluded.agent_version, pg_major = excluded.pg_major,
                    pg_host = excluded.pg_host, pg_port = excluded.pg_port,
                    state_changed_at = CASE WHEN hosts.state = excluded.state THEN hosts.state_changed_at
                                            ELSE excluded.state_changed_at END,
                    state = excluded.state",
            )
            .bind(&host.id)
            .bind(&host.hostname)
            .bind(&host.agent_addr)
            .bind(&host.zone)
            .bind(host.cores)
            .bind(host.memory_bytes)
            .bind(host.memory_budget_bytes)
            .bind(host.disk_free_bytes)
            .bind(host.disk_total_bytes)
            .bind(&host.data_path)
            .bind(&host.agent_version)
            .bind(host.pg_major)
            .bind(&host.pg_host)
            .bind(host.pg_port)
            .bind(&host.state)
            .bind(&host.registered_at)
            .bind(&host.state_changed_at)
            .execute(&mut *conn)
            .await?;
            Ok(Response::Done)
        }
        Command::SetHostState { host_id, state, at } => {
            let r = sqlx::query("UPDATE hosts SET state = ?, state_changed_at = ? WHERE id = ? AND state <> ?")
                .bind(state)
                .bind(at)
                .bind(host_id)
                .bind(state)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 1 {
                audit(conn, at, "controlplane", "host.state", host_id, state).await?;
            }
            Ok(Response::Done)
        }
        Command::CreateDatabase {
            database: db,
            new_cluster,
            new_members,
            operation,
            idempotency_key,
            actor,
            restore_of,
        } => {
            if let Some(key) = idempotency_key {
                let prior: Option<(String,)> =
                    sqlx::query_as("SELECT database_id FROM idempotency_keys WHERE team = ? AND key = ?")
                        .bind(&db.owner)
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await?;
                if let Some((id,)) = prior {
                    return Ok(Response::DatabaseCreated { id, existing: true });
                }
            }
            let team: Option<(String,)> = sqlx::query_as("SELECT name FROM teams WHERE name = ?")
                .bind(&db.owner)
                .fetch_optional(&mut *conn)
                .await?;
            if team.is_none() {
                return Ok(Response::NotFound { message: format!("owner team '{}' does not exist", db.owner) });
            }
            let dup: Option<(String,)> =
                sqlx::query_as("SELECT id FROM databases WHERE owner = ? AND name = ? AND state <> 'deleted'")
                    .bind(&db.owner)
                    .bind(&db.name)
                    .fetch_optional(&mut *conn)
                    .await?;
            if dup.is_some() {
                audit(conn, &db.created_at, actor, "database.create", &db.name, "conflict").await?;
                return Ok(Response::Conflict {
                    message: format!("team '{}' already has a database named '{}'", db.owner, db.name),
                });
            }
            let placed = Placing { cluster_id: &db.cluster_id, pg_name: &db.pg_name, database_id: &db.id };
            if let Some(refused) = claim_placement(conn, placed, new_cluster.as_ref(), new_members).await? {
                return Ok(refused);
            }
            sqlx::query(
                "INSERT INTO databases (id, name, owner, purpose, plan, availability, backup_retention_days, state,
                    cluster_id, pg_name, role_name, password, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&db.id)
            .bind(&db.name)
            .bind(&db.owner)
            .bind(&db.purpose)
            .bind(&db.plan)
            .bind(&db.availability)
            .bind(db.backup_retention_days)
            .bind(&db.state)
            .bind(&db.cluster_id)
            .bind(&db.pg_name)
            .bind(&db.role_name)
            .bind(&db.password)
            .bind(&db.created_at)
            .bind(&db.updated_at)
            .execute(&mut *conn)
            .await?;
            event(conn, &db.id, &db.created_at, &db.state, "created").await?;
            insert_operation(conn, operation).await?;
            if let Some(key) = idempotency_key {
                sqlx::query("INSERT INTO idempotency_keys (team, key, database_id) VALUES (?, ?, ?)")
                    .bind(&db.owner)
                    .bind(key)
                    .bind(&db.id)
                    .execute(&mut *conn)
                    .await?;
            }
            if let Some(r) = restore_of {
                sqlx::query(
                    "INSERT INTO restores (database_id, source_database_id, source_cluster_id, source_pg_name,
                        target_time, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(&db.id)
                .bind(&r.source_database_id)
                .bind(&r.source_cluster_id)
                .bind(&r.source_pg_name)
                .bind(&r.target_time)
                .bind(&r.created_at)
                .execute(&mut *conn)
                .await?;
                audit(conn, &db.created_at, actor, "database.restore", &r.source_database_id, &db.id).await?;
            }
            audit(conn, &db.created_at, actor, "database.create", &db.id, "accepted").await?;
            Ok(Response::DatabaseCreated { id: db.id.clone(), existing: false })
        }
        Command::StartBackup { backup: b, operation } => {
            let running: Option<(String,)> =
                sqlx::query_as("SELECT operation_id FROM backups WHERE cluster_id = ? AND state = ?")
                    .bind(&b.cluster_id)
                    .bind(op_state::RUNNING)
                    .fetch_optional(&mut *conn)
                    .await?;
            if let Some((id,)) = running {
                return Ok(Response::Conflict {
                    message: format!("backup {id} of cluster {} is still running", b.cluster_id),
                });
            }
            let cluster: Option<(String,)> = sqlx::query_as("SELECT id FROM clusters WHERE id = ?")
                .bind(&b.cluster_id)
                .fetch_optional(&mut *conn)
                .await?;
            if cluster.is_none() {
                return Ok(Response::NotFound { message: format!("cluster {} does not exist", b.cluster_id) });
            }
            sqlx::query(
                "INSERT INTO backups (operation_id, cluster_id, kind, requested_by, retention_days, state, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&b.operation_id)
            .bind(&b.cluster_id)
            .bind(&b.kind)
            .bind(&b.requested_by)
            .bind(b.retention_days)
            .bind(op_state::RUNNING)
            .bind(&b.created_at)
            .execute(&mut *conn)
            .await?;
            insert_operation(conn, operation).await?;
            audit(conn, &b.created_at, &b.requested_by, "backup.start", &b.cluster_id, "accepted").await?;
            Ok(Response::Done)
        }
        Command::FinishBackup {
            operation_id,
            succeeded,
            kind_taken,
            host_id,
            from_standby,
            label,
            size_bytes,
            stored_bytes,
            stop_lsn,
            error,
            at,
        } => {
            let state = if *succeeded { op_state::SUCCEEDED } else { op_state::FAILED };
            let r = sqlx::query(
                "UPDATE backups SET state = ?, kind_taken = ?, host_id = ?, from_standby = ?, label = ?,
                    size_bytes = ?, stored_bytes = ?, stop_lsn = ?, error = ?, finished_at = ?
                 WHERE operation_id = ? AND state = ?",
            )
            .bind(state)
            .bind(kind_taken)
            .bind(host_id)
            .bind(from_standby)
            .bind(label)
            .bind(size_bytes)
            .bind(stored_bytes)
            .bind(stop_lsn)
            .bind(error)
            .bind(at)
            .bind(operation_id)
            .bind(op_state::RUNNING)
            .execute(&mut *conn)
            .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("no running backup {operation_id}") });
            }
            sqlx::query("UPDATE operations SET state = ?, step = 'done', error = ?, updated_at = ? WHERE id = ?")
                .bind(state)
                .bind(error)
                .bind(at)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            let cluster: Option<(String,)> = sqlx::query_as("SELECT cluster_id FROM backups WHERE operation_id = ?")
                .bind(operation_id)
                .fetch_optional(&mut *conn)
                .await?;
            let target = cluster.map(|(c,)| format!("{c}/{label}")).unwrap_or_default();
            audit(conn, at, "controlplane", "backup.finish", &target, state).await?;
            Ok(Response::Done)
        }
        Command::ChangeDatabase { id, action, reason, sunset_at, new_owner, at, actor } => {
            let what = action.audit_name();
            let cur: Option<(String, String, String)> =
                sqlx::query_as("SELECT state, owner, name FROM databases WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((state, owner, name)) = cur else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            let to = match lifecycle::transition(&state, *action) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, what, id, &format!("refused: {message}")).await?;
                    return Ok(Response::Conflict { message });
                }
            };
            match action {
                Action::Transfer => {
                    let team: Option<(String,)> = sqlx::query_as("SELECT name FROM teams WHERE name = ?")
                        .bind(new_owner)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if team.is_none() {
                        return Ok(Response::NotFound { message: format!("team '{new_owner}' does not exist") });
                    }
                    if new_owner == &owner {
                        return Ok(Response::Conflict { message: format!("team '{owner}' owns the database already") });
                    }
                    let dup: Option<(String,)> = sqlx::query_as(
                        "SELECT id FROM databases WHERE owner = ? AND name = ? AND state <> 'deleted' AND id <> ?",
                    )
                    .bind(new_owner)
                    .bind(&name)
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    if dup.is_some() {
                        let message = format!(
                            "team '{new_owner}' already has a database named '{name}'; rename one of them first"
                        );
                        audit(conn, at, actor, what, id, &format!("refused: {message}")).await?;
                        return Ok(Response::Conflict { message });
                    }
                    sqlx::query("UPDATE databases SET owner = ?, updated_at = ? WHERE id = ?")
                        .bind(new_owner)
                        .bind(at)
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                    event(conn, id, at, to, &format!("owner {owner} → {new_owner}")).await?;
                }
                Action::Deprecate => {
                    sqlx::query(
                        "UPDATE databases SET state = ?, deprecation_reason = ?, sunset_at = ?, updated_at = ?
                         WHERE id = ?",
                    )
                    .bind(to)
                    .bind(reason)
                    .bind(sunset_at)
                    .bind(at)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                    event(conn, id, at, to, &format!("deprecated: {reason} (sunset {sunset_at})")).await?;
                }
                Action::Reactivate => {
                    sqlx::query(
                        "UPDATE databases SET state = ?, deprecation_reason = '', sunset_at = '', updated_at = ?
                         WHERE id = ?",
                    )
                    .bind(to)
                    .bind(at)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                    event(conn, id, at, to, "reactivated").await?;
                }
                Action::Archive | Action::Unarchive => {
                    return Ok(Response::Conflict { message: format!("{what} runs as an operation") });
                }
                Action::Delete => {
                    sqlx::query("UPDATE databases SET state = ?, deleted_at = ?, updated_at = ? WHERE id = ?")
                        .bind(to)
                        .bind(at)
                        .bind(at)
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                    event(conn, id, at, to, "deleted by its owner").await?;
                }
            }
            audit(conn, at, actor, what, id, "ok").await?;
            Ok(Response::Done)
        }
        Command::StartArchive { id, operation, at, actor } => {
            let Some(state) = db_state_of(conn, id).await? else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            if let Some(message) = moving(conn, id).await? {
                audit(conn, at, actor, "database.archive", id, &format!("refused: {message}")).await?;
                return Ok(Response::Conflict { message });
            }
            let to = match lifecycle::transition(&state, Action::Archive) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, "database.archive", id, &format!("refused: {message}")).await?;
                    return Ok(Response::Conflict { message });
                }
            };
            set_db_state(conn, id, to, at).await?;
            insert_operation(conn, operation).await?;
            event(conn, id, at, to, "archive requested").await?;
            audit(conn, at, actor, "database.archive", id, "accepted").await?;
            Ok(Response::Done)
        }
        Command::FinishArchive { operation_id, succeeded, location, key, bytes, sha256, error, at } => {
            let op: Option<(String,)> = sqlx::query_as("SELECT database_id FROM operations WHERE id = ? AND state = ?")
                .bind(operation_id)
                .bind(op_state::RUNNING)
                .fetch_optional(&mut *conn)
                .await?;
            let Some((id,)) = op else {
                return Ok(Response::NotFound { message: format!("no running operation {operation_id}") });
            };
            let (op_final, step) =
                if *succeeded { (op_state::SUCCEEDED, "done") } else { (op_state::FAILED, "failed") };
            sqlx::query("UPDATE operations SET state = ?, step = ?, error = ?, updated_at = ? WHERE id = ?")
                .bind(op_final)
                .bind(step)
                .bind(error)
                .bind(at)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            if *succeeded {
                sqlx::query(
                    "UPDATE databases SET state = ?, archive_location = ?, archive_key = ?, archive_bytes = ?,
                        archive_sha256 = ?, updated_at = ? WHERE id = ?",
                )
                .bind(db_state::ARCHIVED)
                .bind(location)
                .bind(key)
                .bind(bytes)
                .bind(sha256)
                .bind(at)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                event(conn, &id, at, db_state::ARCHIVED, &format!("archived to {location}")).await?;
            } else {
                // Back to what it was: deprecated databases keep their reason.
                sqlx::query(
                    "UPDATE databases SET state = CASE WHEN deprecation_reason <> '' THEN ? ELSE ? END,
                        updated_at = ? WHERE id = ?",
                )
                .bind(db_state::DEPRECATED)
                .bind(db_state::ACTIVE)
                .bind(at)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                event(conn, &id, at, "archive failed", error).await?;
            }
            audit(conn, at, "controlplane", "database.archive", &id, op_final).await?;
            Ok(Response::Done)
        }
        Command::Unarchive { id, cluster_id, pg_name, new_cluster, new_members, operation, at, actor } => {
            let Some(state) = db_state_of(conn, id).await? else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            let to = match lifecycle::transition(&state, Action::Unarchive) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, "database.unarchive", id, &format!("refused: {message}")).await?;
                    return Ok(Response::Conflict { message });
                }
            };
            let placed = Placing { cluster_id, pg_name, database_id: id };
            if let Some(refused) = claim_placement(conn, placed, new_cluster.as_ref(), new_members).await? {
                return Ok(refused);
            }
            sqlx::query(
                "UPDATE databases SET state = ?, cluster_id = ?, pg_name = ?, role_name = ?, updated_at = ? WHERE id = ?",
            )
            .bind(to)
            .bind(cluster_id)
            .bind(pg_name)
            .bind(pg_name)
            .bind(at)
            .bind(id)
            .execute(&mut *conn)
            .await?;
            insert_operation(conn, operation).await?;
            event(conn, id, at, to, &format!("restoring from its archive onto {cluster_id}")).await?;
            audit(conn, at, actor, "database.unarchive", id, "accepted").await?;
            Ok(Response::Done)
        }
        Command::ArchivePurged { id, at } => {
            sqlx::query("UPDATE databases SET archive_key = '', archive_location = '', updated_at = ? WHERE id = ?")
                .bind(at)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            event(conn, id, at, db_state::DELETED, "archive removed after the grace period").await?;
            audit(conn, at, "controlplane", "database.archive_purge", id, "ok").await?;
            Ok(Response::Done)
        }
        Command::UpdateOperation { id, step, attempts, error, at } => {
            let r = sqlx::query(
                "UPDATE operations SET step = ?, attempts = ?, error = ?, updated_at = ? WHERE id = ? AND state = ?",
            )
            .bind(step)
            .bind(attempts)
            .bind(error)
            .bind(at)
            .bind(id)
            .bind(op_state::RUNNING)
            .execute(&mut *conn)
            .await?;
            Ok(if r.rows_affected() == 1 {
                Response::Done
            } else {
                Response::NotFound { message: format!("no running operation {id}") }
            })
        }
        Command::SetClusterState { cluster_id, state, .. } => {
            sqlx::query("UPDATE clusters SET state = ? WHERE id = ?")
                .bind(state)
                .bind(cluster_id)
                .execute(&mut *conn)
                .await?;
            Ok(Response::Done)
        }
        Command::SetMember { cluster_id, host_id, role, state, at } => {
            let r = sqlx::query("UPDATE cluster_members SET role = ?, state = ? WHERE cluster_id = ? AND host_id = ?")
                .bind(role)
                .bind(state)
                .bind(cluster_id)
                .bind(host_id)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("{host_id} is not a member of {cluster_id}") });
            }
            audit(
                conn,
                at,
                "controlplane",
                "member.set",
                &format!("{cluster_id}/{host_id}"),
                &format!("{role}/{state}"),
            )
            .await?;
            Ok(Response::Done)
        }
        Command::Failover { cluster_id, from_epoch, new_primary, reason, at } => {
            let cur: Option<(i64, String)> = sqlx::query_as("SELECT epoch, primary_host FROM clusters WHERE id = ?")
                .bind(cluster_id)
                .fetch_optional(&mut *conn)
                .await?;
            let Some((epoch, old_primary)) = cur else {
                return Ok(Response::NotFound { message: format!("cluster {cluster_id} does not exist") });
            };
            if epoch != *from_epoch {
                return Ok(Response::Conflict {
                    message: format!("cluster {cluster_id} is at epoch {epoch}, not {from_epoch}"),
                });
            }
            let port: Option<(i64,)> =
                sqlx::query_as("SELECT port FROM cluster_members WHERE cluster_id = ? AND host_id = ?")
                    .bind(cluster_id)
                    .bind(new_primary)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((port,)) = port else {
                return Ok(Response::NotFound { message: format!("{new_primary} is not a member of {cluster_id}") });
            };
            sqlx::query("UPDATE clusters SET epoch = ?, primary_host = ?, port = ? WHERE id = ?")
                .bind(epoch + 1)
                .bind(new_primary)
                .bind(port)
                .bind(cluster_id)
                .execute(&mut *conn)
                .await?;
            if old_primary != *new_primary {
                sqlx::query("UPDATE cluster_members SET role = ? WHERE cluster_id = ? AND host_id = ?")
                    .bind(member_role::FAILED)
                    .bind(cluster_id)
                    .bind(&old_primary)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query("UPDATE cluster_members SET role = ? WHERE cluster_id = ? AND host_id = ?")
                .bind(member_role::PRIMARY)
                .bind(cluster_id)
                .bind(new_primary)
                .execute(&mut *conn)
                .await?;
            audit(
                conn,
                at,
                "controlplane",
                "cluster.failover",
                cluster_id,
                &format!("epoch {} -> {}: {old_primary} -> {new_primary} ({reason})", epoch, epoch + 1),
            )
            .await?;
            Ok(Response::Done)
        }
        Command::SetHostDraining { host_id, draining, at, actor } => {
            let r = sqlx::query("UPDATE hosts SET draining = ? WHERE id = ?")
                .bind(draining)
                .bind(host_id)
                .execute(&mut *conn)
                .await?;
            if r.rows_affected() == 0 {
                return Ok(Response::NotFound { message: format!("host {host_id} is not registered") });
            }
            let what = if *draining { "host.drain" } else { "host.undrain" };
            audit(conn, at, actor, what, host_id, "ok").await?;
            Ok(Response::Done)
        }
        Command::StartMove { mv, operation, new_cluster, new_members, actor } => {
            let at = &mv.created_at;
            let placed: Option<(String, String, String)> =
                sqlx::query_as("SELECT state, cluster_id, pg_name FROM databases WHERE id = ?")
                    .bind(&mv.database_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((state, cluster_id, pg_name)) = placed else {
                return Ok(Response::NotFound { message: format!("database {} does not exist", mv.database_id) });
            };
            let refused = if state != db_state::ACTIVE && state != db_state::DEPRECATED {
                Some(format!("the database is {state}: only a live (active or deprecated) database can be moved"))
            } else if cluster_id != mv.source_cluster_id || pg_name != mv.source_pg_name {
                Some("the database's placement changed meanwhile; ask again".to_string())
            } else if let Some(running) = moving(conn, &mv.database_id).await? {
                Some(running)
            } else {
                let role_taken: Option<(String,)> = sqlx::query_as(
                    "SELECT id FROM databases WHERE cluster_id = ? AND role_name = ? AND state <> 'deleted'",
                )
                .bind(&mv.target_cluster_id)
                .bind(&mv.target_role)
                .fetch_optional(&mut *conn)
                .await?;
                role_taken.map(|_| "placement raced with another change; retry the request".to_string())
            };
            if let Some(message) = refused {
                audit(conn, at, actor, "database.move", &mv.database_id, &format!("refused: {message}")).await?;
                return Ok(Response::Conflict { message });
            }
            let placing = Placing {
                cluster_id: &mv.target_cluster_id,
                pg_name: &mv.target_pg_name,
                database_id: &mv.database_id,
            };
            if let Some(refused) = claim_placement(conn, placing, new_cluster.as_ref(), new_members).await? {
                return Ok(refused);
            }
            sqlx::query(
                "INSERT INTO moves (operation_id, database_id, source_cluster_id, source_pg_name, source_role,
                    target_cluster_id, target_pg_name, target_role, move_password, requested_by, state, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&mv.operation_id)
            .bind(&mv.database_id)
            .bind(&mv.source_cluster_id)
            .bind(&mv.source_pg_name)
            .bind(&mv.source_role)
            .bind(&mv.target_cluster_id)
            .bind(&mv.target_pg_name)
            .bind(&mv.target_role)
            .bind(&mv.move_password)
            .bind(&mv.requested_by)
            .bind(move_state::COPYING)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            insert_operation(conn, operation).await?;
            let note = format!("moving from {} to {}", mv.source_cluster_id, mv.target_cluster_id);
            event(conn, &mv.database_id, at, &state, &note).await?;
            audit(conn, at, actor, "database.move", &mv.database_id, &format!("accepted: {note}")).await?;
            Ok(Response::Done)
        }
        Command::AbortMove { operation_id, reason, at, actor } => {
            let cur: Option<(String, String)> =
                sqlx::query_as("SELECT state, database_id FROM moves WHERE operation_id = ?")
                    .bind(operation_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((state, database_id)) = cur else {
                return Ok(Response::NotFound { message: format!("no move {operation_id}") });
            };
            if state != move_state::COPYING {
                let message = match state.as_str() {
                    move_state::SWITCHED => "the database was switched to its new cluster already: too late to abort",
                    _ => "the move has ended",
                };
                audit(conn, at, actor, "database.move_abort", &database_id, &format!("refused: {message}")).await?;
                return Ok(Response::Conflict { message: message.into() });
            }
            sqlx::query("UPDATE moves SET abort_reason = ? WHERE operation_id = ? AND abort_reason = ''")
                .bind(reason)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            audit(conn, at, actor, "database.move_abort", &database_id, "accepted").await?;
            Ok(Response::Done)
        }
        Command::SwitchMove { operation_id, write_pause_ms, at } => {
            let mv: Option<super::model::Move> = sqlx::query_as("SELECT * FROM moves WHERE operation_id = ?")
                .bind(operation_id)
                .fetch_optional(&mut *conn)
                .await?;
            let Some(mv) = mv else {
                return Ok(Response::NotFound { message: format!("no move {operation_id}") });
            };
            if mv.state == move_state::SWITCHED {
                return Ok(Response::Done);
            }
            if mv.state != move_state::COPYING || !mv.abort_reason.is_empty() {
                return Ok(Response::Conflict {
                    message: format!("the move is {} ({}): not switched", mv.state, mv.abort_reason),
                });
            }
            sqlx::query(
                "UPDATE databases SET cluster_id = ?, pg_name = ?, role_name = ?, updated_at = ?
                 WHERE id = ? AND cluster_id = ?",
            )
            .bind(&mv.target_cluster_id)
            .bind(&mv.target_pg_name)
            .bind(&mv.target_role)
            .bind(at)
            .bind(&mv.database_id)
            .bind(&mv.source_cluster_id)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE moves SET state = ?, write_pause_ms = ? WHERE operation_id = ?")
                .bind(move_state::SWITCHED)
                .bind(write_pause_ms)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            let state = db_state_of(conn, &mv.database_id).await?.unwrap_or_default();
            let note = format!(
                "moved from {} to {} (writes paused {write_pause_ms} ms)",
                mv.source_cluster_id, mv.target_cluster_id
            );
            event(conn, &mv.database_id, at, &state, &note).await?;
            audit(conn, at, "controlplane", "database.move_switch", &mv.database_id, &note).await?;
            Ok(Response::Done)
        }
        Command::FinishMove { operation_id, succeeded, error, detail, at } => {
            let cur: Option<(String, String)> =
                sqlx::query_as("SELECT state, database_id FROM moves WHERE operation_id = ?")
                    .bind(operation_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((state, database_id)) = cur else {
                return Ok(Response::NotFound { message: format!("no move {operation_id}") });
            };
            if state == move_state::DONE || state == move_state::ROLLED_BACK {
                return Ok(Response::Done);
            }
            // Success only once switched; before the switch the end is a rollback.
            let (move_final, op_final) = if state == move_state::SWITCHED {
                (move_state::DONE, if *succeeded { op_state::SUCCEEDED } else { op_state::FAILED })
            } else {
                (move_state::ROLLED_BACK, op_state::FAILED)
            };
            sqlx::query("UPDATE moves SET state = ?, finished_at = ? WHERE operation_id = ?")
                .bind(move_final)
                .bind(at)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "UPDATE operations SET state = ?, step = 'done', error = ?, detail = ?, updated_at = ?
                 WHERE id = ? AND state = ?",
            )
            .bind(op_final)
            .bind(error)
            .bind(detail)
            .bind(at)
            .bind(operation_id)
            .bind(op_state::RUNNING)
            .execute(&mut *conn)
            .await?;
            if move_final == move_state::ROLLED_BACK {
                let db_state = db_state_of(conn, &database_id).await?.unwrap_or_default();
                event(conn, &database_id, at, &db_state, &format!("move rolled back: {error}")).await?;
            }
            audit(conn, at, "controlplane", "database.move", &database_id, move_final).await?;
            Ok(Response::Done)
        }
        Command::FinishProvision { operation_id, succeeded, error, at } => {
            let op: Option<(String, String)> =
                sqlx::query_as("SELECT database_id, kind FROM operations WHERE id = ? AND state = ?")
                    .bind(operation_id)
                    .bind(op_state::RUNNING)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some((database_id, kind)) = op else {
                return Ok(Response::NotFound { message: format!("no running operation {operation_id}") });
            };
            let (op_final, db_final, step) = if *succeeded {
                (op_state::SUCCEEDED, db_state::ACTIVE, "done")
            } else {
                (op_state::FAILED, db_state::FAILED, "failed")
            };
            sqlx::query("UPDATE operations SET state = ?, step = ?, error = ?, updated_at = ? WHERE id = ?")
                .bind(op_final)
                .bind(step)
                .bind(error)
                .bind(at)
                .bind(operation_id)
                .execute(&mut *conn)
                .await?;
            // A database coming back from its archive that could not be loaded stays archived (the
            // archive is intact); a new one that failed is `failed`.
            let db_final = if !*succeeded && kind == op_kind::UNARCHIVE { db_state::ARCHIVED } else { db_final };
            sqlx::query("UPDATE databases SET state = ?, updated_at = ? WHERE id = ? AND state IN (?, ?)")
                .bind(db_final)
                .bind(at)
                .bind(&database_id)
                .bind(db_state::PROVISIONING)
                .bind(db_state::RESTORING)
                .execute(&mut *conn)
                .await?;
            event(conn, &database_id, at, db_final, if *succeeded { "provisioned" } else { error }).await?;
            audit(conn, at, "controlplane", "database.provision", &database_id, op_final).await?;
            Ok(Response::Done)
        }
    }
}

/// Where a database is being placed.
struct Placing<'a> {
    cluster_id: &'a str,
    pg_name: &'a str,
    database_id: &'a str,
}

/// Checks that the database's PostgreSQL name is free in its cluster and creates the cluster
/// if it is new; `Some(Conflict)` if a concurrent placement took either.
async fn claim_placement(
    conn: &mut SqliteConnection,
    p: Placing<'_>,
    new_cluster: Option<&super::model::Cluster>,
    new_members: &[Member],
) -> Result<Option<Response>, sqlx::Error> {
    let pg_taken: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM databases WHERE cluster_id = ? AND pg_name = ? AND state <> 'deleted' AND id <> ?",
    )
    .bind(p.cluster_id)
    .bind(p.pg_name)
    .bind(p.database_id)
    .fetch_optional(&mut *conn)
    .await?;
    if pg_taken.is_some() {
        return Ok(Some(Response::Conflict {
            message: "placement raced with another create; retry the request".to_string(),
        }));
    }
    match new_cluster {
        Some(c) => insert_cluster(conn, c, new_members).await,
        None => Ok(None),
    }
}

/// Inserts a new cluster and its members unless the cluster exists; `Some(Conflict)` if a
/// member's port was taken meanwhile.
async fn insert_cluster(
    conn: &mut SqliteConnection,
    c: &super::model::Cluster,
    new_members: &[Member],
) -> Result<Option<Response>, sqlx::Error> {
    let exists: Option<(String,)> =
        sqlx::query_as("SELECT id FROM clusters WHERE id = ?").bind(&c.id).fetch_optional(&mut *conn).await?;
    if exists.is_none() {
        let members = if new_members.is_empty() {
            vec![Member {
                cluster_id: c.id.clone(),
                host_id: c.primary_host.clone(),
                port: c.port,
                role: member_role::PRIMARY.into(),
                state: c.state.clone(),
            }]
        } else {
            new_members.to_vec()
        };
        for m in &members {
            let taken: Option<(String,)> =
                sqlx::query_as("SELECT cluster_id FROM cluster_members WHERE host_id = ? AND port = ?")
                    .bind(&m.host_id)
                    .bind(m.port)
                    .fetch_optional(&mut *conn)
                    .await?;
            if taken.is_some() {
                return Ok(Some(Response::Conflict {
                    message: "placement raced with another create; retry the request".to_string(),
                }));
            }
        }
        sqlx::query(
            "INSERT INTO clusters (id, pg_major, primary_host, port, epoch, state, created_at,
                availability, replication_password)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.id)
        .bind(c.pg_major)
        .bind(&c.primary_host)
        .bind(c.port)
        .bind(c.epoch)
        .bind(&c.state)
        .bind(&c.created_at)
        .bind(&c.availability)
        .bind(&c.replication_password)
        .execute(&mut *conn)
        .await?;
        for m in &members {
            sqlx::query("INSERT INTO cluster_members (cluster_id, host_id, port, role, state) VALUES (?, ?, ?, ?, ?)")
                .bind(&m.cluster_id)
                .bind(&m.host_id)
                .bind(m.port)
                .bind(&m.role)
                .bind(&m.state)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(None)
}

/// Why the database cannot start another change while a move of it runs, if one does.
async fn moving(conn: &mut SqliteConnection, database_id: &str) -> Result<Option<String>, sqlx::Error> {
    let running: Option<(String,)> =
        sqlx::query_as("SELECT operation_id FROM moves WHERE database_id = ? AND state IN (?, ?)")
            .bind(database_id)
            .bind(move_state::COPYING)
            .bind(move_state::SWITCHED)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(running
        .map(|(op,)| format!("the database is being moved to another cluster (operation {op}); wait until it ends")))
}

async fn db_state_of(conn: &mut SqliteConnection, id: &str) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT state FROM databases WHERE id = ?").bind(id).fetch_optional(&mut *conn).await?;
    Ok(row.map(|r| r.0))
}

async fn set_db_state(conn: &mut SqliteConnection, id: &str, state: &str, at: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE databases SET state = ?, updated_at = ? WHERE id = ?")
        .bind(state)
        .bind(at)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn insert_operation(conn: &mut SqliteConnection, op: &super::model::Operation) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO operations (id, kind, database_id, state, step, attempts, error, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&op.id)
    .bind(&op.kind)
    .bind(&op.database_id)
    .bind(&op.state)
    .bind(&op.step)
    .bind(op.attempts)
    .bind(&op.error)
    .bind(&op.created_at)
    .bind(&op.updated_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn event(conn: &mut SqliteConnection, db: &str, at: &str, state: &str, note: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO database_events (database_id, at, state, note) VALUES (?, ?, ?, ?)")
        .bind(db)
        .bind(at)
        .bind(state)
        .bind(note)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn audit(
    conn: &mut SqliteConnection,
    at: &str,
    actor: &str,
    action: &str,
    target: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit (at, actor, action, target, outcome) VALUES (?, ?, ?, ?, ?)")
        .bind(at)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(outcome)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

#[cfg(test)]
#[path = "apply_move_tests.rs"]
mod move_tests;
