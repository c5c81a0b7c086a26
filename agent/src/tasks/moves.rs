//! The two sides of a database move by logical replication. On the source (the primary that
//! serves the database now): a move role that may read everything and stream, a publication of
//! every table, the schema and the roles it needs; later its writers are blocked, and after the
//! switch everything is removed. On the target (the primary that will serve it): the roles, the
//! database and its schema, a subscription that copies and then streams every table; finishing
//! sets the sequences, drops the subscription and opens the database to its role. Every step
//! may run again (a retry, a new control-plane leader) and converges to the same result.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use steward_proto::v1::{MoveSourceReply, MoveTargetReply, RoleDefinition, SequenceValue};
use tokio_postgres::Client;

use super::dumps;
use crate::pg::logical::{self, move_name};
use crate::pg::sql::{describe, quote_ident, quote_literal, restrict_connect};
use crate::pg::{format_lsn, parse_lsn, role_exists, Instance};

/// Why a move step failed.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The move cannot go on as it is (tables that cannot be replicated, a schema changed under
    /// it): the control plane rolls it back instead of retrying.
    #[error("{0}")]
    Refused(String),
    /// Worth retrying.
    #[error("{0}")]
    Failed(String),
}

fn sql(e: tokio_postgres::Error) -> MoveError {
    MoveError::Failed(describe(&e))
}

fn failed(e: impl std::fmt::Display) -> MoveError {
    MoveError::Failed(e.to_string())
}

/// A database setting the target carries once FINISH ran, so a later PREPARE (a leader that
/// died between finishing and switching) leaves the finished copy alone.
const FINISHED_SETTING: &str = "steward.moved_in_by";

/// Where a move's scratch files go: `<data path>/moves/<operation>`.
pub fn work_dir(data_path: &Path, operation_id: &str) -> PathBuf {
    data_path.join("moves").join(operation_id)
}

/// One side of one move.
pub struct MoveSide {
    pub inst: Arc<Instance>,
    pub operation_id: String,
    pub database: String,
    pub role: String,
    pub work_dir: PathBuf,
}

impl MoveSide {
    fn name(&self) -> String {
        move_name(&self.operation_id)
    }

    async fn client(&self) -> Result<Client, MoveError> {
        self.inst.superuser_client().await.map_err(failed)
    }

    async fn db_client(&self) -> Result<Client, MoveError> {
        self.inst.superuser_client_to(&self.database).await.map_err(failed)
    }

    async fn database_exists(&self, c: &Client) -> Result<bool, MoveError> {
        Ok(c.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&self.database]).await.map_err(sql)?.is_some())
    }

    /// Drops the database and its owner role (kept, with a warning, if it owns something
    /// elsewhere), and the move's scratch directory.
    async fn drop_database_and_role(&self, c: &Client, side: &str) -> Result<(), MoveError> {
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&self.database)))
            .await
            .map_err(sql)?;
        if let Err(e) = c.batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&self.role))).await {
            tracing::warn!(role = %self.role, error = %describe(&e), "the moved database's role stays on the {side}");
        }
        dumps::remove_dir(&self.work_dir).await;
        Ok(())
    }

    async fn size(&self, c: &Client) -> Result<u64, MoveError> {
        let row = c
            .query_one(
                "SELECT coalesce(pg_database_size(datname), 0) FROM pg_database WHERE datname = $1",
                &[&self.database],
            )
            .await
            .map_err(sql)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}

// ----- source -----

/// Everything that stops the database from being moved, each with what to do.
pub async fn source_problems(side: &MoveSide) -> Result<Vec<String>, MoveError> {
    let c = side.db_client().await?;
    let mut problems = Vec::new();
    let wal_level: String = c.query_one("SHOW wal_level", &[]).await.map_err(sql)?.get(0);
    problems.extend(logical::wal_level_problem(&wal_level));
    for row in c.query(logical::UNREPLICABLE_TABLES, &[]).await.map_err(sql)? {
        let (table, ident, persistence): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        problems.extend(logical::table_problem(&table, &ident, &persistence, row.get(3), row.get(4)));
    }
    let objects: i64 = c.query_one("SELECT count(*) FROM pg_largeobject_metadata", &[]).await.map_err(sql)?.get(0);
    problems.extend(logical::large_object_problem(objects));
    Ok(problems)
}

/// Slot state: (exists, active, confirmed flush position).
async fn slot(c: &Client, name: &str) -> Result<(bool, bool, u64), MoveError> {
    let row = c
        .query_opt("SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&name])
        .await
        .map_err(sql)?;
    Ok(match row {
        None => (false, false, 0),
        Some(r) => {
            let confirmed: Option<String> = r.get(1);
            (true, r.get(0), confirmed.and_then(|l| parse_lsn(&l)).unwrap_or(0))
        }
    })
}

async fn current_lsn(c: &Client) -> Result<u64, MoveError> {
    let l: String = c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(sql)?.get(0);
    parse_lsn(&l).ok_or_else(|| MoveError::Failed(format!("unparsable LSN {l}")))
}

/// PREPARE on the source: the move role (reads everything, streams), the publication of every
/// table, and what the target needs to build an empty copy: schema and roles. `reset_slot`
/// removes a slot an earlier attempt left without a subscription.
pub async fn source_prepare(
    side: &MoveSide,
    move_password_scram: &str,
    keep_owner: bool,
    reset_slot: bool,
) -> Result<MoveSourceReply, MoveError> {
    let problems = source_problems(side).await?;
    if !problems.is_empty() {
        return Err(MoveError::Refused(format!("the database cannot be moved: {}", problems.join("; "))));
    }
    crate::pg::sql::check_verifier("move role", move_password_scram).map_err(|e| MoveError::Failed(e.to_string()))?;
    let name = side.name();
    let c = side.client().await?;
    let (role, db) = (quote_ident(&name), quote_ident(&side.database));
    let exists = role_exists(&c, &name).await.map_err(sql)?;
    let verb = if exists { "ALTER" } else { "CREATE" };
    c.batch_execute(&format!(
        "{verb} ROLE {role} WITH LOGIN REPLICATION BYPASSRLS PASSWORD {};
         GRANT pg_read_all_data TO {role};
         GRANT CONNECT ON DATABASE {db} TO {role};",
        quote_literal(move_password_scram)
    ))
    .await
    .map_err(sql)?;
    if reset_slot {
        drop_slot(&c, &name).await?;
    }
    let dc = side.db_client().await?;
    let published =
        dc.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name]).await.map_err(sql)?.is_some();
    if !published {
        dc.batch_execute(&format!("CREATE PUBLICATION {role} FOR ALL TABLES")).await.map_err(sql)?;
    }
    let schema_sql = dump_schema(side, keep_owner).await?;
    let mut roles = Vec::new();
    for row in dc.query(logical::REFERENCED_ROLES, &[&side.role]).await.map_err(sql)? {
        let password: Option<String> = row.get(2);
        roles.push(RoleDefinition {
            name: row.get(0),
            options: logical::safe_role_options(row.get(1)),
            password: password.unwrap_or_default(),
        });
    }
    let published: i64 = dc
        .query_one("SELECT count(*) FROM pg_publication_tables WHERE pubname = $1", &[&name])
        .await
        .map_err(sql)?
        .get(0);
    Ok(MoveSourceReply {
        schema_sql,
        roles,
        published_tables: u32::try_from(published).unwrap_or(u32::MAX),
        ..positions(side, &c).await?
    })
}

/// The move's slot (exists, active, confirmed position), the current WAL position and the
/// database's size: what every source reply carries.
async fn positions(side: &MoveSide, c: &Client) -> Result<MoveSourceReply, MoveError> {
    let (slot_exists, slot_active, confirmed) = slot(c, &side.name()).await?;
    Ok(MoveSourceReply {
        slot_exists,
        slot_active,
        confirmed_lsn: confirmed,
        current_lsn: current_lsn(c).await?,
        size_bytes: side.size(c).await?,
        ..Default::default()
    })
}

/// `pg_dump --schema-only` of the database: owners and grants kept when the target keeps the
/// owner role's name, left out otherwise (the target then creates everything as the owner).
async fn dump_schema(side: &MoveSide, keep_owner: bool) -> Result<Vec<u8>, MoveError> {
    let spec = side.inst.spec();
    let home = Path::new("/");
    let mut cmd = side.inst.run_as().command(&side.inst.binaries().bin("pg_dump"), home);
    cmd.args(["--schema-only", "--no-publications", "--no-subscriptions", "--no-tablespaces"]);
    cmd.arg("--no-security-labels");
    if !keep_owner {
        cmd.args(["--no-owner", "--no-privileges"]);
    }
    cmd.arg("--host").arg(&spec.socket_dir).args(["--port", &spec.port.to_string()]);
    cmd.args(["--username", "postgres", "--dbname", &side.database]);
    let out = crate::pg::runas::run(&mut cmd, &format!("pg_dump --schema-only of {}", side.database))
        .await
        .map_err(failed)?;
    Ok(out.stdout)
}

/// STATUS on the source: where WAL is, and what the subscriber confirmed.
pub async fn source_status(side: &MoveSide) -> Result<MoveSourceReply, MoveError> {
    let c = side.client().await?;
    positions(side, &c).await
}

fn revoked_file(side: &MoveSide) -> PathBuf {
    side.work_dir.join("revoked-connect.json")
}

/// BLOCK on the source: no role but the move's may connect to the database any more, every
/// other session in it ends, and the position after the last write is returned with the
/// sequences' values and the schema fingerprint.
pub async fn source_block(side: &MoveSide) -> Result<MoveSourceReply, MoveError> {
    let name = side.name();
    let c = side.client().await?;
    if !side.database_exists(&c).await? {
        return Err(MoveError::Failed(format!("database {} is not on this instance", side.database)));
    }
    let db = quote_ident(&side.database);
    let grantees: Vec<String> = c
        .query(logical::CONNECT_GRANTEES, &[&side.database, &name])
        .await
        .map_err(sql)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Remember who had CONNECT (besides the owner, whom an unblock always lets in again).
    let mut revoked: BTreeSet<String> = read_revoked(side).await;
    revoked.extend(grantees.iter().filter(|g| **g != side.role).cloned());
    if !revoked.is_empty() {
        tokio::fs::create_dir_all(&side.work_dir).await.map_err(failed)?;
        let text = serde_json::to_vec(&revoked).map_err(failed)?;
        tokio::fs::write(revoked_file(side), text).await.map_err(failed)?;
    }
    let mut stmt = format!("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;");
    for g in &grantees {
        stmt.push_str(&format!("REVOKE CONNECT ON DATABASE {db} FROM {};", quote_ident(g)));
    }
    c.batch_execute(&stmt).await.map_err(sql)?;
    // End every client session in the database but the move's walsender, all at once, and wait
    // until each is gone (pg_terminate_backend's own wait polls every 100 ms, one session after
    // the other). A session that passed its CONNECT check just before the revoke may show up a
    // moment later: look until a pass finds none.
    let mut ended: i64 = 0;
    for _ in 0..5 {
        let pids: Vec<i32> = c
            .query(
                // Chosen first, terminated after: in one WHERE clause PostgreSQL may call
                // pg_terminate_backend before the other conditions ruled a session out.
                "WITH chosen AS MATERIALIZED (
                     SELECT pid FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'
                       AND usename IS DISTINCT FROM $2)
                 SELECT pid FROM chosen WHERE pg_terminate_backend(pid)",
                &[&side.database, &name],
            )
            .await
            .map_err(sql)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pids.is_empty() {
            break;
        }
        ended += pids.len() as i64;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left: i64 = c
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY ($1)", &[&pids])
                .await
                .map_err(sql)?
                .get(0);
            if left == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(MoveError::Failed(format!("{left} sessions of {} did not end within 10 s", side.database)));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // A synchronous commit flushes WAL up to its own record, so every write of the ended
    // sessions (even one committed asynchronously) lies before the flush position read next.
    c.batch_execute("SET synchronous_commit = local; SELECT txid_current();").await.map_err(sql)?;
    let flushed: String = c.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]).await.map_err(sql)?.get(0);
    let block_lsn = parse_lsn(&flushed).ok_or_else(|| MoveError::Failed(format!("unparsable LSN {flushed}")))?;
    let dc = side.db_client().await?;
    let sequences = dc
        .query(logical::SEQUENCES, &[])
        .await
        .map_err(sql)?
        .iter()
        .map(|r| SequenceValue { name: r.get(0), last_value: r.get(1) })
        .collect();
    let fingerprint: String = dc.query_one(logical::SCHEMA_FINGERPRINT, &[]).await.map_err(sql)?.get(0);
    tracing::info!(database = %side.database, sessions_ended = ended, block_lsn = %format_lsn(block_lsn),
        "writers of the moving database blocked");
    Ok(MoveSourceReply {
        block_lsn,
        sequences,
        schema_fingerprint: fingerprint,
        sessions_ended: u32::try_from(ended).unwrap_or(u32::MAX),
        ..positions(side, &c).await?
    })
}

async fn read_revoked(side: &MoveSide) -> BTreeSet<String> {
    match tokio::fs::read(revoked_file(side)).await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => BTreeSet::new(),
    }
}

/// Removes the move's slot, ending the walsender that streams from it first.
async fn drop_slot(c: &Client, name: &str) -> Result<(), MoveError> {
    for _ in 0..20 {
        let row = c
            .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&name])
            .await
            .map_err(sql)?;
        let Some(row) = row else { return Ok(()) };
        let pid: Option<i32> = row.get(0);
        if let Some(pid) = pid {
            c.execute("SELECT pg_terminate_backend($1, 5000)", &[&pid]).await.map_err(sql)?;
        }
        match c.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await {
            Ok(_) => return Ok(()),
            // Dropped meanwhile, or the subscriber reconnected at once: look again.
            Err(e) => tracing::debug!(slot = name, error = %describe(&e), "dropping the move's slot: retrying"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(MoveError::Failed(format!("replication slot {name} stays in use; is a subscriber still connected?")))
}

/// Publication (in the database, if it still exists), slot and move role.
async fn remove_move_objects(side: &MoveSide, c: &Client) -> Result<(), MoveError> {
    let name = side.name();
    if side.database_exists(c).await? {
        let dc = side.db_client().await?;
        dc.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&name))).await.map_err(sql)?;
    }
    drop_slot(c, &name).await?;
    let role = quote_ident(&name);
    let exists = role_exists(c, &name).await.map_err(sql)?;
    if exists {
        // Its sessions (a walsender) first; then what it was granted, then the role.
        c.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1", &[&name])
            .await
            .map_err(sql)?;
        let mut stmt = String::new();
        if side.database_exists(c).await? {
            stmt.push_str(&format!("REVOKE CONNECT ON DATABASE {} FROM {role};", quote_ident(&side.database)));
        }
        stmt.push_str(&format!("REVOKE pg_read_all_data FROM {role}; DROP ROLE IF EXISTS {role};"));
        c.batch_execute(&stmt).await.map_err(sql)?;
    }
    Ok(())
}

/// UNBLOCK on the source (the move is rolled back): the database's roles may connect again, and
/// the move's publication, slot and role are gone.
pub async fn source_unblock(side: &MoveSide) -> Result<MoveSourceReply, MoveError> {
    let c = side.client().await?;
    if side.database_exists(&c).await? {
        let mut grants: Vec<String> = restrict_connect(&side.database, &side.role).into();
        let db = quote_ident(&side.database);
        grants.extend(
            read_revoked(side).await.iter().map(|g| format!("GRANT CONNECT ON DATABASE {db} TO {}", quote_ident(g))),
        );
        // A role dropped meanwhile must not keep the owner out: grant one by one.
        for g in &grants {
            if let Err(e) = c.batch_execute(g).await {
                tracing::warn!(statement = %g, error = %describe(&e), "restoring CONNECT failed");
            }
        }
    }
    remove_move_objects(side, &c).await?;
    dumps::remove_dir(&side.work_dir).await;
    tracing::info!(database = %side.database, "move rolled back on the source: writers let in again");
    Ok(MoveSourceReply::default())
}

/// DROP on the source, once the control plane switched the database to its target: the
/// database, its owner role and the move's objects go.
pub async fn source_drop(side: &MoveSide) -> Result<MoveSourceReply, MoveError> {
    let c = side.client().await?;
    remove_move_objects(side, &c).await?;
    side.drop_database_and_role(&c, "source").await?;
    tracing::info!(database = %side.database, "moved database removed from the source");
    Ok(MoveSourceReply::default())
}

// ----- target -----

/// What PREPARE on the target needs besides the side.
pub struct TargetPlan<'a> {
    pub password_scram: &'a str,
    pub schema_sql: &'a [u8],
    pub roles: &'a [RoleDefinition],
    pub keep_owner: bool,
    pub source_host: &'a str,
    pub source_port: u16,
    pub source_database: &'a str,
    pub move_password: &'a str,
    pub source_slot_exists: bool,
}

async fn finished(side: &MoveSide, c: &Client) -> Result<bool, MoveError> {
    let want = format!("{FINISHED_SETTING}={}", side.operation_id);
    let row = c
        .query_opt(
            "SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
             WHERE d.datname = $1 AND s.setrole = 0 AND $2 = ANY (s.setconfig)",
            &[&side.database, &want],
        )
        .await
        .map_err(sql)?;
    Ok(row.is_some())
}

async fn subscription_exists(c: &Client, name: &str) -> Result<bool, MoveError> {
    Ok(c.query_opt("SELECT 1 FROM pg_subscription WHERE subname = $1", &[&name]).await.map_err(sql)?.is_some())
}

/// Drops the move's subscription without touching the source's slot (the source removes it).
async fn drop_subscription(side: &MoveSide) -> Result<(), MoveError> {
    let name = side.name();
    let c = side.client().await?;
    if !subscription_exists(&c, &name).await? || !side.database_exists(&c).await? {
        return Ok(());
    }
    let dc = side.db_client().await?;
    let sub = quote_ident(&name);
    dc.batch_execute(&format!("ALTER SUBSCRIPTION {sub} DISABLE")).await.map_err(sql)?;
    dc.batch_execute(&format!("ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)")).await.map_err(sql)?;
    dc.batch_execute(&format!("DROP SUBSCRIPTION {sub}")).await.map_err(sql)?;
    Ok(())
}

/// PREPARE on the target: roles, an empty database with the source's schema, and the
/// subscription that copies every table and then streams changes. Leaves a finished copy, or a
/// subscription whose slot still exists, as it is.
pub async fn target_prepare(side: &MoveSide, p: &TargetPlan<'_>) -> Result<MoveTargetReply, MoveError> {
    let name = side.name();
    let c = side.client().await?;
    if finished(side, &c).await? {
        return target_status(side).await;
    }
    if subscription_exists(&c, &name).await? {
        if p.source_slot_exists {
            return target_status(side).await;
        }
        tracing::warn!(database = %side.database, "the source lost the move's slot: copying again from scratch");
        drop_subscription(side).await?;
    }
    crate::pg::sql::check_verifier(&side.role, p.password_scram).map_err(|e| MoveError::Failed(e.to_string()))?;
    for r in p.roles {
        crate::pg::sql::validate_identifier("role", &r.name).map_err(|e| MoveError::Failed(e.to_string()))?;
        let exists = role_exists(&c, &r.name).await.map_err(sql)?;
        if !exists {
            let mut stmt = format!("CREATE ROLE {} {}", quote_ident(&r.name), logical::safe_role_options(&r.options));
            if crate::pg::sql::check_verifier(&r.name, &r.password).is_ok() {
                stmt.push_str(&format!(" PASSWORD {}", quote_literal(&r.password)));
            }
            c.batch_execute(&stmt).await.map_err(sql)?;
        }
    }
    // The owner: no login until the move finishes (the copy must not take writes of its own).
    let owner = quote_ident(&side.role);
    let exists = role_exists(&c, &side.role).await.map_err(sql)?;
    let verb = if exists { "ALTER" } else { "CREATE" };
    c.batch_execute(&format!("{verb} ROLE {owner} WITH NOLOGIN PASSWORD {}", quote_literal(p.password_scram)))
        .await
        .map_err(sql)?;
    // An empty database, whatever an interrupted attempt left.
    let db = quote_ident(&side.database);
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.map_err(sql)?;
    c.batch_execute(&format!("CREATE DATABASE {db} OWNER {owner}")).await.map_err(sql)?;
    c.batch_execute(&format!("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")).await.map_err(sql)?;
    apply_schema(side, p).await?;
    let conninfo =
        logical::subscription_conninfo(p.source_host, p.source_port, p.source_database, &name, p.move_password);
    let dc = side.db_client().await?;
    dc.batch_execute(&format!(
        "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub}
         WITH (copy_data = true, create_slot = true, slot_name = {slot}, synchronous_commit = off)",
        sub = quote_ident(&name),
        conn = quote_literal(&conninfo),
        slot = quote_literal(&name),
    ))
    .await
    .map_err(|e| MoveError::Failed(format!("subscribing to the source: {}", describe(&e))))?;
    tracing::info!(database = %side.database, source = %p.source_host, "move subscription created");
    target_status(side).await
}

/// Runs the source's schema in the new database in one transaction, as the owner when the
/// dump carries no owners.
async fn apply_schema(side: &MoveSide, p: &TargetPlan<'_>) -> Result<(), MoveError> {
    let run_as = side.inst.run_as().clone();
    dumps::make_dir(&side.work_dir, &run_as).map_err(MoveError::Failed)?;
    let file = side.work_dir.join("schema.sql");
    let mut text = Vec::new();
    if !p.keep_owner {
        text.extend_from_slice(format!("SET ROLE {};\n", quote_ident(&side.role)).as_bytes());
    }
    text.extend_from_slice(p.schema_sql);
    tokio::fs::write(&file, &text).await.map_err(|e| MoveError::Failed(format!("writing {}: {e}", file.display())))?;
    run_as.chown(&file).map_err(failed)?;
    let spec = side.inst.spec();
    let mut cmd = run_as.command(&side.inst.binaries().bin("psql"), &side.work_dir);
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f"]).arg(&file);
    cmd.arg("--host").arg(&spec.socket_dir).args(["--port", &spec.port.to_string()]);
    cmd.args(["--username", "postgres", "--dbname", &side.database]);
    let result = crate::pg::runas::run(&mut cmd, &format!("psql (schema of {})", side.database)).await;
    let _ = tokio::fs::remove_file(&file).await;
    result.map_err(|e| MoveError::Failed(format!("creating the schema on the target: {e}")))?;
    Ok(())
}

/// STATUS on the target: finished, or how far the initial copy is.
pub async fn target_status(side: &MoveSide) -> Result<MoveTargetReply, MoveError> {
    let name = side.name();
    let c = side.client().await?;
    if !side.database_exists(&c).await? {
        return Ok(MoveTargetReply::default());
    }
    if finished(side, &c).await? {
        return Ok(MoveTargetReply { finished: true, size_bytes: side.size(&c).await?, ..Default::default() });
    }
    // pg_subscription is shared, pg_subscription_rel is per database: ask the database itself.
    let dc = side.db_client().await?;
    let states: Vec<String> = dc
        .query(
            "SELECT r.srsubstate::text FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
             WHERE s.subname = $1",
            &[&name],
        )
        .await
        .map_err(sql)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (tables_total, tables_ready) = logical::tables_ready(&states);
    // PostgreSQL 15+ counts apply and copy errors per subscription.
    let mut error = String::new();
    let has_stats: bool = c
        .query_one("SELECT to_regclass('pg_catalog.pg_stat_subscription_stats') IS NOT NULL", &[])
        .await
        .map_err(sql)?
        .get(0);
    if has_stats {
        if let Some(row) = c
            .query_opt(
                "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subname = $1",
                &[&name],
            )
            .await
            .map_err(sql)?
        {
            let (apply, sync): (i64, i64) = (row.get(0), row.get(1));
            if apply + sync > 0 {
                error = format!(
                    "the subscription reported {apply} apply and {sync} copy errors (see the target's PostgreSQL log)"
                );
            }
        }
    }
    Ok(MoveTargetReply {
        finished: false,
        tables_total,
        tables_ready,
        error,
        size_bytes: side.size(&c).await?,
        subscribed: subscription_exists(&c, &name).await?,
    })
}

/// FINISH on the target, with the source's writers blocked and everything they wrote applied:
/// the schema must still match, sequences take the source's values, the subscription goes, the
/// owner may log in, and (HA) a synchronous commit makes sure the standbys have it all.
pub async fn target_finish(
    side: &MoveSide,
    password_scram: &str,
    sequences: &[SequenceValue],
    fingerprint: &str,
) -> Result<MoveTargetReply, MoveError> {
    let c = side.client().await?;
    if !side.database_exists(&c).await? {
        return Err(MoveError::Failed(format!("database {} is not on the target", side.database)));
    }
    if finished(side, &c).await? {
        return target_status(side).await;
    }
    let dc = side.db_client().await?;
    let mine: String = dc.query_one(logical::SCHEMA_FINGERPRINT, &[]).await.map_err(sql)?.get(0);
    if mine != fingerprint {
        return Err(MoveError::Refused(
            "the schema of the database changed during the move (tables or columns added, dropped or altered), \
             which logical replication does not carry: the move is rolled back; run it again"
                .into(),
        ));
    }
    for s in sequences {
        dc.execute("SELECT setval($1::text::regclass, $2, true)", &[&s.name, &s.last_value])
            .await
            .map_err(|e| MoveError::Failed(format!("setting sequence {}: {}", s.name, describe(&e))))?;
    }
    drop_subscription(side).await?;
    crate::pg::sql::check_verifier(&side.role, password_scram).map_err(|e| MoveError::Failed(e.to_string()))?;
    let mut stmt =
        format!("ALTER ROLE {} WITH LOGIN PASSWORD {};", quote_ident(&side.role), quote_literal(password_scram));
    for s in restrict_connect(&side.database, &side.role) {
        stmt.push_str(&s);
        stmt.push(';');
    }
    stmt.push_str(&format!(
        "ALTER DATABASE {} SET {FINISHED_SETTING} = {}",
        quote_ident(&side.database),
        quote_literal(&side.operation_id)
    ));
    c.batch_execute(&stmt).await.map_err(sql)?;
    // Commits of the subscription were asynchronous; this one waits for the synchronous
    // standbys (if any), which then have every earlier record too.
    c.batch_execute("SET synchronous_commit = on; SELECT txid_current();").await.map_err(sql)?;
    dumps::remove_dir(&side.work_dir).await;
    tracing::info!(database = %side.database, sequences = sequences.len(), "move finished on the target");
    target_status(side).await
}

/// ABORT on the target: the subscription and the copy go (the owner role too, unless it owns
/// something else).
pub async fn target_abort(side: &MoveSide) -> Result<MoveTargetReply, MoveError> {
    drop_subscription(side).await?;
    let c = side.client().await?;
    side.drop_database_and_role(&c, "target").await?;
    tracing::info!(database = %side.database, "move aborted on the target");
    Ok(MoveTargetReply::default())
}
