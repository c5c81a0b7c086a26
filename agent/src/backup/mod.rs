//! Backups and WAL archiving: a repository of objects (a local or shared directory), the
//! per-stanza WAL archive behind `archive-push` / `archive-get`, and the pieces they share
//! (WAL name and header parsing, compression). One concern per submodule; the layout on disk is
//! documented in docs/backup-format.md.

pub mod archive;
pub mod cli;
pub mod compress;
pub mod error;
pub mod repo;
pub mod wal;

pub use archive::{Archive, PushOptions, PushOutcome};
pub use compress::Compression;
pub use error::BackupError;
pub use repo::Repository;
