//! Backups and WAL archiving: a repository of objects (a local or shared directory, or an S3
//! bucket), the per-stanza WAL archive behind `archive-push` / `archive-get`, full and
//! incremental backups with manifests, restore to a point in time, and the pieces they share
//! (WAL name and header parsing, page deltas, compression). One concern per submodule; the
//! layout on disk is documented in docs/backup-format.md.

pub mod archive;
pub mod base;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod compress;
pub mod error;
pub mod expire;
pub mod inspect;
pub mod manifest;
pub mod pages;
pub mod prefetch;
pub mod repo;
pub mod restore;
pub mod s3;
pub mod spool;
pub mod wal;

pub use archive::{Archive, PushOptions, PushOutcome};
pub use base::{take, BackupOptions};
pub use compress::Compression;
pub use error::BackupError;
pub use manifest::{BackupKind, Manifest};
pub use repo::Repository;
pub use restore::{restore, RecoveryTarget, RestoreOptions, RestoreReport};
