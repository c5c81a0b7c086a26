//! `backup-bench`: full backup speed, incremental size and restore time of `steward-agent`
//! side by side with pgBackRest, on copies of one pgbench database, on the same machine.
//!
//! For each tool: a copy of the source PGDATA runs with the tool's own asynchronous
//! archive_command; a full backup is timed; pgbench runs for a while; an incremental backup is
//! taken and its stored size recorded; the server stops; the newest backup (the incremental, on
//! its full) is restored into an empty directory, timed. Both tools use zstd level 1 and 2
//! processes. Needs root, pgbench and pgbackrest. Results: docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use steward_tests::benchkit::{as_postgres, chown_postgres, dir_bytes, pg_bindir, pgbackrest_conf, run};

#[derive(Parser, Debug)]
#[command(name = "backup-bench", about = "Backup and restore: steward-agent vs pgBackRest (needs root)")]
struct Args {
    /// pgbench scale of the source database (15 MB per unit).
    #[arg(long, default_value_t = 50)]
    scale: u32,
    /// Seconds of pgbench between the full and the incremental backup.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u32,
    /// The steward-agent to measure (default: next to this binary).
    #[arg(long)]
    steward_agent: Option<PathBuf>,
    /// Work in this directory (kept), reusing the source database a previous run left there.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
    Table,
}

#[derive(Debug, Serialize)]
struct Measured {
    tool: String,
    pgdata_mib: f64,
    full_seconds: f64,
    full_mib_per_second: f64,
    full_stored_mib: f64,
    incr_stored_mib: f64,
    restore_seconds: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// A stopped pgbench database in `work/source`.
fn make_source(work: &Path, bindir: &Path, scale: u32) -> Result<PathBuf> {
    let src = work.join("source");
    if src.join("PG_VERSION").is_file() {
        eprintln!("backup-bench: reusing the source database in {}", src.display());
        return Ok(src);
    }
    chown_postgres(work)?;
    run(
        as_postgres(&bindir.join("initdb")).arg("-D").arg(&src).args([
            "--data-checksums",
            "-U",
            "postgres",
            "--auth=trust",
        ]),
        "initdb",
    )?;
    let server = Server::start(bindir, &src, &work.join("source-sock"), "off".into())?;
    eprintln!("backup-bench: pgbench -i -s {scale}");
    let r = server.pgbench(&["-i", "-q", "-s", &scale.to_string()]);
    server.stop()?;
    r?;
    Ok(src)
}

/// A PostgreSQL server started by the bench.
struct Server {
    bindir: PathBuf,
    pgdata: PathBuf,
    sock: PathBuf,
    port: String,
}

impl Server {
    fn start(bindir: &Path, pgdata: &Path, sock: &Path, archive_command: String) -> Result<Server> {
        std::fs::create_dir_all(sock)?;
        chown_postgres(sock)?;
        let port = steward_tests::free_port().to_string();
        let archive = if archive_command == "off" {
            "-c archive_mode=off".to_string()
        } else {
            format!("-c archive_mode=on -c archive_command='{archive_command}'")
        };
        let opts = format!(
            "-c port={port} -c listen_addresses='' -c unix_socket_directories={} {archive} -c max_wal_size=4GB",
            sock.display()
        );
        let log = pgdata.with_extension("log");
        run(
            as_postgres(&bindir.join("pg_ctl"))
                .arg("-D")
                .arg(pgdata)
                .args(["-w", "-t", "120", "-l"])
                .arg(&log)
                .args(["-o", &opts, "start"]),
            "pg_ctl start",
        )?;
        Ok(Server { bindir: bindir.into(), pgdata: pgdata.into(), sock: sock.into(), port })
    }

    fn pgbench(&self, extra: &[&str]) -> Result<()> {
        run(
            as_postgres(&self.bindir.join("pgbench"))
                .arg("-h")
                .arg(&self.sock)
                .args(["-p", &self.port, "-U", "postgres"])
                .args(extra)
                .arg("postgres"),
            "pgbench",
        )
        .map(|_| ())
    }

    fn stop(&self) -> Result<()> {
        run(
            as_postgres(&self.bindir.join("pg_ctl")).arg("-D").arg(&self.pgdata).args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        )
        .map(|_| ())
    }
}

/// What one tool must do; the rest of the procedure is shared.
trait Tool {
    fn name(&self) -> &str;
    fn archive_command(&self) -> String;
    /// Prepares the repository while the server runs.
    fn prepare(&self, server: &Server) -> Result<()>;
    /// Takes a backup; returns the bytes it stored.
    fn backup(&self, server: &Server, incremental: bool) -> Result<u64>;
    fn restore(&self, into: &Path) -> Result<()>;
}

struct Steward {
    exe: PathBuf,
    dir: PathBuf,
}

impl Tool for Steward {
    fn name(&self) -> &str {
        "steward-agent"
    }
    fn archive_command(&self) -> String {
        format!(
            "{} archive-push --repo {} --stanza bench --spool {} --process-max 2 %p",
            self.exe.display(),
            self.dir.join("repo").display(),
            self.dir.join("spool").display()
        )
    }
    fn prepare(&self, _: &Server) -> Result<()> {
        Ok(())
    }
    fn backup(&self, server: &Server, incremental: bool) -> Result<u64> {
        let out = run(
            as_postgres(&self.exe)
                .args(["backup", "--repo"])
                .arg(self.dir.join("repo"))
                .args(["--stanza", "bench", "--pg-data"])
                .arg(&server.pgdata)
                .arg("--socket-dir")
                .arg(&server.sock)
                .args(["--port", &server.port, "--parallel", "2", "--output", "json"])
                .args(["--type", if incremental { "incr" } else { "full" }]),
            "steward-agent backup",
        )?;
        let m: serde_json::Value = serde_json::from_str(&out).context("backup JSON")?;
        m["stored_bytes"].as_u64().context("stored_bytes in the manifest")
    }
    fn restore(&self, into: &Path) -> Result<()> {
        run(
            as_postgres(&self.exe)
                .args(["restore", "--repo"])
                .arg(self.dir.join("repo"))
                .args(["--stanza", "bench", "--parallel", "2", "--pg-data"])
                .arg(into),
            "steward-agent restore",
        )
        .map(|_| ())
    }
}

struct PgBackRest {
    conf: PathBuf,
    dir: PathBuf,
}

impl PgBackRest {
    fn cmd(&self) -> Command {
        let mut c = as_postgres(Path::new("/usr/bin/pgbackrest"));
        c.arg(format!("--config={}", self.conf.display())).arg("--stanza=bench");
        c
    }
}

impl Tool for PgBackRest {
    fn name(&self) -> &str {
        "pgbackrest"
    }
    fn archive_command(&self) -> String {
        format!("/usr/bin/pgbackrest --config={} --stanza=bench archive-push %p", self.conf.display())
    }
    fn prepare(&self, server: &Server) -> Result<()> {
        // The server's port is known only now; archive-push calls before this just fail and
        // are retried by PostgreSQL.
        let extra = format!("pg1-socket-path={}\npg1-port={}\nstart-fast=y\n", server.sock.display(), server.port);
        let conf = pgbackrest_conf(&self.dir, &server.pgdata, true, 2, &extra)?;
        ensure!(conf == self.conf, "pgbackrest.conf moved");
        run(self.cmd().arg("stanza-create"), "pgbackrest stanza-create").map(|_| ())
    }
    fn backup(&self, _: &Server, incremental: bool) -> Result<u64> {
        let backups = self.dir.join("repo/backup/bench");
        let before: Vec<String> = names(&backups);
        run(
            self.cmd().arg(if incremental { "--type=incr" } else { "--type=full" }).arg("backup"),
            "pgbackrest backup",
        )?;
        let new = names(&backups).into_iter().find(|n| !before.contains(n) && (n.ends_with('F') || n.ends_with('I')));
        let new = new.context("pgbackrest made no backup directory")?;
        Ok(dir_bytes(&backups.join(new)))
    }
    fn restore(&self, into: &Path) -> Result<()> {
        run(self.cmd().arg(format!("--pg1-path={}", into.display())).arg("restore"), "pgbackrest restore").map(|_| ())
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

fn measure(tool: &dyn Tool, work: &Path, bindir: &Path, source: &Path, args: &Args) -> Result<Measured> {
    let dir = work.join(tool.name());
    let pgdata = dir.join("pgdata");
    run(Command::new("cp").arg("-a").arg(source).arg(&pgdata), "cp -a the source")?;
    chown_postgres(&dir)?;
    let pgdata_bytes = dir_bytes(&pgdata) - dir_bytes(&pgdata.join("pg_wal"));
    let server = Server::start(bindir, &pgdata, &dir.join("sock"), tool.archive_command())?;
    let result = (|| {
        tool.prepare(&server)?;
        eprintln!("backup-bench: {}: full backup of {:.0} MiB", tool.name(), pgdata_bytes as f64 / MIB);
        let t = Instant::now();
        let full_stored = tool.backup(&server, false)?;
        let full_seconds = t.elapsed().as_secs_f64();
        eprintln!("backup-bench: {}: pgbench -T {}", tool.name(), args.pgbench_seconds);
        server.pgbench(&["-T", &args.pgbench_seconds.to_string(), "-c", "4", "-j", "2", "-n"])?;
        let incr_stored = tool.backup(&server, true)?;
        Ok::<_, anyhow::Error>((full_seconds, full_stored, incr_stored))
    })();
    let stopped = server.stop();
    let (full_seconds, full_stored, incr_stored) = result?;
    stopped?;
    let target = dir.join("restored");
    std::fs::create_dir_all(&target)?;
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    chown_postgres(&target)?;
    eprintln!("backup-bench: {}: restore", tool.name());
    let t = Instant::now();
    tool.restore(&target)?;
    let restore_seconds = t.elapsed().as_secs_f64();
    ensure!(target.join("PG_VERSION").is_file(), "{} restored no PGDATA", tool.name());
    Ok(Measured {
        tool: tool.name().into(),
        pgdata_mib: pgdata_bytes as f64 / MIB,
        full_seconds,
        full_mib_per_second: pgdata_bytes as f64 / MIB / full_seconds,
        full_stored_mib: full_stored as f64 / MIB,
        incr_stored_mib: incr_stored as f64 / MIB,
        restore_seconds,
    })
}

fn bench(work: &Path, args: &Args) -> Result<Vec<Measured>> {
    ensure!(Path::new("/usr/bin/pgbackrest").is_file(), "pgbackrest is not installed: apt-get install pgbackrest");
    let steward = match &args.steward_agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("no parent dir")?.join("steward-agent"),
    };
    ensure!(
        steward.is_file(),
        "{} not found: build steward-agent (same profile) or pass --steward-agent",
        steward.display()
    );
    let bindir = pg_bindir()?;
    let source = make_source(work, &bindir, args.scale)?;
    for n in ["steward-agent", "pgbackrest"] {
        let _ = std::fs::remove_dir_all(work.join(n));
    }
    let exe = work.join("steward-agent.bin");
    std::fs::copy(&steward, &exe)?;
    let sdir = work.join("steward-agent");
    for d in ["repo", "spool"] {
        std::fs::create_dir_all(sdir.join(d))?;
    }
    let pdir = work.join("pgbackrest");
    std::fs::create_dir_all(&pdir)?;
    let conf = pdir.join("pgbackrest.conf");
    let tools: Vec<Box<dyn Tool>> =
        vec![Box::new(Steward { exe, dir: sdir }), Box::new(PgBackRest { conf, dir: pdir })];
    let mut out = Vec::new();
    for t in &tools {
        out.push(measure(t.as_ref(), work, &bindir, &source, args)?);
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("backup-bench: run as root (PostgreSQL runs as postgres through runuser)");
        return ExitCode::from(2);
    }
    let result = match &args.work_dir {
        Some(dir) => std::fs::create_dir_all(dir).map_err(anyhow::Error::from).and_then(|()| bench(dir, &args)),
        None => match tempfile::Builder::new().prefix("steward-backup-bench-").tempdir_in("/tmp") {
            Ok(w) => bench(w.path(), &args),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(rows) => {
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                Output::Table => {
                    println!("Backup and restore of a pgbench database (zstd-1, 2 processes each)");
                    println!(
                        "{:<14} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
                        "tool", "PGDATA", "full", "full MB/s", "full stored", "incr stored", "restore"
                    );
                    for r in &rows {
                        println!(
                            "{:<14} {:>7.0}MiB {:>9.1}s {:>10.1} {:>9.1}MiB {:>9.2}MiB {:>9.1}s",
                            r.tool,
                            r.pgdata_mib,
                            r.full_seconds,
                            r.full_mib_per_second,
                            r.full_stored_mib,
                            r.incr_stored_mib,
                            r.restore_seconds
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("backup-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
