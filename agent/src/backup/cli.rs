//! `steward-agent archive-push` and `archive-get`: the commands PostgreSQL runs as
//! `archive_command` and `restore_command`. Their exit codes are PostgreSQL's contract:
//! archive-push exits 0 only once the file is durable in the repository; archive-get exits 1
//! when a file was never archived (PostgreSQL probes for files that may not exist), and with
//! a code above 125 when an archived file is corrupt, which makes PostgreSQL stop recovery
//! rather than end it early as if the WAL had run out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use super::archive::{Archive, PushOptions, PushOutcome};
use super::compress::Compression;
use super::repo::Repository;
use super::BackupError;

/// archive-get: the file was never archived.
pub const EXIT_MISSING: u8 = 1;
/// Any failure that may pass (repository unreachable, disk full): PostgreSQL retries
/// archive-push, and treats archive-get's file as not available yet.
pub const EXIT_FAILED: u8 = 2;
/// archive-get: an archived file is corrupt or not this cluster's. Above 125, PostgreSQL
/// treats it like a failed shell and aborts recovery instead of ending it at this point.
pub const EXIT_ABORT_RECOVERY: u8 = 126;

/// Where the archive is.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// Repository: an absolute directory path on local disk or shared storage (NFS).
    #[arg(long, env = "STEWARD_REPO")]
    pub repo: String,
    /// The archive's name in the repository, one per cluster (the agent uses the cluster id).
    #[arg(long, env = "STEWARD_STANZA")]
    pub stanza: String,
}

/// Flags of `steward-agent archive-push`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchivePushArgs {
    /// The WAL file to archive: PostgreSQL's %p (relative to PGDATA, where PostgreSQL runs
    /// archive_command).
    pub wal_path: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Compression of the archived copy.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compress: Compression,
    /// zstd level: 1 is the fastest, 19 the smallest.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// PGDATA, whose pg_control must name the same database system as the WAL file (default:
    /// the current directory, when it holds global/pg_control).
    #[arg(long)]
    pub pg_data: Option<PathBuf>,
}

/// Flags of `steward-agent archive-get`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveGetArgs {
    /// Name of the WAL file PostgreSQL wants: its %f.
    pub wal_name: String,
    /// Where to write it: PostgreSQL's %p (relative to PGDATA).
    pub dest: PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

fn open(args: &RepoArgs) -> Result<Archive, BackupError> {
    Archive::new(Repository::open(&args.repo)?, &args.stanza)
}

/// Runs archive-push; errors are printed to stderr (PostgreSQL copies it into its log).
pub async fn push(args: ArchivePushArgs) -> ExitCode {
    let started = Instant::now();
    let pg_data = args
        .pg_data
        .clone()
        .or_else(|| std::env::current_dir().ok().filter(|d| d.join("global").join("pg_control").is_file()));
    let opts = PushOptions { compression: args.compress, level: args.compress_level };
    let result = async { open(&args.repo)?.push(&args.wal_path, pg_data.as_deref(), opts).await }.await;
    match result {
        Ok(PushOutcome::Archived { key, size, stored }) => {
            tracing::debug!(%key, size, stored, elapsed_ms = started.elapsed().as_millis() as u64, "archived");
            ExitCode::SUCCESS
        }
        Ok(PushOutcome::AlreadyArchived { key }) => {
            tracing::info!(%key, "already archived with the same contents");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("steward-agent archive-push {}: {e}", args.wal_path.display());
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs archive-get; see the module doc for the exit codes.
pub async fn get(args: ArchiveGetArgs) -> ExitCode {
    let result = async { open(&args.repo)?.get(&args.wal_name, &args.dest).await }.await;
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_MISSING),
        Err(e) => {
            eprintln!("steward-agent archive-get {}: {e}", args.wal_name);
            let fatal = matches!(
                e,
                BackupError::Corrupt { .. }
                    | BackupError::BadInfo { .. }
                    | BackupError::NotWalName { .. }
                    | BackupError::BadStanza(_)
            );
            ExitCode::from(if fatal { EXIT_ABORT_RECOVERY } else { EXIT_FAILED })
        }
    }
}
