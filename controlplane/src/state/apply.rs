//! Applies one [`Command`] inside the caller's transaction. Deterministic: the same command on
//! the same state gives the same rows and [`Response`] on every node.
//!
//! Runs synchronously on the state machine's own SQLite connection (see
//! [`super::store::Writer`]): a batch of commands is thousands of statements, and each one
//! costs microseconds here rather than a round trip through an async driver's worker thread.

use rusqlite::{params, Connection, OptionalExtension, Params};

use super::command::{Command, Response};
use super::lifecycle::{self, Action};
use super::model::{db_state, member_role, move_state, op_kind, op_state, Member};

/// Applies the command of one log entry: a [`Command::Batch`] command by command, anything else
/// as itself. An `Err` is a storage failure (the transaction is rolled back by the caller).
pub fn apply_entry(conn: &Connection, cmd: &Command) -> Result<Response, rusqlite::Error> {
    match cmd {
        Command::Batch { commands } => {
            let mut responses = Vec::with_capacity(commands.len());
            for c in commands {
                responses.push(apply(conn, c)?);
            }
            Ok(Response::Batch { responses })
        }
        other => apply(conn, other),
    }
}

/// Applies `cmd`; an `Err` is a storage failure (the transaction is rolled back by the caller).
pub fn apply(conn: &Connection, cmd: &Command) -> Result<Response, rusqlite::Error> {
    match cmd {
        // Proposers never nest batches; answer deterministically rather than recurse.
        Command::Batch { .. } => Ok(Response::Conflict { message: "nested command batches are not applied".into() }),
        Command::CreateTeam { name, contact, token_hash, at, actor, token_id } => {
            let exists: Option<(String,)> = optional(conn, "SELECT name FROM teams WHERE name = ?", params![name])?;
            if exists.is_some() {
                audit(conn, at, actor, "team.create", name, "conflict")?;
                return Ok(Response::Conflict { message: format!("team '{name}' already exists") });
            }
            exec(
                conn,
                "INSERT INTO teams (name, contact, token_hash, created_at) VALUES (?, ?, ?, ?)",
                params![name, contact, token_hash, at],
            )?;
            let id = token_id.clone().unwrap_or_else(|| format!("team-{name}"));
            exec(conn, "INSERT INTO tokens (id, hash, scope, team, name, created_at) VALUES (?, ?, 'team', ?, 'created with the team', ?)", params![&id, token_hash, name, at])?;
            audit(conn, at, actor, "team.create", name, "ok")?;
            Ok(Response::Done)
        }
        Command::CreateToken { token, actor } => {
            if let Some(team) = &token.team {
                let exists: Option<(String,)> = optional(conn, "SELECT name FROM teams WHERE name = ?", params![team])?;
                if exists.is_none() {
                    audit(conn, &token.created_at, actor, "token.create", &token.id, "no such team")?;
                    return Ok(Response::NotFound { message: format!("team '{team}' does not exist") });
                }
            }
            exec(
                conn,
                "INSERT INTO tokens (id, hash, scope, team, name, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                params![&token.id, &token.hash, &token.scope, &token.team, &token.name, &token.created_at],
            )?;
            audit(conn, &token.created_at, actor, "token.create", &token.id, "ok")?;
            Ok(Response::Done)
        }
        Command::RevokeToken { id, at, actor } => {
            let r = exec(conn, "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", params![at, id])?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("token {id} does not exist") });
            }
            audit(conn, at, actor, "token.revoke", id, "ok")?;
            Ok(Response::Done)
        }
        Command::AddJoinToken { hash, role, expires_at, at, actor } => {
            exec(
                conn,
                "INSERT OR IGNORE INTO join_tokens (hash, role, expires_at, created_at) VALUES (?, ?, ?, ?)",
                params![hash, role, expires_at, at],
            )?;
            audit(conn, at, actor, "join_token.create", role, "ok")?;
            Ok(Response::Done)
        }
        Command::UseJoinToken { hash, role, name, at } => {
            let r = exec(
                conn,
                "UPDATE join_tokens SET used_at = ?, used_by = ?
                 WHERE hash = ? AND role = ? AND used_at IS NULL AND expires_at > ?",
                params![at, name, hash, role, at],
            )?;
            let target = format!("{role}/{name}");
            if r == 0 {
                audit(conn, at, &target, "join", &target, "refused")?;
                return Ok(Response::Conflict {
                    message: format!("the join token is unknown, already used, expired, or not for role '{role}'"),
                });
            }
            audit(conn, at, &target, "join", &target, "ok")?;
            Ok(Response::Done)
        }
        Command::RevokeHost { host_id, at, actor } => {
            let r =
                exec(conn, "UPDATE hosts SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", params![at, host_id])?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("host {host_id} does not exist") });
            }
            audit(conn, at, actor, "host.revoke", host_id, "ok")?;
            Ok(Response::Done)
        }
        Command::SetDatabasePassword { id, password, at, actor } => {
            let r = exec(
                conn,
                "UPDATE databases SET password = ?, updated_at = ? WHERE id = ?",
                params![password, at, id],
            )?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            }
            audit(conn, at, actor, "database.credentials.rotate", id, "ok")?;
            Ok(Response::Done)
        }
        Command::UpsertHost { host } => {
            exec(
                conn,
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
                params![
                    &host.id,
                    &host.hostname,
                    &host.agent_addr,
                    &host.zone,
                    host.cores,
                    host.memory_bytes,
                    host.memory_budget_bytes,
                    host.disk_free_bytes,
                    host.disk_total_bytes,
                    &host.data_path,
                    &host.agent_version,
                    host.pg_major,
                    &host.pg_host,
                    host.pg_port,
                    &host.state,
                    &host.registered_at,
                    &host.state_changed_at
                ],
            )?;
            Ok(Response::Done)
        }
        Command::SetHostState { host_id, state, at } => {
            let r = exec(
                conn,
                "UPDATE hosts SET state = ?, state_changed_at = ? WHERE id = ? AND state <> ?",
                params![state, at, host_id, state],
            )?;
            if r == 1 {
                audit(conn, at, "controlplane", "host.state", host_id, state)?;
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
                let prior: Option<(String,)> = optional(
                    conn,
                    "SELECT database_id FROM idempotency_keys WHERE team = ? AND key = ?",
                    params![&db.owner, key],
                )?;
                if let Some((id,)) = prior {
                    return Ok(Response::DatabaseCreated { id, existing: true });
                }
            }
            let team: Option<(String,)> = optional(conn, "SELECT name FROM teams WHERE name = ?", params![&db.owner])?;
            if team.is_none() {
                return Ok(Response::NotFound { message: format!("owner team '{}' does not exist", db.owner) });
            }
            let dup: Option<(String,)> = optional(
                conn,
                "SELECT id FROM databases WHERE owner = ? AND name = ? AND state <> 'deleted'",
                params![&db.owner, &db.name],
            )?;
            if dup.is_some() {
                audit(conn, &db.created_at, actor, "database.create", &db.name, "conflict")?;
                return Ok(Response::Conflict {
                    message: format!("team '{}' already has a database named '{}'", db.owner, db.name),
                });
            }
            let placed = Placing { cluster_id: &db.cluster_id, pg_name: &db.pg_name, database_id: &db.id };
            if let Some(refused) = claim_placement(conn, placed, new_cluster.as_ref(), new_members)? {
                return Ok(refused);
            }
            exec(
                conn,
                "INSERT INTO databases (id, name, owner, purpose, plan, availability, backup_retention_days, state,
                    cluster_id, pg_name, role_name, password, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    &db.id,
                    &db.name,
                    &db.owner,
                    &db.purpose,
                    &db.plan,
                    &db.availability,
                    db.backup_retention_days,
                    &db.state,
                    &db.cluster_id,
                    &db.pg_name,
                    &db.role_name,
                    &db.password,
                    &db.created_at,
                    &db.updated_at
                ],
            )?;
            event(conn, &db.id, &db.created_at, &db.state, "created")?;
            insert_operation(conn, operation)?;
            if let Some(key) = idempotency_key {
                exec(
                    conn,
                    "INSERT INTO idempotency_keys (team, key, database_id) VALUES (?, ?, ?)",
                    params![&db.owner, key, &db.id],
                )?;
            }
            if let Some(r) = restore_of {
                exec(
                    conn,
                    "INSERT INTO restores (database_id, source_database_id, source_cluster_id, source_pg_name,
                        target_time, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    params![
                        &db.id,
                        &r.source_database_id,
                        &r.source_cluster_id,
                        &r.source_pg_name,
                        &r.target_time,
                        &r.created_at
                    ],
                )?;
                audit(conn, &db.created_at, actor, "database.restore", &r.source_database_id, &db.id)?;
            }
            audit(conn, &db.created_at, actor, "database.create", &db.id, "accepted")?;
            Ok(Response::DatabaseCreated { id: db.id.clone(), existing: false })
        }
        Command::StartBackup { backup: b, operation } => {
            let running: Option<(String,)> = optional(
                conn,
                "SELECT operation_id FROM backups WHERE cluster_id = ? AND state = ?",
                params![&b.cluster_id, op_state::RUNNING],
            )?;
            if let Some((id,)) = running {
                return Ok(Response::Conflict {
                    message: format!("backup {id} of cluster {} is still running", b.cluster_id),
                });
            }
            let cluster: Option<(String,)> =
                optional(conn, "SELECT id FROM clusters WHERE id = ?", params![&b.cluster_id])?;
            if cluster.is_none() {
                return Ok(Response::NotFound { message: format!("cluster {} does not exist", b.cluster_id) });
            }
            exec(
                conn,
                "INSERT INTO backups (operation_id, cluster_id, kind, requested_by, retention_days, state, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
                params![
                    &b.operation_id,
                    &b.cluster_id,
                    &b.kind,
                    &b.requested_by,
                    b.retention_days,
                    op_state::RUNNING,
                    &b.created_at
                ],
            )?;
            insert_operation(conn, operation)?;
            audit(conn, &b.created_at, &b.requested_by, "backup.start", &b.cluster_id, "accepted")?;
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
            let r = exec(
                conn,
                "UPDATE backups SET state = ?, kind_taken = ?, host_id = ?, from_standby = ?, label = ?,
                    size_bytes = ?, stored_bytes = ?, stop_lsn = ?, error = ?, finished_at = ?
                 WHERE operation_id = ? AND state = ?",
                params![
                    state,
                    kind_taken,
                    host_id,
                    from_standby,
                    label,
                    size_bytes,
                    stored_bytes,
                    stop_lsn,
                    error,
                    at,
                    operation_id,
                    op_state::RUNNING
                ],
            )?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("no running backup {operation_id}") });
            }
            exec(
                conn,
                "UPDATE operations SET state = ?, step = 'done', error = ?, updated_at = ? WHERE id = ?",
                params![state, error, at, operation_id],
            )?;
            let cluster: Option<(String,)> =
                optional(conn, "SELECT cluster_id FROM backups WHERE operation_id = ?", params![operation_id])?;
            let target = cluster.map(|(c,)| format!("{c}/{label}")).unwrap_or_default();
            audit(conn, at, "controlplane", "backup.finish", &target, state)?;
            Ok(Response::Done)
        }
        Command::ChangeDatabase { id, action, reason, sunset_at, new_owner, at, actor } => {
            let what = action.audit_name();
            let cur: Option<(String, String, String)> =
                optional(conn, "SELECT state, owner, name FROM databases WHERE id = ?", params![id])?;
            let Some((state, owner, name)) = cur else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            let to = match lifecycle::transition(&state, *action) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, what, id, &format!("refused: {message}"))?;
                    return Ok(Response::Conflict { message });
                }
            };
            match action {
                Action::Transfer => {
                    let team: Option<(String,)> =
                        optional(conn, "SELECT name FROM teams WHERE name = ?", params![new_owner])?;
                    if team.is_none() {
                        return Ok(Response::NotFound { message: format!("team '{new_owner}' does not exist") });
                    }
                    if new_owner == &owner {
                        return Ok(Response::Conflict { message: format!("team '{owner}' owns the database already") });
                    }
                    let dup: Option<(String,)> = optional(
                        conn,
                        "SELECT id FROM databases WHERE owner = ? AND name = ? AND state <> 'deleted' AND id <> ?",
                        params![new_owner, &name, id],
                    )?;
                    if dup.is_some() {
                        let message = format!(
                            "team '{new_owner}' already has a database named '{name}'; rename one of them first"
                        );
                        audit(conn, at, actor, what, id, &format!("refused: {message}"))?;
                        return Ok(Response::Conflict { message });
                    }
                    exec(
                        conn,
                        "UPDATE databases SET owner = ?, updated_at = ? WHERE id = ?",
                        params![new_owner, at, id],
                    )?;
                    event(conn, id, at, to, &format!("owner {owner} → {new_owner}"))?;
                }
                Action::Deprecate => {
                    exec(
                        conn,
                        "UPDATE databases SET state = ?, deprecation_reason = ?, sunset_at = ?, updated_at = ?
                         WHERE id = ?",
                        params![to, reason, sunset_at, at, id],
                    )?;
                    event(conn, id, at, to, &format!("deprecated: {reason} (sunset {sunset_at})"))?;
                }
                Action::Reactivate => {
                    exec(
                        conn,
                        "UPDATE databases SET state = ?, deprecation_reason = '', sunset_at = '', updated_at = ?
                         WHERE id = ?",
                        params![to, at, id],
                    )?;
                    event(conn, id, at, to, "reactivated")?;
                }
                Action::Archive | Action::Unarchive => {
                    return Ok(Response::Conflict { message: format!("{what} runs as an operation") });
                }
                Action::Delete => {
                    exec(
                        conn,
                        "UPDATE databases SET state = ?, deleted_at = ?, updated_at = ? WHERE id = ?",
                        params![to, at, at, id],
                    )?;
                    event(conn, id, at, to, "deleted by its owner")?;
                }
            }
            audit(conn, at, actor, what, id, "ok")?;
            Ok(Response::Done)
        }
        Command::StartArchive { id, operation, at, actor } => {
            let Some(state) = db_state_of(conn, id)? else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            if let Some(message) = moving(conn, id)? {
                audit(conn, at, actor, "database.archive", id, &format!("refused: {message}"))?;
                return Ok(Response::Conflict { message });
            }
            let to = match lifecycle::transition(&state, Action::Archive) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, "database.archive", id, &format!("refused: {message}"))?;
                    return Ok(Response::Conflict { message });
                }
            };
            set_db_state(conn, id, to, at)?;
            insert_operation(conn, operation)?;
            event(conn, id, at, to, "archive requested")?;
            audit(conn, at, actor, "database.archive", id, "accepted")?;
            Ok(Response::Done)
        }
        Command::FinishArchive { operation_id, succeeded, location, key, bytes, sha256, error, at } => {
            let op: Option<(String,)> = optional(
                conn,
                "SELECT database_id FROM operations WHERE id = ? AND state = ?",
                params![operation_id, op_state::RUNNING],
            )?;
            let Some((id,)) = op else {
                return Ok(Response::NotFound { message: format!("no running operation {operation_id}") });
            };
            let (op_final, step) =
                if *succeeded { (op_state::SUCCEEDED, "done") } else { (op_state::FAILED, "failed") };
            exec(
                conn,
                "UPDATE operations SET state = ?, step = ?, error = ?, updated_at = ? WHERE id = ?",
                params![op_final, step, error, at, operation_id],
            )?;
            if *succeeded {
                exec(
                    conn,
                    "UPDATE databases SET state = ?, archive_location = ?, archive_key = ?, archive_bytes = ?,
                        archive_sha256 = ?, updated_at = ? WHERE id = ?",
                    params![db_state::ARCHIVED, location, key, bytes, sha256, at, &id],
                )?;
                event(conn, &id, at, db_state::ARCHIVED, &format!("archived to {location}"))?;
            } else {
                // Back to what it was: deprecated databases keep their reason.
                exec(
                    conn,
                    "UPDATE databases SET state = CASE WHEN deprecation_reason <> '' THEN ? ELSE ? END,
                        updated_at = ? WHERE id = ?",
                    params![db_state::DEPRECATED, db_state::ACTIVE, at, &id],
                )?;
                event(conn, &id, at, "archive failed", error)?;
            }
            audit(conn, at, "controlplane", "database.archive", &id, op_final)?;
            Ok(Response::Done)
        }
        Command::Unarchive { id, cluster_id, pg_name, new_cluster, new_members, operation, at, actor } => {
            let Some(state) = db_state_of(conn, id)? else {
                return Ok(Response::NotFound { message: format!("database {id} does not exist") });
            };
            let to = match lifecycle::transition(&state, Action::Unarchive) {
                Ok(to) => to,
                Err(message) => {
                    audit(conn, at, actor, "database.unarchive", id, &format!("refused: {message}"))?;
                    return Ok(Response::Conflict { message });
                }
            };
            let placed = Placing { cluster_id, pg_name, database_id: id };
            if let Some(refused) = claim_placement(conn, placed, new_cluster.as_ref(), new_members)? {
                return Ok(refused);
            }
            exec(conn, "UPDATE databases SET state = ?, cluster_id = ?, pg_name = ?, role_name = ?, updated_at = ? WHERE id = ?", params![to, cluster_id, pg_name, pg_name, at, id])?;
            insert_operation(conn, operation)?;
            event(conn, id, at, to, &format!("restoring from its archive onto {cluster_id}"))?;
            audit(conn, at, actor, "database.unarchive", id, "accepted")?;
            Ok(Response::Done)
        }
        Command::ArchivePurged { id, at } => {
            exec(
                conn,
                "UPDATE databases SET archive_key = '', archive_location = '', updated_at = ? WHERE id = ?",
                params![at, id],
            )?;
            event(conn, id, at, db_state::DELETED, "archive removed after the grace period")?;
            audit(conn, at, "controlplane", "database.archive_purge", id, "ok")?;
            Ok(Response::Done)
        }
        Command::UpdateOperation { id, step, attempts, error, at } => {
            let r = exec(
                conn,
                "UPDATE operations SET step = ?, attempts = ?, error = ?, updated_at = ? WHERE id = ? AND state = ?",
                params![step, attempts, error, at, id, op_state::RUNNING],
            )?;
            Ok(if r == 1 {
                Response::Done
            } else {
                Response::NotFound { message: format!("no running operation {id}") }
            })
        }
        Command::SetClusterState { cluster_id, state, .. } => {
            exec(conn, "UPDATE clusters SET state = ? WHERE id = ?", params![state, cluster_id])?;
            Ok(Response::Done)
        }
        Command::SetMember { cluster_id, host_id, role, state, at } => {
            let r = exec(
                conn,
                "UPDATE cluster_members SET role = ?, state = ? WHERE cluster_id = ? AND host_id = ?",
                params![role, state, cluster_id, host_id],
            )?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("{host_id} is not a member of {cluster_id}") });
            }
            audit(
                conn,
                at,
                "controlplane",
                "member.set",
                &format!("{cluster_id}/{host_id}"),
                &format!("{role}/{state}"),
            )?;
            Ok(Response::Done)
        }
        Command::Failover { cluster_id, from_epoch, new_primary, reason, at } => {
            let cur: Option<(i64, String)> =
                optional(conn, "SELECT epoch, primary_host FROM clusters WHERE id = ?", params![cluster_id])?;
            let Some((epoch, old_primary)) = cur else {
                return Ok(Response::NotFound { message: format!("cluster {cluster_id} does not exist") });
            };
            if epoch != *from_epoch {
                return Ok(Response::Conflict {
                    message: format!("cluster {cluster_id} is at epoch {epoch}, not {from_epoch}"),
                });
            }
            let port: Option<(i64,)> = optional(
                conn,
                "SELECT port FROM cluster_members WHERE cluster_id = ? AND host_id = ?",
                params![cluster_id, new_primary],
            )?;
            let Some((port,)) = port else {
                return Ok(Response::NotFound { message: format!("{new_primary} is not a member of {cluster_id}") });
            };
            exec(
                conn,
                "UPDATE clusters SET epoch = ?, primary_host = ?, port = ? WHERE id = ?",
                params![epoch + 1, new_primary, port, cluster_id],
            )?;
            if old_primary != *new_primary {
                exec(
                    conn,
                    "UPDATE cluster_members SET role = ? WHERE cluster_id = ? AND host_id = ?",
                    params![member_role::FAILED, cluster_id, &old_primary],
                )?;
            }
            exec(
                conn,
                "UPDATE cluster_members SET role = ? WHERE cluster_id = ? AND host_id = ?",
                params![member_role::PRIMARY, cluster_id, new_primary],
            )?;
            audit(
                conn,
                at,
                "controlplane",
                "cluster.failover",
                cluster_id,
                &format!("epoch {} -> {}: {old_primary} -> {new_primary} ({reason})", epoch, epoch + 1),
            )?;
            Ok(Response::Done)
        }
        Command::SetHostDraining { host_id, draining, at, actor } => {
            let r = exec(conn, "UPDATE hosts SET draining = ? WHERE id = ?", params![draining, host_id])?;
            if r == 0 {
                return Ok(Response::NotFound { message: format!("host {host_id} is not registered") });
            }
            let what = if *draining { "host.drain" } else { "host.undrain" };
            audit(conn, at, actor, what, host_id, "ok")?;
            Ok(Response::Done)
        }
        Command::StartMove { mv, operation, new_cluster, new_members, actor } => {
            let at = &mv.created_at;
            let placed: Option<(String, String, String)> = optional(
                conn,
                "SELECT state, cluster_id, pg_name FROM databases WHERE id = ?",
                params![&mv.database_id],
            )?;
            let Some((state, cluster_id, pg_name)) = placed else {
                return Ok(Response::NotFound { message: format!("database {} does not exist", mv.database_id) });
            };
            let refused = if state != db_state::ACTIVE && state != db_state::DEPRECATED {
                Some(format!("the database is {state}: only a live (active or deprecated) database can be moved"))
            } else if cluster_id != mv.source_cluster_id || pg_name != mv.source_pg_name {
                Some("the database's placement changed meanwhile; ask again".to_string())
            } else if let Some(running) = moving(conn, &mv.database_id)? {
                Some(running)
            } else {
                let role_taken: Option<(String,)> = optional(
                    conn,
                    "SELECT id FROM databases WHERE cluster_id = ? AND role_name = ? AND state <> 'deleted'",
                    params![&mv.target_cluster_id, &mv.target_role],
                )?;
                role_taken.map(|_| "placement raced with another change; retry the request".to_string())
            };
            if let Some(message) = refused {
                audit(conn, at, actor, "database.move", &mv.database_id, &format!("refused: {message}"))?;
                return Ok(Response::Conflict { message });
            }
            let placing = Placing {
                cluster_id: &mv.target_cluster_id,
                pg_name: &mv.target_pg_name,
                database_id: &mv.database_id,
            };
            if let Some(refused) = claim_placement(conn, placing, new_cluster.as_ref(), new_members)? {
                return Ok(refused);
            }
            exec(
                conn,
                "INSERT INTO moves (operation_id, database_id, source_cluster_id, source_pg_name, source_role,
                    target_cluster_id, target_pg_name, target_role, move_password, requested_by, state, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    &mv.operation_id,
                    &mv.database_id,
                    &mv.source_cluster_id,
                    &mv.source_pg_name,
                    &mv.source_role,
                    &mv.target_cluster_id,
                    &mv.target_pg_name,
                    &mv.target_role,
                    &mv.move_password,
                    &mv.requested_by,
                    move_state::COPYING,
                    at
                ],
            )?;
            insert_operation(conn, operation)?;
            let note = format!("moving from {} to {}", mv.source_cluster_id, mv.target_cluster_id);
            event(conn, &mv.database_id, at, &state, &note)?;
            audit(conn, at, actor, "database.move", &mv.database_id, &format!("accepted: {note}"))?;
            Ok(Response::Done)
        }
        Command::AbortMove { operation_id, reason, at, actor } => {
            let cur: Option<(String, String)> =
                optional(conn, "SELECT state, database_id FROM moves WHERE operation_id = ?", params![operation_id])?;
            let Some((state, database_id)) = cur else {
                return Ok(Response::NotFound { message: format!("no move {operation_id}") });
            };
            if state != move_state::COPYING {
                let message = match state.as_str() {
                    move_state::SWITCHED => "the database was switched to its new cluster already: too late to abort",
                    _ => "the move has ended",
                };
                audit(conn, at, actor, "database.move_abort", &database_id, &format!("refused: {message}"))?;
                return Ok(Response::Conflict { message: message.into() });
            }
            exec(
                conn,
                "UPDATE moves SET abort_reason = ? WHERE operation_id = ? AND abort_reason = ''",
                params![reason, operation_id],
            )?;
            audit(conn, at, actor, "database.move_abort", &database_id, "accepted")?;
            Ok(Response::Done)
        }
        Command::SwitchMove { operation_id, write_pause_ms, at } => {
            let mv = conn
                .prepare_cached(
                    "SELECT state, abort_reason, database_id, source_cluster_id, target_cluster_id,
                        target_pg_name, target_role FROM moves WHERE operation_id = ?",
                )?
                .query_row(params![operation_id], |r| {
                    Ok(Switching {
                        state: r.get(0)?,
                        abort_reason: r.get(1)?,
                        database_id: r.get(2)?,
                        source_cluster_id: r.get(3)?,
                        target_cluster_id: r.get(4)?,
                        target_pg_name: r.get(5)?,
                        target_role: r.get(6)?,
                    })
                })
                .optional()?;
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
            exec(
                conn,
                "UPDATE databases SET cluster_id = ?, pg_name = ?, role_name = ?, updated_at = ?
                 WHERE id = ? AND cluster_id = ?",
                params![
                    &mv.target_cluster_id,
                    &mv.target_pg_name,
                    &mv.target_role,
                    at,
                    &mv.database_id,
                    &mv.source_cluster_id
                ],
            )?;
            exec(
                conn,
                "UPDATE moves SET state = ?, write_pause_ms = ? WHERE operation_id = ?",
                params![move_state::SWITCHED, write_pause_ms, operation_id],
            )?;
            let state = db_state_of(conn, &mv.database_id)?.unwrap_or_default();
            let note = format!(
                "moved from {} to {} (writes paused {write_pause_ms} ms)",
                mv.source_cluster_id, mv.target_cluster_id
            );
            event(conn, &mv.database_id, at, &state, &note)?;
            audit(conn, at, "controlplane", "database.move_switch", &mv.database_id, &note)?;
            Ok(Response::Done)
        }
        Command::FinishMove { operation_id, succeeded, error, detail, at } => {
            let cur: Option<(String, String)> =
                optional(conn, "SELECT state, database_id FROM moves WHERE operation_id = ?", params![operation_id])?;
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
            exec(
                conn,
                "UPDATE moves SET state = ?, finished_at = ? WHERE operation_id = ?",
                params![move_final, at, operation_id],
            )?;
            exec(
                conn,
                "UPDATE operations SET state = ?, step = 'done', error = ?, detail = ?, updated_at = ?
                 WHERE id = ? AND state = ?",
                params![op_final, error, detail, at, operation_id, op_state::RUNNING],
            )?;
            if move_final == move_state::ROLLED_BACK {
                let db_state = db_state_of(conn, &database_id)?.unwrap_or_default();
                event(conn, &database_id, at, &db_state, &format!("move rolled back: {error}"))?;
            }
            audit(conn, at, "controlplane", "database.move", &database_id, move_final)?;
            Ok(Response::Done)
        }
        Command::FinishProvision { operation_id, succeeded, error, at } => {
            let op: Option<(String, String)> = optional(
                conn,
                "SELECT database_id, kind FROM operations WHERE id = ? AND state = ?",
                params![operation_id, op_state::RUNNING],
            )?;
            let Some((database_id, kind)) = op else {
                return Ok(Response::NotFound { message: format!("no running operation {operation_id}") });
            };
            let (op_final, db_final, step) = if *succeeded {
                (op_state::SUCCEEDED, db_state::ACTIVE, "done")
            } else {
                (op_state::FAILED, db_state::FAILED, "failed")
            };
            exec(
                conn,
                "UPDATE operations SET state = ?, step = ?, error = ?, updated_at = ? WHERE id = ?",
                params![op_final, step, error, at, operation_id],
            )?;
            // A database coming back from its archive that could not be loaded stays archived (the
            // archive is intact); a new one that failed is `failed`.
            let db_final = if !*succeeded && kind == op_kind::UNARCHIVE { db_state::ARCHIVED } else { db_final };
            exec(
                conn,
                "UPDATE databases SET state = ?, updated_at = ? WHERE id = ? AND state IN (?, ?)",
                params![db_final, at, &database_id, db_state::PROVISIONING, db_state::RESTORING],
            )?;
            event(conn, &database_id, at, db_final, if *succeeded { "provisioned" } else { error })?;
            audit(conn, at, "controlplane", "database.provision", &database_id, op_final)?;
            Ok(Response::Done)
        }
    }
}

/// The columns of a move that switching it reads.
struct Switching {
    state: String,
    abort_reason: String,
    database_id: String,
    source_cluster_id: String,
    target_cluster_id: String,
    target_pg_name: String,
    target_role: String,
}

/// Runs one statement (prepared once per connection and cached); the number of rows it changed.
fn exec(conn: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// The first row of a query, if any, as a tuple.
fn optional<T: FromColumns>(conn: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<Option<T>> {
    conn.prepare_cached(sql)?.query_row(params, T::from_columns).optional()
}

/// A tuple read from a row's leading columns.
trait FromColumns: Sized {
    fn from_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

impl<A: rusqlite::types::FromSql> FromColumns for (A,) {
    fn from_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?,))
    }
}

impl<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql> FromColumns for (A, B) {
    fn from_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?))
    }
}

impl<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql, C: rusqlite::types::FromSql> FromColumns for (A, B, C) {
    fn from_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
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
fn claim_placement(
    conn: &Connection,
    p: Placing<'_>,
    new_cluster: Option<&super::model::Cluster>,
    new_members: &[Member],
) -> Result<Option<Response>, rusqlite::Error> {
    let pg_taken: Option<(String,)> = optional(
        conn,
        "SELECT id FROM databases WHERE cluster_id = ? AND pg_name = ? AND state <> 'deleted' AND id <> ?",
        params![p.cluster_id, p.pg_name, p.database_id],
    )?;
    if pg_taken.is_some() {
        return Ok(Some(Response::Conflict {
            message: "placement raced with another create; retry the request".to_string(),
        }));
    }
    match new_cluster {
        Some(c) => insert_cluster(conn, c, new_members),
        None => Ok(None),
    }
}

/// Inserts a new cluster and its members unless the cluster exists; `Some(Conflict)` if a
/// member's port was taken meanwhile.
fn insert_cluster(
    conn: &Connection,
    c: &super::model::Cluster,
    new_members: &[Member],
) -> Result<Option<Response>, rusqlite::Error> {
    let exists: Option<(String,)> = optional(conn, "SELECT id FROM clusters WHERE id = ?", params![&c.id])?;
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
            let taken: Option<(String,)> = optional(
                conn,
                "SELECT cluster_id FROM cluster_members WHERE host_id = ? AND port = ?",
                params![&m.host_id, m.port],
            )?;
            if taken.is_some() {
                return Ok(Some(Response::Conflict {
                    message: "placement raced with another create; retry the request".to_string(),
                }));
            }
        }
        exec(
            conn,
            "INSERT INTO clusters (id, pg_major, primary_host, port, epoch, state, created_at,
                availability, replication_password)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                &c.id,
                c.pg_major,
                &c.primary_host,
                c.port,
                c.epoch,
                &c.state,
                &c.created_at,
                &c.availability,
                &c.replication_password
            ],
        )?;
        for m in &members {
            exec(
                conn,
                "INSERT INTO cluster_members (cluster_id, host_id, port, role, state) VALUES (?, ?, ?, ?, ?)",
                params![&m.cluster_id, &m.host_id, m.port, &m.role, &m.state],
            )?;
        }
    }
    Ok(None)
}

/// Why the database cannot start another change while a move of it runs, if one does.
fn moving(conn: &Connection, database_id: &str) -> Result<Option<String>, rusqlite::Error> {
    let running: Option<(String,)> = optional(
        conn,
        "SELECT operation_id FROM moves WHERE database_id = ? AND state IN (?, ?)",
        params![database_id, move_state::COPYING, move_state::SWITCHED],
    )?;
    Ok(running
        .map(|(op,)| format!("the database is being moved to another cluster (operation {op}); wait until it ends")))
}

fn db_state_of(conn: &Connection, id: &str) -> Result<Option<String>, rusqlite::Error> {
    let row: Option<(String,)> = optional(conn, "SELECT state FROM databases WHERE id = ?", params![id])?;
    Ok(row.map(|r| r.0))
}

fn set_db_state(conn: &Connection, id: &str, state: &str, at: &str) -> Result<(), rusqlite::Error> {
    exec(conn, "UPDATE databases SET state = ?, updated_at = ? WHERE id = ?", params![state, at, id])?;
    Ok(())
}

fn insert_operation(conn: &Connection, op: &super::model::Operation) -> Result<(), rusqlite::Error> {
    exec(
        conn,
        "INSERT INTO operations (id, kind, database_id, state, step, attempts, error, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        params![
            &op.id,
            &op.kind,
            &op.database_id,
            &op.state,
            &op.step,
            op.attempts,
            &op.error,
            &op.created_at,
            &op.updated_at
        ],
    )?;
    Ok(())
}

fn event(conn: &Connection, db: &str, at: &str, state: &str, note: &str) -> Result<(), rusqlite::Error> {
    exec(
        conn,
        "INSERT INTO database_events (database_id, at, state, note) VALUES (?, ?, ?, ?)",
        params![db, at, state, note],
    )?;
    Ok(())
}

fn audit(
    conn: &Connection,
    at: &str,
    actor: &str,
    action: &str,
    target: &str,
    outcome: &str,
) -> Result<(), rusqlite::Error> {
    exec(
        conn,
        "INSERT INTO audit (at, actor, action, target, outcome) VALUES (?, ?, ?, ?, ?)",
        params![at, actor, action, target, outcome],
    )?;
    Ok(())
}

#[cfg(test)]
#[path = "apply_move_tests.rs"]
mod move_tests;
