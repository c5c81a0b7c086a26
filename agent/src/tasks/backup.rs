//! A backup of a cluster for the control plane's schedule (then the expire of what retention
//! no longer needs), and a WAL switch that gets everything committed into the archive.

use std::time::{Duration, Instant};

use steward_proto::v1::BackupReply;

use crate::backup::base::{self, BackupOptions};
use crate::backup::expire;
use crate::backup::manifest::BackupKind;
use crate::backup::Repository;
use crate::pg::{Instance, Upstream, WalArchiving};

/// One backup of `stanza` from `inst` (primary, or a standby of `primary`), then the expire
/// of what `retention_days` no longer needs (0: none).
pub async fn run_backup(
    inst: std::sync::Arc<Instance>,
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
