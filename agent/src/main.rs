//! `steward-agent`: the per-host daemon that runs PostgreSQL for the control plane, and the
//! `archive-push` / `archive-get` commands PostgreSQL runs to archive and restore WAL.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use steward_agent::backup::cli::{ArchiveGetArgs, ArchiveGetQueueArgs, ArchivePushArgs, ArchivePushQueueArgs};
use steward_agent::backup::commands::{self, BackupArgs, ExpireArgs, InfoArgs, RestoreArgs, VerifyArgs};
use steward_agent::config::AgentArgs;

/// Steward host agent: runs PostgreSQL on this host and carries out the control plane's commands.
#[derive(Parser)]
#[command(name = "steward-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon: register with the control plane, heartbeat, serve commands.
    ///
    /// Example: steward-agent run --control-plane 10.0.0.1:7400 --advertise 10.0.0.7:7410 --data-path /var/lib/steward/agent
    Run(Box<AgentArgs>),
    /// Archive one WAL file into the repository (PostgreSQL's archive_command; exits 0 only
    /// once the file is durable there).
    ///
    /// Example: archive_command = 'steward-agent archive-push --repo /srv/steward-repo --stanza ha-1 %p'
    ArchivePush(ArchivePushArgs),
    /// Restore one archived WAL file (PostgreSQL's restore_command). Exits 1 if it was never
    /// archived, 2 if the repository cannot be read, 126 if the archived copy is corrupt
    /// (PostgreSQL then stops recovery instead of ending it early).
    ///
    /// Example: restore_command = 'steward-agent archive-get --repo /srv/steward-repo --stanza ha-1 %f %p'
    ArchiveGet(ArchiveGetArgs),
    /// The background pusher of `archive-push --spool` (started by it; not for direct use).
    #[command(hide = true)]
    ArchivePushQueue(ArchivePushQueueArgs),
    /// The background fetcher of `archive-get --prefetch` (started by it; not for direct use).
    #[command(hide = true)]
    ArchiveGetQueue(ArchiveGetQueueArgs),
    /// Back up a running primary into the repository: full, or incremental (changed pages only).
    ///
    /// Example: steward-agent backup --repo /srv/steward-repo --stanza ha-1 --pg-data /var/lib/steward/agent/clusters/ha-1/pgdata --socket-dir /var/lib/steward/agent/run --type incr
    Backup(BackupArgs),
    /// Restore a backup into a new directory, set up to replay the WAL archive to the latest
    /// point, a time or an LSN, then promote.
    ///
    /// Example: steward-agent restore --repo /srv/steward-repo --stanza ha-1 --pg-data /srv/restore --target-time 2026-11-25T02:10:05Z
    Restore(RestoreArgs),
    /// Show the repository's stanzas: archived WAL and backups (text or JSON).
    Info(InfoArgs),
    /// Read back every backup file and archived WAL file of a stanza and check the WAL chain;
    /// exits 1 if anything would make a restore fail.
    Verify(VerifyArgs),
    /// Remove backups (and the WAL they alone needed) beyond the retention window, keeping
    /// point-in-time recovery possible to any moment of the last N days.
    Expire(ExpireArgs),
}

/// Logs go to stdout for the daemon; to stderr for the commands PostgreSQL runs, which it
/// copies into its own log. Colour only on a terminal.
fn init_logging(default_filter: &str, to_stderr: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if to_stderr {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init();
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).init();
    }
}

fn runtime(multi_thread: bool) -> std::io::Result<tokio::runtime::Runtime> {
    if multi_thread {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
}

async fn run_daemon(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = args.resolve().context("invalid agent configuration")?;
    let agent = steward_agent::daemon::start(cfg).await.context("starting the agent")?;
    steward_agent::daemon::shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Cmd::Run(_) => init_logging("info,sqlx=warn,h2=warn,tower=warn", false),
        // run by PostgreSQL, which copies stderr into its log: quiet unless something is wrong
        Cmd::ArchivePush(_) | Cmd::ArchiveGet(_) | Cmd::ArchivePushQueue(_) | Cmd::ArchiveGetQueue(_) => {
            init_logging("warn", true)
        }
        // operator commands: progress on stderr, results on stdout
        _ => init_logging("info", true),
    }
    // The daemon and the operator commands work in parallel; archive-push/-get are one-shot.
    let short = matches!(
        cli.command,
        Cmd::ArchivePush(_) | Cmd::ArchiveGet(_) | Cmd::ArchivePushQueue(_) | Cmd::ArchiveGetQueue(_)
    );
    let rt = match runtime(!short) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("steward-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Cmd::Run(args) => match rt.block_on(run_daemon(*args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::ArchivePush(args) => rt.block_on(steward_agent::backup::cli::push(args)),
        Cmd::ArchiveGet(args) => rt.block_on(steward_agent::backup::cli::get(args)),
        Cmd::ArchiveGetQueue(args) => rt.block_on(steward_agent::backup::cli::get_queue(args)),
        Cmd::ArchivePushQueue(args) => {
            // its own runtime: the pushes run in parallel on worker threads
            let workers = usize::from(args.process_max).max(1);
            match tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build() {
                Ok(rt) => rt.block_on(steward_agent::backup::cli::push_queue(args)),
                Err(e) => {
                    eprintln!("steward-agent: cannot start the async runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Backup(args) => rt.block_on(commands::backup(args)),
        Cmd::Restore(args) => rt.block_on(commands::restore(args)),
        Cmd::Info(args) => rt.block_on(commands::info(args)),
        Cmd::Verify(args) => rt.block_on(commands::verify(args)),
        Cmd::Expire(args) => rt.block_on(commands::expire(args)),
    }
}
