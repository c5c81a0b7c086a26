//! The archive of one database, when its owner retires it. Its role loses login and its
//! sessions end (the archive is then everything the database will ever hold), a logical dump
//! (`pg_dump` custom format) goes into the repository under `archives/<database id>/<operation
//! id>.dump` with a manifest beside it, the stored copy is read back, checked against its
//! SHA-256 and restored into a scratch database whose every table must have the source's row
//! count, and only then is the live database dropped (DESIGN invariant 3: no data is destroyed
//! unless a verified archive of it exists). Loading an archive back fills a database the way a
//! point-in-time copy does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use steward_proto::v1::{ArchiveDatabaseReply, LoadArchiveReply};

use super::dumps;
use crate::backup::Repository;
use crate::pg::sql::{describe, quote_ident};
use crate::pg::Instance;

/// Version of [`ArchiveManifest`].
const MANIFEST_FORMAT: u32 = 1;

/// `archives/<database id>/<operation id>.json`: what an archive holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveManifest {
    pub format: u32,
    pub database_id: String,
    /// PostgreSQL's name of the database when it was archived.
    pub database: String,
    pub pg_major: u32,
    /// Key of the dump in the repository, its size and SHA-256.
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    /// RFC 3339.
    pub created_at: String,
    /// Row count of every table, as the verification found them in source and restored copy.
    pub tables: BTreeMap<String, i64>,
}

/// Keys of an archive's dump and manifest.
pub fn archive_keys(database_id: &str, operation_id: &str) -> (String, String) {
    let base = format!("archives/{database_id}/{operation_id}");
    (format!("{base}.dump"), format!("{base}.json"))
}

/// What [`archive_database`] needs.
pub struct ArchiveRequest {
    /// This host's primary, which serves the database.
    pub inst: Arc<Instance>,
    /// Repository location.
    pub repo: String,
    /// Scratch space for the dump (removed afterwards).
    pub work_dir: PathBuf,
    pub operation_id: String,
    pub database_id: String,
    pub database: String,
    pub role: String,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Archives a database: see the module documentation. A retry after the database was dropped
/// answers from the stored manifest.
pub async fn archive_database(r: ArchiveRequest) -> Result<ArchiveDatabaseReply, String> {
    let repo = Repository::open(&r.repo).map_err(|e| e.to_string())?;
    let (key, manifest_key) = archive_keys(&r.database_id, &r.operation_id);
    let client = r.inst.superuser_client().await.map_err(|e| e.to_string())?;
    let sql = |e: tokio_postgres::Error| describe(&e);
    let exists =
        client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&r.database]).await.map_err(sql)?.is_some();
    if !exists {
        let stored = repo.get(&manifest_key).await.map_err(|e| e.to_string())?.ok_or_else(|| {
            format!(
                "database {} does not exist on this instance and operation {} stored no archive of it",
                r.database, r.operation_id
            )
        })?;
        let m: ArchiveManifest =
            serde_json::from_slice(&stored).map_err(|e| format!("archive manifest {manifest_key}: {e}"))?;
        return Ok(reply(&repo, &m, true));
    }

    // From here on the archive is all the database will ever hold: no new sessions of its
    // role, the current ones end.
    client.batch_execute(&format!("ALTER ROLE {} NOLOGIN", quote_ident(&r.role))).await.map_err(sql)?;
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&r.database],
        )
        .await
        .map_err(sql)?;

    let run_as = r.inst.run_as().clone();
    dumps::remove_dir(&r.work_dir).await;
    dumps::make_dir(&r.work_dir, &run_as)?;
    let result = dump_store_verify(&r, &repo, &key, &manifest_key).await;
    dumps::remove_dir(&r.work_dir).await;
    let m = result?;

    // Verified and stored: the live database may go.
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&r.database)))
        .await
        .map_err(sql)?;
    client.batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(&r.role))).await.map_err(sql)?;
    tracing::info!(database = %r.database, key = %m.key, bytes = m.bytes, tables = m.tables.len(),
        "database archived, verified and dropped");
    Ok(reply(&repo, &m, false))
}

fn reply(repo: &Repository, m: &ArchiveManifest, already_done: bool) -> ArchiveDatabaseReply {
    ArchiveDatabaseReply {
        location: format!("{}/{}", repo.location().trim_end_matches('/'), m.key),
        key: m.key.clone(),
        bytes: m.bytes,
        sha256: m.sha256.clone(),
        tables_verified: m.tables.len() as u32,
        rows_verified: m.tables.values().map(|n| *n as u64).sum(),
        already_done,
    }
}

async fn dump_store_verify(
    r: &ArchiveRequest,
    repo: &Repository,
    key: &str,
    manifest_key: &str,
) -> Result<ArchiveManifest, String> {
    let spec = r.inst.spec();
    let file = r.work_dir.join("database.dump");
    dumps::dump(&r.inst, r.inst.run_as(), &spec.socket_dir, spec.port, &r.database, &file).await?;
    let source_counts = dumps::row_counts(&r.inst, &r.database).await?;
    let data = tokio::fs::read(&file).await.map_err(|e| format!("reading {}: {e}", file.display()))?;
    let (bytes, sha256) = (data.len() as u64, sha256_hex(&data));
    repo.put(key, data).await.map_err(|e| e.to_string())?;

    // Verify what the repository holds, not what was written: read it back, check it, restore it.
    let stored = repo.get(key).await.map_err(|e| e.to_string())?.ok_or("the archive vanished after it was stored")?;
    if sha256_hex(&stored) != sha256 || stored.len() as u64 != bytes {
        return Err(format!("the archive read back from {key} does not match what was written"));
    }
    let check = r.work_dir.join("verify.dump");
    tokio::fs::write(&check, &stored).await.map_err(|e| format!("writing {}: {e}", check.display()))?;
    r.inst.run_as().chown(&check).map_err(|e| e.to_string())?;
    let scratch_db = format!(
        "steward_verify_{}",
        r.operation_id.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>().to_lowercase()
    );
    let verified = async {
        dumps::load(&r.inst, &check, &scratch_db, dumps::Owner::Superuser, None).await?;
        dumps::row_counts(&r.inst, &scratch_db).await
    }
    .await;
    let client = r.inst.superuser_client().await.map_err(|e| e.to_string())?;
    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&scratch_db))).await;
    let restored_counts = verified.map_err(|e| format!("verifying the archive by restoring it failed: {e}"))?;
    if restored_counts != source_counts {
        let differ: Vec<String> = source_counts
            .iter()
            .filter(|(t, n)| restored_counts.get(*t) != Some(n))
            .map(|(t, n)| format!("{t}: {n} rows, restored {:?}", restored_counts.get(t)))
            .collect();
        return Err(format!("the restored archive differs from the database: {}", differ.join("; ")));
    }
    let m = ArchiveManifest {
        format: MANIFEST_FORMAT,
        database_id: r.database_id.clone(),
        database: r.database.clone(),
        pg_major: r.inst.binaries().major,
        key: key.to_string(),
        bytes,
        sha256,
        created_at: chrono::Utc::now().to_rfc3339(),
        tables: source_counts,
    };
    let text = serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?;
    repo.put(manifest_key, text).await.map_err(|e| e.to_string())?;
    Ok(m)
}

/// What [`load_archive`] needs.
pub struct LoadRequest {
    pub inst: Arc<Instance>,
    pub repo: String,
    pub work_dir: PathBuf,
    pub operation_id: String,
    pub key: String,
    pub sha256: String,
    pub database: String,
    pub role: String,
    pub password_scram: String,
}

/// Fills `database` (re-created, owned by `role`) from the archive at `key`, after checking the
/// stored copy's SHA-256.
pub async fn load_archive(r: LoadRequest) -> Result<LoadArchiveReply, String> {
    if dumps::already_loaded(&r.inst, &r.database, &r.operation_id).await? {
        return Ok(LoadArchiveReply { already_done: true, ..Default::default() });
    }
    let repo = Repository::open(&r.repo).map_err(|e| e.to_string())?;
    let data = repo
        .get(&r.key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("archive {} is not in repository {}", r.key, repo.location()))?;
    if sha256_hex(&data) != r.sha256 {
        return Err(format!("archive {} is corrupt: its SHA-256 is not the one recorded when it was made", r.key));
    }
    let bytes = data.len() as u64;
    let run_as = r.inst.run_as().clone();
    dumps::remove_dir(&r.work_dir).await;
    dumps::make_dir(&r.work_dir, &run_as)?;
    let file = r.work_dir.join("archive.dump");
    let loaded = async {
        tokio::fs::write(&file, &data).await.map_err(|e| format!("writing {}: {e}", file.display()))?;
        run_as.chown(&file).map_err(|e| e.to_string())?;
        let owner = dumps::Owner::Role { role: &r.role, password_scram: &r.password_scram };
        dumps::load(&r.inst, &file, &r.database, owner, Some(&r.operation_id)).await
    }
    .await;
    dumps::remove_dir(&r.work_dir).await;
    loaded?;
    tracing::info!(database = %r.database, key = %r.key, bytes, "archive loaded");
    Ok(LoadArchiveReply { bytes, already_done: false })
}

/// Removes an archive's dump and manifest; false if neither was there.
pub async fn delete_archive(repo: &str, key: &str) -> Result<bool, String> {
    let repo = Repository::open(repo).map_err(|e| e.to_string())?;
    let manifest = key.strip_suffix(".dump").map(|b| format!("{b}.json"));
    let mut removed = repo.delete(key).await.map_err(|e| e.to_string())?;
    if let Some(m) = manifest {
        removed |= repo.delete(&m).await.map_err(|e| e.to_string())?;
    }
    Ok(removed)
}
