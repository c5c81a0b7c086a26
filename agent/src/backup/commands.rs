//! The operator commands on a repository: `backup`, `restore`, `info`, `verify` and `expire`.
//! Each returns the process exit code and prints what it did; errors say what to do.

use std::path::PathBuf;
use std::process::ExitCode;

use super::cli::RepoArgs;
use super::expire as retention;
use super::manifest::BackupKind;
use super::repo::Repository;
use super::restore as restoring;
use super::restore::{RecoveryTarget, RestoreOptions};
use super::{base, inspect, BackupError, Compression};
use crate::pg::{Instance, InstanceSpec, PgBinaries, RunAs};

/// Text for people, JSON for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Flags of `steward-agent backup`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// PGDATA of the running primary to back up.
    #[arg(long)]
    pub pg_data: PathBuf,
    /// Directory of its unix socket (the agent's: <data-path>/run).
    #[arg(long)]
    pub socket_dir: PathBuf,
    /// Its port.
    #[arg(long, default_value_t = 5432)]
    pub port: u16,
    /// full, or incr: only what changed since the newest backup (full if there is none).
    #[arg(long = "type", value_enum, default_value_t = BackupKind::Full)]
    pub kind: BackupKind,
    /// Compression of the stored files.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    pub compress: Compression,
    /// Files copied at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Flags of `steward-agent restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Where to restore: a new or empty directory (nothing is ever overwritten).
    #[arg(long)]
    pub pg_data: PathBuf,
    /// The backup to restore (default: the newest that finished before the target).
    #[arg(long = "set")]
    pub label: Option<String>,
    /// Recover to this moment (RFC 3339, e.g. 2026-11-25T02:10:05Z): commits after it are not
    /// replayed.
    #[arg(long, conflicts_with = "target_lsn")]
    pub target_time: Option<String>,
    /// Recover to this WAL position (e.g. 0/5000028).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Files rebuilt at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Restore over an existing, stopped PGDATA: files that already match are kept, the rest
    /// rewritten, and what the backup does not have (WAL in pg_wal too) removed.
    #[arg(long)]
    pub delta: bool,
}

/// Flags of `steward-agent info`.
#[derive(Debug, Clone, clap::Args)]
pub struct InfoArgs {
    /// Repository: an absolute directory path or an s3:// URL (see `archive-push --help`).
    #[arg(long, env = "STEWARD_REPO")]
    pub repo: String,
    /// Only this stanza (default: all).
    #[arg(long)]
    pub stanza: Option<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Flags of `steward-agent verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Objects read at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Flags of `steward-agent expire`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExpireArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Point-in-time recovery must stay possible to any moment of this many days.
    #[arg(long)]
    pub retention_days: u32,
    /// Print what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("steward-agent {what}: {e}");
    ExitCode::FAILURE
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("steward-agent: cannot render JSON: {e}"),
    }
}

/// `steward-agent backup`.
pub async fn backup(args: BackupArgs) -> ExitCode {
    let result = async {
        let repo = Repository::open(&args.repo.repo)?;
        let bins = PgBinaries::discover(None)?;
        let run_as = RunAs::detect()?;
        let spec = InstanceSpec {
            cluster_id: args.repo.stanza.clone(),
            data_dir: args.pg_data.clone(),
            socket_dir: args.socket_dir.clone(),
            port: args.port,
            listen_addresses: String::new(),
            memory_budget_bytes: 0,
            cores: 1,
            archive: None,
        };
        let inst = Instance::new(spec, bins, run_as);
        let opts = base::BackupOptions {
            kind: args.kind,
            compression: args.compress,
            level: 1,
            parallel: usize::from(args.parallel),
            ..Default::default()
        };
        base::take(&inst, &repo, &args.repo.stanza, opts).await
    }
    .await;
    match result {
        Ok(m) => {
            match args.output {
                Output::Json => print_json(&m),
                Output::Text => println!(
                    "backup {} ({:?}) of stanza {}: {} files, {} bytes, {} stored; WAL {}..{}",
                    m.label,
                    m.kind,
                    args.repo.stanza,
                    m.files.len(),
                    m.size_bytes,
                    m.stored_bytes,
                    m.start_wal,
                    m.stop_wal
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("backup", e),
    }
}

/// `steward-agent restore`.
pub async fn restore(args: RestoreArgs) -> ExitCode {
    let result = async {
        let target = match (&args.target_time, &args.target_lsn) {
            (Some(t), _) => RecoveryTarget::Time(chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                BackupError::Refused(format!("--target-time {t:?} is not RFC 3339 (e.g. 2026-11-25T02:10:05Z): {e}"))
            })?),
            (None, Some(l)) => {
                crate::pg::parse_lsn(l).ok_or_else(|| {
                    BackupError::Refused(format!("--target-lsn {l:?} is not an LSN such as 0/5000028"))
                })?;
                RecoveryTarget::Lsn(l.clone())
            }
            (None, None) => RecoveryTarget::Latest,
        };
        let agent_exe = std::env::current_exe().map_err(|e| BackupError::io("find", "steward-agent", e))?;
        let opts = RestoreOptions {
            label: args.label.clone(),
            target,
            agent_exe,
            parallel: usize::from(args.parallel),
            delta: args.delta,
        };
        let repo = Repository::open(&args.repo.repo)?;
        restoring::restore(&repo, &args.repo.stanza, &args.pg_data, &RunAs::detect()?, &opts).await
    }
    .await;
    match result {
        Ok(r) => {
            println!(
                "restored backup {} into {}: {} files ({} already matched), {} bytes written. Start PostgreSQL \
                 on it to replay the archive{}.",
                r.label,
                args.pg_data.display(),
                r.files,
                r.unchanged,
                r.bytes,
                if args.target_time.is_some() || args.target_lsn.is_some() { " to the target and promote" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail("restore", e),
    }
}

/// `steward-agent info`.
pub async fn info(args: InfoArgs) -> ExitCode {
    let result = async {
        let repo = Repository::open(&args.repo)?;
        let names = match &args.stanza {
            Some(s) => vec![s.clone()],
            None => inspect::stanzas(&repo).await?,
        };
        let mut infos = Vec::new();
        for s in names {
            infos.push(inspect::stanza_info(&repo, &s).await?);
        }
        Ok::<_, BackupError>(infos)
    }
    .await;
    match result {
        Ok(infos) => {
            match args.output {
                Output::Json => print_json(&infos),
                Output::Text => print!("{}", inspect::render_text(&infos)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("info", e),
    }
}

/// `steward-agent verify`: exit 1 when anything would make a restore fail.
pub async fn verify(args: VerifyArgs) -> ExitCode {
    let result = async {
        let repo = Repository::open(&args.repo.repo)?;
        inspect::verify(&repo, &args.repo.stanza, usize::from(args.parallel)).await
    }
    .await;
    match result {
        Ok(r) => {
            match args.output {
                Output::Json => print_json(&r),
                Output::Text => {
                    println!(
                        "verified stanza {}: {} backups ({} files), {} WAL files: {}",
                        args.repo.stanza,
                        r.backups,
                        r.files,
                        r.wal_files,
                        if r.problems.is_empty() {
                            "all readable and complete".to_string()
                        } else {
                            format!("{} problems", r.problems.len())
                        }
                    );
                    for p in &r.problems {
                        println!("  {p}");
                    }
                }
            }
            if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => fail("verify", e),
    }
}

/// `steward-agent expire`.
pub async fn expire(args: ExpireArgs) -> ExitCode {
    let result = async {
        let repo = Repository::open(&args.repo.repo)?;
        retention::expire(&repo, &args.repo.stanza, args.retention_days, chrono::Utc::now(), args.dry_run).await
    }
    .await;
    match result {
        Ok(r) => {
            match args.output {
                Output::Json => print_json(&r),
                Output::Text => {
                    let verb = if args.dry_run { "would remove" } else { "removed" };
                    println!(
                        "stanza {}: keeping {} backups {:?}; {verb} {} backups {:?} and {} WAL files (WAL kept from {})",
                        args.repo.stanza,
                        r.plan.keep.len(),
                        r.plan.keep,
                        r.plan.remove.len(),
                        r.plan.remove,
                        r.wal_removed,
                        r.wal_kept_from.as_deref().unwrap_or("the start")
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("expire", e),
    }
}
