//! Retention: which backups a stanza keeps, and removing the rest together with the WAL no kept
//! backup needs. The promise is point-in-time recovery to any moment of the last N days: that
//! needs every backup finished within the window, the newest one finished before it (recovery
//! to the window's first moment starts there), the backups those build on, and the WAL from the
//! oldest kept backup's start on.

use std::collections::BTreeSet;

use serde::Serialize;

use super::archive::{Archive, ArchiveInfo};
use super::catalog::{self, MANIFEST_FILE};
use super::manifest::Manifest;
use super::repo::Repository;
use super::wal::WalName;
use super::BackupError;

/// Labels to keep and to remove, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub keep: Vec<String>,
    pub remove: Vec<String>,
}

/// Decides retention for `backups` (any order) at `now`. Pure, so it is unit tested.
pub fn plan(backups: &[Manifest], now: chrono::DateTime<chrono::Utc>, retention_days: u32) -> Plan {
    let window_start = now - chrono::Duration::days(i64::from(retention_days));
    let stopped = |m: &Manifest| chrono::DateTime::parse_from_rfc3339(&m.stopped_at).ok().map(|t| t.to_utc());
    let mut sorted: Vec<&Manifest> = backups.iter().collect();
    sorted.sort_by(|a, b| a.stopped_at.cmp(&b.stopped_at).then(a.label.cmp(&b.label)));
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for m in &sorted {
        // unreadable times: keep, never guess
        if stopped(m).is_none_or(|t| t >= window_start) {
            keep.insert(&m.label);
        }
    }
    if let Some(before) = sorted.iter().rev().find(|m| stopped(m).is_some_and(|t| t < window_start)) {
        keep.insert(&before.label);
    }
    // the backups kept ones build on
    let by_label = |l: &str| sorted.iter().find(|m| m.label == l).copied();
    let mut todo: Vec<&str> = keep.iter().copied().collect();
    while let Some(l) = todo.pop() {
        if let Some(p) = by_label(l).and_then(|m| m.prior.as_deref()) {
            if keep.insert(p) {
                todo.push(p);
            }
        }
    }
    let (k, r): (Vec<&Manifest>, Vec<&Manifest>) = sorted.iter().partition(|m| keep.contains(m.label.as_str()));
    Plan { keep: k.iter().map(|m| m.label.clone()).collect(), remove: r.iter().map(|m| m.label.clone()).collect() }
}

/// What an expire did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpireReport {
    pub plan: Plan,
    /// WAL files removed: those before the oldest kept backup's start segment.
    pub wal_removed: usize,
    /// The first segment kept, if any backup is kept.
    pub wal_kept_from: Option<String>,
}

/// Applies retention to `stanza`: removes expired backups (their manifest first, so a backup
/// half-removed is never restored from) and the WAL before the oldest kept backup.
pub async fn expire(
    repo: &Repository,
    stanza: &str,
    retention_days: u32,
    now: chrono::DateTime<chrono::Utc>,
    dry_run: bool,
) -> Result<ExpireReport, BackupError> {
    let archive = Archive::new(repo.clone(), stanza)?;
    let backups = catalog::list(repo, stanza).await?;
    let plan = plan(&backups, now, retention_days);
    let mut report = ExpireReport { plan: plan.clone(), ..Default::default() };
    for label in &plan.remove {
        tracing::info!(stanza, %label, dry_run, "expiring backup");
        if dry_run {
            continue;
        }
        let dir = catalog::backup_dir(stanza, label);
        repo.delete(&format!("{dir}/{MANIFEST_FILE}")).await?;
        for f in repo.list(&dir).await? {
            repo.delete(&format!("{dir}/{f}")).await?;
        }
    }
    let segment_size = archive.info().await?.as_ref().map(ArchiveInfo::segment_size).unwrap_or(16 << 20);
    let oldest = backups.iter().find(|m| plan.keep.first() == Some(&m.label));
    let Some(from) = oldest.and_then(|m| WalName::parse(&m.start_wal).ok()).and_then(|w| w.position(segment_size))
    else {
        return Ok(report); // nothing kept: keep all WAL rather than guess
    };
    report.wal_kept_from = oldest.map(|m| m.start_wal.clone());
    for (name, obj) in archive.list_all().await? {
        let Ok(parsed) = WalName::parse(&name) else { continue };
        // history files are tiny and every later timeline needs its ancestry
        let Some(pos) = parsed.position(segment_size) else { continue };
        if pos < from {
            report.wal_removed += 1;
            if !dry_run {
                archive.remove(&obj).await?;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(label: &str, prior: Option<&str>, stopped: &str) -> Manifest {
        crate::backup::manifest::test_manifest(label, prior, stopped)
    }

    #[test]
    fn keeps_the_window_the_backup_before_it_and_their_chains() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T00:00:00Z").map(|t| t.to_utc()).unwrap();
        let backups = vec![
            m("A", None, "2026-11-01T00:00:00Z"),
            m("B", None, "2026-11-20T00:00:00Z"),
            m("B_1", Some("B"), "2026-11-21T00:00:00Z"),
            m("B_2", Some("B_1"), "2026-11-24T00:00:00Z"),
            m("C", None, "2026-11-26T00:00:00Z"),
            m("C_1", Some("C"), "2026-11-29T00:00:00Z"),
        ];
        // 5 days: window from 11-25; C and C_1 inside, B_2 is the newest before it, B_1 and B its chain
        let p = plan(&backups, now, 5);
        assert_eq!(p.keep, vec!["B", "B_1", "B_2", "C", "C_1"]);
        assert_eq!(p.remove, vec!["A"]);
        // 1 day: C_1 inside, C before it; B's chain goes
        let p = plan(&backups, now, 1);
        assert_eq!(p.keep, vec!["C", "C_1"]);
        assert_eq!(p.remove, vec!["A", "B", "B_1", "B_2"]);
        // 0 days: only the newest and its chain
        assert_eq!(plan(&backups, now, 0).keep, vec!["C", "C_1"]);
        // long retention keeps everything; no backups, nothing to do
        assert!(plan(&backups, now, 365).remove.is_empty());
        assert_eq!(plan(&[], now, 1), Plan::default());
    }
}
