//! Logical dumps, shared by clones and archives: `pg_dump` of one database, loading a dump into
//! a (re-created) database owned by its role, the mark that makes loading idempotent, and row
//! counts that verify a dump by restoring it.

use std::collections::BTreeMap;
use std::path::Path;

use crate::pg::sql::{describe, quote_ident, quote_literal};
use crate::pg::{Instance, RunAs};

fn sql(e: tokio_postgres::Error) -> String {
    describe(&e)
}

/// The comment a loaded database carries, so a retried operation leaves it alone.
pub fn marker(operation_id: &str) -> String {
    format!("steward: restored by operation {operation_id}")
}

/// Whether `database` was filled by `operation_id` already.
pub async fn already_loaded(inst: &Instance, database: &str, operation_id: &str) -> Result<bool, String> {
    let client = inst.superuser_client().await.map_err(|e| e.to_string())?;
    let done: Option<String> = client
        .query_opt("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", &[&database])
        .await
        .map_err(sql)?
        .and_then(|row| row.get(0));
    Ok(done.as_deref() == Some(marker(operation_id).as_str()))
}

/// `pg_dump --format=custom` of `database` on the server at `socket_dir`:`port` into `file`,
/// as `run_as` (who must be able to write `file`'s directory).
pub async fn dump(
    inst: &Instance,
    run_as: &RunAs,
    socket_dir: &Path,
    port: u16,
    database: &str,
    file: &Path,
) -> Result<u64, String> {
    let home = file.parent().unwrap_or(Path::new("/"));
    let mut cmd = run_as.command(&inst.binaries().bin("pg_dump"), home);
    cmd.arg("--format=custom").arg("--file").arg(file).arg("--host").arg(socket_dir);
    cmd.args(["--port", &port.to_string(), "--username", "postgres", "--dbname", database]);
    crate::pg::runas::run(&mut cmd, &format!("pg_dump of {database}")).await.map_err(|e| e.to_string())?;
    std::fs::metadata(file).map(|m| m.len()).map_err(|e| format!("reading {}: {e}", file.display()))
}

/// Who owns a loaded database and its objects.
pub enum Owner<'a> {
    /// The database's role (created or updated with this SCRAM verifier), the only one that
    /// may connect.
    Role { role: &'a str, password_scram: &'a str },
    /// The superuser (scratch databases that only the agent uses).
    Superuser,
}

/// Restores `file` into `database` of `inst`, which is dropped and created anew, objects owned
/// by `owner`, grants left out; marks it loaded by `operation_id` (when given) once complete.
pub async fn load(
    inst: &Instance,
    file: &Path,
    database: &str,
    owner: Owner<'_>,
    operation_id: Option<&str>,
) -> Result<(), String> {
    let client = inst.superuser_client().await.map_err(|e| e.to_string())?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(database)))
        .await
        .map_err(sql)?;
    let spec = inst.spec();
    let home = file.parent().unwrap_or(Path::new("/"));
    let mut cmd = inst.run_as().command(&inst.binaries().bin("pg_restore"), home);
    cmd.args(["--no-owner", "--no-privileges", "--exit-on-error"]);
    match owner {
        Owner::Role { role, password_scram } => {
            inst.ensure_database(database, role, password_scram).await.map_err(|e| e.to_string())?;
            cmd.args(["--role", role]);
        }
        Owner::Superuser => {
            client.batch_execute(&format!("CREATE DATABASE {}", quote_ident(database))).await.map_err(sql)?;
        }
    }
    cmd.arg("--host").arg(&spec.socket_dir).args(["--port", &spec.port.to_string()]);
    cmd.args(["--username", "postgres", "--dbname", database]).arg(file);
    crate::pg::runas::run(&mut cmd, &format!("pg_restore into {database}")).await.map_err(|e| e.to_string())?;
    if let Some(op) = operation_id {
        let comment = format!("COMMENT ON DATABASE {} IS {}", quote_ident(database), quote_literal(&marker(op)));
        client.batch_execute(&comment).await.map_err(sql)?;
    }
    Ok(())
}

/// Exact row count of every table of `database` (schema-qualified names).
pub async fn row_counts(inst: &Instance, database: &str) -> Result<BTreeMap<String, i64>, String> {
    let client = inst.superuser_client_to(database).await.map_err(|e| e.to_string())?;
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(sql)?;
    let mut counts = BTreeMap::new();
    for t in tables {
        let (schema, table): (String, String) = (t.get(0), t.get(1));
        let q = format!("SELECT count(*) FROM {}.{}", quote_ident(&schema), quote_ident(&table));
        let n: i64 = client.query_one(&q, &[]).await.map_err(sql)?.get(0);
        counts.insert(format!("{schema}.{table}"), n);
    }
    Ok(counts)
}

/// Removes a scratch directory, logging (not failing) when it cannot.
pub async fn remove_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a scratch directory failed");
        }
    }
}

/// Creates a scratch directory owned by `run_as` (PostgreSQL's tools write into it).
pub fn make_dir(dir: &Path, run_as: &RunAs) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    run_as.chown(dir).map_err(|e| e.to_string())
}
