//! The one error type of the backup repository and WAL archive. Messages say what went wrong
//! and what to do, because PostgreSQL copies `archive_command` / `restore_command` stderr into
//! its log, where an operator reads them.

use std::path::PathBuf;

/// Failure while archiving or restoring WAL, or while reading or writing the repository.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A filesystem call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The repository location cannot be used.
    #[error("repository {location}: {why}")]
    Repository { location: String, why: String },

    /// A request to the object store behind an S3 repository failed (after retries).
    #[error("{action} {key} in {location}: {why}")]
    ObjectStore { action: &'static str, key: String, location: String, why: String },

    /// A key that would leave the repository or is not a plain relative path.
    #[error("invalid repository key {key:?}: {why}")]
    BadKey { key: String, why: &'static str },

    /// A stanza (the archive's name, one per cluster) that is not a plain name.
    #[error("invalid stanza {0:?}: use letters, digits, '-', '_' and '.' (up to 128 characters)")]
    BadStanza(String),

    /// The file handed to archive-push / archive-get is not something PostgreSQL archives.
    #[error("{name:?} is not a WAL file name PostgreSQL archives: {why}")]
    NotWalName { name: String, why: &'static str },

    /// A WAL segment whose first page is not a valid long page header.
    #[error("{} is not a valid WAL segment: {why}", path.display())]
    BadSegment { path: PathBuf, why: String },

    /// The segment belongs to another database system than the one this archive holds.
    #[error(
        "{name} belongs to database system {found}, but stanza {stanza} archives system {expected}: \
         refusing to mix two clusters' WAL in one archive; point archive_command at this cluster's \
         own stanza, or, if the cluster was re-created on purpose, archive it under a new stanza"
    )]
    SystemMismatch { name: String, stanza: String, found: u64, expected: u64 },

    /// The WAL file in PGDATA belongs to another system than PGDATA's own pg_control.
    #[error(
        "{name} belongs to database system {segment}, but {} says this server is system {control}: \
         the file in pg_wal does not come from this cluster; move it out of pg_wal",
        pg_control.display()
    )]
    ForeignSegment { name: String, segment: u64, control: u64, pg_control: PathBuf },

    /// The same file name is archived already, with other contents.
    #[error(
        "{name} is already archived with different contents (archived sha256 {archived}, local file \
         sha256 {local}); refusing to overwrite it. Two servers may be archiving into stanza \
         {stanza}: check that only this cluster's primary uses it before removing the archived copy"
    )]
    ChecksumConflict { name: String, stanza: String, archived: String, local: String },

    /// An archived object that does not decompress to what its name promises.
    #[error("archived object {key} is corrupt: {why}; restore from another copy or take a new backup")]
    Corrupt { key: String, why: String },

    /// The archive's `archive.info` cannot be used.
    #[error("{key} is unreadable: {why}")]
    BadInfo { key: String, why: String },

    /// Compressing failed (decompression failures are [`BackupError::Corrupt`]).
    #[error("compressing {name}: {source}")]
    Compress {
        name: String,
        #[source]
        source: std::io::Error,
    },

    /// PostgreSQL refused or failed a call the backup needs.
    #[error("{action}: {source}")]
    Sql {
        action: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    /// Managing the instance failed (connecting, for example).
    #[error(transparent)]
    Pg(#[from] crate::pg::PgError),

    /// A backup cannot be taken or restored as asked.
    #[error("{0}")]
    Refused(String),

    /// A backup's manifest cannot be used.
    #[error("backup {label}: {why}")]
    BadManifest { label: String, why: String },

    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl BackupError {
    /// Shorthand for [`BackupError::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BackupError::Io { action, path: path.into(), source }
    }
}
