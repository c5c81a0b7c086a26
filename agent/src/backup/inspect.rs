//! `info` and `verify`: what a stanza holds, and whether all of it can be restored. `verify`
//! reads every object back — each backed-up file rebuilt from its chain and checked against its
//! manifest checksum, each archived WAL file decompressed and checked — and checks that the WAL
//! each backup needs and the WAL after it are there without gaps.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::archive::{Archive, ArchiveInfo};
use super::catalog;
use super::manifest::{BackupKind, Manifest};
use super::repo::{Repository, FORMAT_KEY};
use super::wal::WalName;
use super::BackupError;

/// One backup, as `info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    pub label: String,
    pub kind: BackupKind,
    pub prior: Option<String>,
    pub started_at: String,
    pub stopped_at: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub size_bytes: u64,
    pub stored_bytes: u64,
    pub files: usize,
}

/// The archived WAL of a stanza.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalSummary {
    /// Archived files (segments, partial segments, history and backup history files).
    pub files: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    pub timelines: Vec<u32>,
}

/// What `info` prints for a stanza.
#[derive(Debug, Clone, Serialize)]
pub struct StanzaInfo {
    pub stanza: String,
    pub archive: Option<ArchiveInfo>,
    pub wal: WalSummary,
    pub backups: Vec<BackupSummary>,
}

/// The stanzas of a repository.
pub async fn stanzas(repo: &Repository) -> Result<Vec<String>, BackupError> {
    Ok(repo.list("").await?.into_iter().filter(|n| n != FORMAT_KEY).collect())
}

/// Summarises one stanza.
pub async fn stanza_info(repo: &Repository, stanza: &str) -> Result<StanzaInfo, BackupError> {
    let archive = Archive::new(repo.clone(), stanza)?;
    let objects = archive.list_all().await?;
    let mut wal = WalSummary { files: objects.len(), ..Default::default() };
    let mut timelines = BTreeSet::new();
    for (name, _) in &objects {
        if let Ok(parsed @ WalName::Segment { .. }) = WalName::parse(name) {
            timelines.insert(parsed.timeline());
            if wal.first.is_none() {
                wal.first = Some(name.clone());
            }
            wal.last = Some(name.clone());
        }
    }
    wal.timelines = timelines.into_iter().collect();
    let backups = catalog::list(repo, stanza)
        .await?
        .into_iter()
        .map(|m| BackupSummary {
            files: m.files.len(),
            label: m.label,
            kind: m.kind,
            prior: m.prior,
            started_at: m.started_at,
            stopped_at: m.stopped_at,
            start_wal: m.start_wal,
            stop_wal: m.stop_wal,
            size_bytes: m.size_bytes,
            stored_bytes: m.stored_bytes,
        })
        .collect();
    Ok(StanzaInfo { stanza: stanza.to_string(), archive: archive.info().await?, wal, backups })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Human-readable `info`.
pub fn render_text(infos: &[StanzaInfo]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if infos.is_empty() {
        s.push_str("no stanzas in this repository yet\n");
    }
    for i in infos {
        let _ = writeln!(s, "stanza {}", i.stanza);
        match &i.archive {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "  system {}  PostgreSQL {}",
                    a.system_identifier,
                    a.pg_major.map(|m| m.to_string()).unwrap_or_else(|| "?".into())
                );
            }
            None => s.push_str("  no WAL archived yet\n"),
        }
        let _ = writeln!(
            s,
            "  wal archive: {} files, {} .. {}, timelines {:?}",
            i.wal.files,
            i.wal.first.as_deref().unwrap_or("-"),
            i.wal.last.as_deref().unwrap_or("-"),
            i.wal.timelines
        );
        if i.backups.is_empty() {
            s.push_str("  no backups\n");
        }
        for b in &i.backups {
            let _ = writeln!(
                s,
                "  {:<34} {:<4} stopped {}  wal {}..{}  size {}  stored {}  {} files",
                b.label,
                match b.kind {
                    BackupKind::Full => "full",
                    BackupKind::Incr => "incr",
                },
                b.stopped_at,
                b.start_wal,
                b.stop_wal,
                mib(b.size_bytes),
                mib(b.stored_bytes),
                b.files
            );
        }
    }
    s
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: usize,
    pub files: usize,
    pub wal_files: usize,
    /// Everything that would make a restore fail; empty when all is well.
    pub problems: Vec<String>,
}

/// Segment positions a backup needs: from its start to its stop segment, on its timeline.
fn needed(m: &Manifest, segment_size: u32) -> Option<(u32, u64, u64)> {
    let start = WalName::parse(&m.start_wal).ok()?;
    let stop = WalName::parse(&m.stop_wal).ok()?;
    Some((start.timeline(), start.position(segment_size)?, stop.position(segment_size)?))
}

/// Reads back everything of `stanza`; see the module doc.
pub async fn verify(repo: &Repository, stanza: &str, parallel: usize) -> Result<VerifyReport, BackupError> {
    let archive = Archive::new(repo.clone(), stanza)?;
    let mut report = VerifyReport::default();
    let info = archive.info().await?;
    let segment_size = info.as_ref().map(ArchiveInfo::segment_size).unwrap_or(16 << 20);

    // WAL: every object decompresses to its checksum; per timeline, no gaps.
    let objects = archive.list_all().await?;
    report.wal_files = objects.len();
    let mut positions: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for (name, _) in &objects {
        if let Ok(parsed @ WalName::Segment { partial: false, .. }) = WalName::parse(name) {
            if let Some(p) = parsed.position(segment_size) {
                positions.entry(parsed.timeline()).or_default().insert(p);
            }
        }
    }
    let archive_ref = &archive;
    let wal_problems: Vec<String> = stream::iter(objects)
        .map(|(name, obj)| async move {
            let key = obj.key.clone();
            archive_ref.fetch_object(obj).await.err().map(|e| format!("WAL {name} ({key}): {e}"))
        })
        .buffer_unordered(parallel.max(1))
        .filter_map(|p| async move { p })
        .collect()
        .await;
    report.problems.extend(wal_problems);

    // Backups: every file rebuilds to its checksum; the WAL each needs is archived.
    let backups = catalog::list(repo, stanza).await?;
    report.backups = backups.len();
    for m in &backups {
        match needed(m, segment_size) {
            Some((tli, from, to)) => {
                let have = positions.get(&tli);
                let missing: Vec<u64> = (from..=to).filter(|p| !have.is_some_and(|h| h.contains(p))).collect();
                if !missing.is_empty() {
                    report.problems.push(format!(
                        "backup {}: {} of the WAL segments {}..{} it needs are not archived",
                        m.label,
                        missing.len(),
                        m.start_wal,
                        m.stop_wal
                    ));
                }
            }
            None => report.problems.push(format!("backup {}: unreadable start/stop WAL names", m.label)),
        }
        let chain = match catalog::chain(&backups, m) {
            Ok(c) => c,
            Err(e) => {
                report.problems.push(e.to_string());
                continue;
            }
        };
        report.files += m.files.len();
        let chain = &chain;
        let file_problems: Vec<String> = stream::iter(m.files.iter())
            .map(|f| async move {
                match super::restore::rebuild_checked(repo, chain, f).await {
                    Ok(_) => None,
                    Err(e) => Some(format!("backup {} file {}: {e}", chain[0].label, f.path)),
                }
            })
            .buffer_unordered(parallel.max(1))
            .filter_map(|p| async move { p })
            .collect()
            .await;
        report.problems.extend(file_problems);
    }
    // After the oldest backup, each timeline's segments must follow one another.
    if let Some(oldest) = backups.first().and_then(|m| needed(m, segment_size)) {
        for (tli, set) in &positions {
            let relevant: Vec<u64> = set.iter().copied().filter(|p| *p >= oldest.1).collect();
            for w in relevant.windows(2) {
                if w[1] != w[0] + 1 {
                    report.problems.push(format!(
                        "WAL gap on timeline {tli}: {} segment(s) missing after position {}",
                        w[1] - w[0] - 1,
                        w[0]
                    ));
                }
            }
        }
    }
    report.problems.sort();
    Ok(report)
}
