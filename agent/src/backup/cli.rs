//! `steward-agent archive-push` and `archive-get`: the commands PostgreSQL runs as
//! `archive_command` and `restore_command`. Their exit codes are PostgreSQL's contract:
//! archive-push exits 0 only once the file is durable in the repository; archive-get exits 1
//! when a file was never archived (PostgreSQL probes for files that may not exist), and with
//! a code above 125 when an archived file is corrupt, which makes PostgreSQL stop recovery
//! rather than end it early as if the WAL had run out.

use std::os::unix::process::CommandExt;
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
    /// Asynchronous mode: a background pusher reads PostgreSQL's queue (pg_wal/archive_status)
    /// and pushes ahead, marking durable files in this spool directory; each call waits only
    /// for its own file's mark.
    #[arg(long)]
    pub spool: Option<PathBuf>,
    /// Files the background pusher pushes at once (asynchronous mode).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub process_max: u16,
}

/// Flags of the background pusher `archive-push-queue` (started by archive-push --spool).
#[derive(Debug, Clone, clap::Args)]
pub struct ArchivePushQueueArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long)]
    pub pg_data: PathBuf,
    #[arg(long)]
    pub spool: PathBuf,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub process_max: u16,
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compress: Compression,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
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
    if let Some(spool) = &args.spool {
        return push_async(&args, spool, pg_data).await;
    }
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

/// archive-push --spool: waits for the background pusher to mark the file durable.
async fn push_async(args: &ArchivePushArgs, spool: &std::path::Path, pg_data: Option<PathBuf>) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("steward-agent archive-push {}: {e}", args.wal_path.display());
        ExitCode::from(EXIT_FAILED)
    };
    let Some(pg_data) = pg_data else {
        return fail(&"asynchronous mode reads PostgreSQL's queue: run it in PGDATA or pass --pg-data");
    };
    let Some(name) = args.wal_path.file_name().and_then(|n| n.to_str()) else {
        return fail(&"no file name");
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let start = || {
        // Its errors go to a log in the spool (and, as .error marks, to the call for each file):
        // holding the caller's stderr open would keep anyone who captures it waiting.
        let log_path = spool.join("pusher.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| BackupError::io("open", &log_path, e))?;
        std::process::Command::new(&exe)
            .arg("archive-push-queue")
            .args(["--repo", &args.repo.repo, "--stanza", &args.repo.stanza, "--pg-data"])
            .arg(&pg_data)
            .arg("--spool")
            .arg(spool)
            .args(["--process-max", &args.process_max.to_string()])
            .args(["--compress", args.compress.extension_name(), "--compress-level", &args.compress_level.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // its own process group: it outlives this call, and PostgreSQL's signals to the
            // archiver's group do not cut a push in half
            .process_group(0)
            .spawn()
            .map(|_| ())
            .map_err(|e| BackupError::io("start the background pusher", &exe, e))
    };
    let spool = super::spool::Spool { dir: spool.to_path_buf() };
    match super::spool::push_via_spool(&spool, name, start).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Runs the background pusher of asynchronous mode.
pub async fn push_queue(args: ArchivePushQueueArgs) -> ExitCode {
    let opts = PushOptions { compression: args.compress, level: args.compress_level };
    let spool = super::spool::Spool { dir: args.spool.clone() };
    let result = async {
        let archive = open(&args.repo)?;
        super::spool::run_pusher(&archive, &args.pg_data, &spool, opts, usize::from(args.process_max)).await
    }
    .await;
    match result {
        Ok(n) => {
            tracing::debug!(pushed = n, "background pusher idle: exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("steward-agent archive-push-queue: {e}");
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
