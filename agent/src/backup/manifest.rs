//! The manifest of one backup: what PostgreSQL said at its start and stop, and every file of
//! PGDATA with its size, checksum and where its contents are stored. Written last, so a backup
//! without a manifest is an unfinished one and is never restored from.

use serde::{Deserialize, Serialize};

use super::compress::Compression;

/// Format of `backup.manifest`.
pub const MANIFEST_FORMAT: u32 = 1;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Every file stored whole.
    Full,
    /// Only what changed since the prior backup: changed pages of relation files, changed
    /// other files whole; the rest refers to the prior backup.
    Incr,
}

/// Where a file's contents as of this backup come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stored", rename_all = "lowercase")]
pub enum FileSource {
    /// This backup stored the whole file under `key`.
    Whole { key: String, compression: Compression, stored_bytes: u64 },
    /// Unchanged since the prior backup: take its version.
    Prior,
    /// The prior backup's version with the pages stored under `key` laid over it (and cut or
    /// extended to the file's size).
    Pages { key: String, compression: Compression, stored_bytes: u64, pages: u32 },
}

/// One file of PGDATA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to PGDATA, `/`-separated.
    pub path: String,
    pub size: u64,
    /// SHA-256 of the contents as read during the backup (lower-case hex).
    pub sha256: String,
    /// Permission bits.
    pub mode: u32,
    #[serde(flatten)]
    pub source: FileSource,
}

/// `backup.manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `YYYYMMDD-HHMMSSF` for a full backup; `<full label>_YYYYMMDD-HHMMSSI` for an incremental.
    pub label: String,
    pub kind: BackupKind,
    /// The backup an incremental one builds on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<String>,
    pub system_identifier: String,
    pub pg_major: u32,
    pub block_size: u32,
    pub timeline: u32,
    /// Where WAL replay must start (the backup's checkpoint redo point), e.g. "0/5000028".
    pub start_lsn: String,
    /// Where the backup becomes consistent: replay must reach it.
    pub stop_lsn: String,
    /// WAL segments from `start_wal` to `stop_wal` are needed to restore this backup.
    pub start_wal: String,
    pub stop_wal: String,
    /// RFC 3339.
    pub started_at: String,
    pub stopped_at: String,
    /// The `backup_label` PostgreSQL returned at the stop; restored into PGDATA.
    pub backup_label: String,
    /// Directories of PGDATA (relative), including those whose contents are never backed up.
    pub directories: Vec<String>,
    pub files: Vec<FileEntry>,
    /// Sum of the files' sizes, and of what this backup stored for them.
    pub size_bytes: u64,
    pub stored_bytes: u64,
    /// Copied from a standby (PostgreSQL's `BACKUP FROM: standby`): its `pg_control` was copied
    /// last and marks where the backup becomes consistent.
    #[serde(default)]
    pub from_standby: bool,
}

impl Manifest {
    /// The entry of `path`, if the backup has that file.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.binary_search_by(|f| f.path.as_str().cmp(path)).ok().map(|i| &self.files[i])
    }
}

/// A manifest with no files, for unit tests of catalog and retention logic.
#[cfg(test)]
pub fn test_manifest(label: &str, prior: Option<&str>, stopped_at: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        label: label.into(),
        kind: if prior.is_some() { BackupKind::Incr } else { BackupKind::Full },
        prior: prior.map(Into::into),
        system_identifier: "1".into(),
        pg_major: 15,
        block_size: 8192,
        timeline: 1,
        start_lsn: "0/0".into(),
        stop_lsn: "0/0".into(),
        start_wal: String::new(),
        stop_wal: String::new(),
        started_at: stopped_at.into(),
        stopped_at: stopped_at.into(),
        backup_label: String::new(),
        directories: vec![],
        files: vec![],
        size_bytes: 0,
        stored_bytes: 0,
        from_standby: false,
    }
}
