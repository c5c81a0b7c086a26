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
    /// Repository: an absolute directory path on local disk or shared storage (NFS), or an S3
    /// bucket, s3://BUCKET/PREFIX?endpoint=URL&region=NAME&credentials_file=PATH (credentials
    /// from that file or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never from the URL).
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
    /// Fetch this many following segments ahead, in the background, into --spool: recovery
    /// then finds each next segment waiting.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64), requires = "spool")]
    pub prefetch: u16,
    /// Directory for prefetched segments (next to PGDATA, on the same filesystem).
    #[arg(long)]
    pub spool: Option<PathBuf>,
}

/// Flags of the background fetcher `archive-get-queue` (started by archive-get --prefetch).
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveGetQueueArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long)]
    pub spool: PathBuf,
    /// The segment recovery asked for; the following ones are fetched.
    #[arg(long)]
    pub after: String,
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub count: u16,
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
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("archive-push-queue")
            .args(["--repo", &args.repo.repo, "--stanza", &args.repo.stanza, "--pg-data"])
            .arg(&pg_data)
            .arg("--spool")
            .arg(spool)
            .args(["--process-max", &args.process_max.to_string()])
            .args(["--compress", &args.compress.cli_name(), "--compress-level", &args.compress_level.to_string()]);
        spawn_detached(cmd, &spool.join("pusher.log"))
    };
    let spool = super::spool::Spool { dir: spool.to_path_buf() };
    match super::spool::push_via_spool(&spool, name, start).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Starts a background helper that outlives this call: in its own process group (PostgreSQL's
/// signals to the archiver's or startup process's group must not cut its work in half), stdin and
/// stdout closed, stderr appended to `log` (holding the caller's stderr open would keep anyone
/// who captures it waiting).
fn spawn_detached(mut cmd: std::process::Command, log: &std::path::Path) -> Result<(), BackupError> {
    let file =
        std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(|e| BackupError::io("open", log, e))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .process_group(0)
        .spawn()
        .map(|_| ())
        .map_err(|e| BackupError::io("start a background helper", log, e))
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

/// Starts the background fetcher for the segments after the one just served (best effort:
/// recovery works without it).
fn start_prefetch(args: &ArchiveGetArgs, spool: &std::path::Path) {
    if args.prefetch == 0 || super::prefetch::following(&args.wal_name, 1, 16 << 20).is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("archive-get-queue")
        .args(["--repo", &args.repo.repo, "--stanza", &args.repo.stanza, "--spool"])
        .arg(spool)
        .args(["--after", &args.wal_name, "--count", &args.prefetch.to_string()]);
    if let Err(e) = spawn_detached(cmd, &spool.join("prefetch.log")) {
        tracing::warn!(error = %e, "could not start prefetching");
    }
}

/// Runs the background fetcher of archive-get --prefetch.
pub async fn get_queue(args: ArchiveGetQueueArgs) -> ExitCode {
    let result = async {
        let archive = open(&args.repo)?;
        let size = archive.info().await?.map(|i| i.segment_size()).unwrap_or(16 << 20);
        let names = super::prefetch::following(&args.after, u32::from(args.count), size);
        super::prefetch::fill(&archive, &args.spool, &names).await
    }
    .await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steward-agent archive-get-queue: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Runs archive-get; see the module doc for the exit codes.
pub async fn get(args: ArchiveGetArgs) -> ExitCode {
    let result = async {
        if let Some(spool) = &args.spool {
            std::fs::create_dir_all(spool).map_err(|e| BackupError::io("create", spool, e))?;
            if super::prefetch::take(spool, &args.wal_name, &args.dest)? {
                start_prefetch(&args, spool);
                return Ok(true);
            }
        }
        let found = open(&args.repo)?.get(&args.wal_name, &args.dest).await?;
        if found {
            if let Some(spool) = &args.spool {
                start_prefetch(&args, spool);
            }
        }
        Ok(found)
    }
    .await;
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
