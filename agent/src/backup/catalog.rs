//! The backups of a stanza in the repository: where a backup's objects go, its label, and
//! reading manifests back (only backups whose manifest exists are complete).

use super::manifest::{BackupKind, Manifest, MANIFEST_FORMAT};
use super::repo::Repository;
use super::BackupError;

/// File name of the manifest inside a backup's directory.
pub const MANIFEST_FILE: &str = "backup.manifest";

/// The directory of all backups of `stanza`.
pub fn backups_dir(stanza: &str) -> String {
    format!("{stanza}/backup")
}

/// The directory of one backup.
pub fn backup_dir(stanza: &str, label: &str) -> String {
    format!("{stanza}/backup/{label}")
}

/// A new backup's label: `YYYYMMDD-HHMMSSF` for a full backup, `<prior full>_YYYYMMDD-HHMMSSI`
/// for an incremental one, so labels sort by time and an incremental names its full backup.
pub fn new_label(kind: BackupKind, prior: Option<&Manifest>, now: chrono::DateTime<chrono::Utc>) -> String {
    let stamp = now.format("%Y%m%d-%H%M%S");
    match (kind, prior) {
        (BackupKind::Incr, Some(p)) => {
            let full = p.label.split('_').next().unwrap_or(&p.label);
            format!("{full}_{stamp}I")
        }
        _ => format!("{stamp}F"),
    }
}

/// Reads and checks one backup's manifest; None if the backup has none (unfinished).
pub async fn load(repo: &Repository, stanza: &str, label: &str) -> Result<Option<Manifest>, BackupError> {
    let key = format!("{}/{MANIFEST_FILE}", backup_dir(stanza, label));
    let Some(bytes) = repo.get(&key).await? else { return Ok(None) };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| BackupError::BadManifest { label: label.to_string(), why: format!("unreadable manifest: {e}") })?;
    if m.format != MANIFEST_FORMAT || m.label != label {
        return Err(BackupError::BadManifest {
            label: label.to_string(),
            why: format!("manifest format {} / label {} does not match", m.format, m.label),
        });
    }
    Ok(Some(m))
}

/// Every complete backup of `stanza`, oldest first.
pub async fn list(repo: &Repository, stanza: &str) -> Result<Vec<Manifest>, BackupError> {
    let mut out = Vec::new();
    for label in repo.list(&backups_dir(stanza)).await? {
        if let Some(m) = load(repo, stanza, &label).await? {
            out.push(m);
        }
    }
    out.sort_by(|a, b| a.stopped_at.cmp(&b.stopped_at).then(a.label.cmp(&b.label)));
    Ok(out)
}

/// `m` and the backups it builds on, newest first (`m` itself first), from `all` (as
/// [`list`] returned them).
pub fn chain(all: &[Manifest], m: &Manifest) -> Result<Vec<Manifest>, BackupError> {
    let mut chain = vec![m.clone()];
    while let Some(prior) = chain.last().and_then(|m| m.prior.clone()) {
        if chain.len() > 1000 {
            return Err(BackupError::BadManifest { label: prior, why: "backup chain longer than 1000".into() });
        }
        let p = all.iter().find(|b| b.label == prior).ok_or_else(|| BackupError::BadManifest {
            label: chain[0].label.clone(),
            why: format!("the prior backup {prior} it builds on is missing"),
        })?;
        chain.push(p.clone());
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_sort_and_name_their_full_backup() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-25T02:10:05Z").map(|t| t.to_utc()).unwrap_or_default();
        let full = new_label(BackupKind::Full, None, t);
        assert_eq!(full, "20261125-021005F");
        assert_eq!(new_label(BackupKind::Incr, None, t), "20261125-021005F", "no prior: full");
        let prior = crate::backup::manifest::test_manifest(
            "20261125-010000F_20261125-020000I",
            Some("20261125-010000F"),
            "2026-11-25T02:00:00Z",
        );
        assert_eq!(new_label(BackupKind::Incr, Some(&prior), t), "20261125-010000F_20261125-021005I");
        let full = crate::backup::manifest::test_manifest("20261125-010000F", None, "2026-11-25T01:00:00Z");
        let all = vec![full, prior.clone()];
        let c = chain(&all, &prior).unwrap();
        assert_eq!(
            c.iter().map(|m| m.label.as_str()).collect::<Vec<_>>(),
            vec![prior.label.as_str(), "20261125-010000F"]
        );
        assert!(chain(&all[1..], &prior).unwrap_err().to_string().contains("missing"));
    }
}
