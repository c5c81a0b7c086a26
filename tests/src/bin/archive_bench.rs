//! `archive-bench`: WAL archiving throughput of `steward-agent archive-push` side by side with
//! pgBackRest's `archive-push` on the same WAL corpus, on the same machine.
//!
//! 1. A real PostgreSQL (data checksums on) generates a corpus of WAL segments with pgbench
//!    (`cp` as archive_command), then stops.
//! 2. For each tool and mode, a copy of that PGDATA gets the corpus in `pg_wal` with `.ready`
//!    files, exactly as PostgreSQL's archiver would find it, and the tool's archive-push is
//!    called once per segment, in order, each call waited for, as the archiver does. Per call
//!    the latency is recorded (the archiver's ack latency); the total gives segments/s.
//! 3. Stored bytes per tool give the compression ratio.
//!
//! Needs root (PostgreSQL runs as `postgres` through `runuser`), pgbench and pgbackrest
//! (`apt-get install pgbackrest`). Results: docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use steward_tests::benchkit::{
    as_postgres, as_postgres_direct, chown_postgres, dir_bytes, percentile, pg_bindir, pgbackrest_conf, run,
    segment_names,
};

#[derive(Parser, Debug)]
#[command(name = "archive-bench", about = "WAL archive-push throughput: steward-agent vs pgBackRest (needs root)")]
struct Args {
    /// WAL segments in the corpus (16 MiB each).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(4..=2000))]
    segments: u32,
    /// pgbench scale of the corpus database.
    #[arg(long, default_value_t = 30)]
    scale: u32,
    /// The steward-agent to measure (default: next to this binary).
    #[arg(long)]
    steward_agent: Option<PathBuf>,
    /// Poorly compressible WAL: the bulk inserts write random bytes (pgcrypto's
    /// gen_random_bytes, 1 KiB per row, stored uncompressed) instead of md5 text.
    #[arg(long)]
    incompressible: bool,
    /// Keep the work directory (corpus, repositories) for inspection.
    #[arg(long)]
    keep: bool,
    /// Work in this directory (kept), reusing the corpus a previous run left there.
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

/// One tool in one mode, measured.
#[derive(Debug, Serialize)]
struct Result1 {
    tool: String,
    mode: String,
    segments: usize,
    seconds: f64,
    segments_per_second: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_max_ms: f64,
    stored_mib: f64,
    ratio: f64,
}

/// Generates the corpus: returns PGDATA (stopped) and the corpus directory.
fn make_corpus(work: &Path, bindir: &Path, args: &Args) -> Result<(PathBuf, PathBuf, Vec<String>)> {
    let pgdata = work.join("pgdata");
    let corpus = work.join("corpus");
    let sock = work.join("sock");
    for d in [&corpus, &sock] {
        std::fs::create_dir_all(d)?;
    }
    chown_postgres(work)?;
    eprintln!("archive-bench: initdb (data checksums)");
    run(
        as_postgres(&bindir.join("initdb")).args(["-D"]).arg(&pgdata).args([
            "--data-checksums",
            "-U",
            "postgres",
            "--auth=trust",
        ]),
        "initdb",
    )?;
    let port = steward_tests::free_port().to_string();
    let opts = format!(
        "-c port={port} -c listen_addresses='' -c unix_socket_directories={} -c archive_mode=on \
         -c archive_command='cp %p {}/%f' -c max_wal_size=8GB -c checkpoint_timeout=30min",
        sock.display(),
        corpus.display()
    );
    run(
        as_postgres(&bindir.join("pg_ctl"))
            .args(["-D"])
            .arg(&pgdata)
            .args(["-w", "-l"])
            .arg(work.join("pg.log"))
            .args(["-o", &opts, "start"]),
        "pg_ctl start",
    )?;
    let result = (|| {
        let pgbench = |extra: &[&str]| -> Result<()> {
            run(
                as_postgres(&bindir.join("pgbench"))
                    .arg("-h")
                    .arg(&sock)
                    .args(["-p", &port, "-U", "postgres"])
                    .args(extra)
                    .arg("postgres"),
                "pgbench",
            )
            .map(|_| ())
        };
        eprintln!("archive-bench: pgbench -i -s {}", args.scale);
        pgbench(&["-i", "-q", "-s", &args.scale.to_string()])?;
        let psql = |sql: &str| -> Result<()> {
            run(
                as_postgres(&bindir.join("psql"))
                    .arg("-h")
                    .arg(&sock)
                    .args(["-p", &port, "-U", "postgres", "-qAt", "-c", sql, "postgres"]),
                "psql",
            )
            .map(|_| ())
        };
        // OLTP traffic (page images, index updates) alternating with bulk inserts of random
        // text (hard to compress), until the corpus is complete.
        psql("CREATE TABLE IF NOT EXISTS filler (id bigserial PRIMARY KEY, v text)")?;
        if args.incompressible {
            psql("CREATE EXTENSION IF NOT EXISTS pgcrypto")?;
            psql("CREATE TABLE IF NOT EXISTS filler_bytes (id bigserial PRIMARY KEY, v bytea)")?;
        }
        let deadline = Instant::now() + Duration::from_secs(900);
        while segment_names(&corpus).len() < args.segments as usize + 1 {
            ensure!(Instant::now() < deadline, "the corpus did not reach {} segments in 15 minutes", args.segments);
            eprintln!("archive-bench: corpus has {} of {} segments", segment_names(&corpus).len(), args.segments);
            pgbench(&["-T", "5", "-c", "4", "-j", "2", "-n"])?;
            if args.incompressible {
                psql("INSERT INTO filler_bytes (v) SELECT gen_random_bytes(1024) FROM generate_series(1, 60000)")?;
            } else {
                psql(
                    "INSERT INTO filler (v) SELECT md5(random()::text) || md5(random()::text) || md5(random()::text) \
                     FROM generate_series(1, 150000)",
                )?;
            }
        }
        psql("SELECT pg_switch_wal()")?;
        Ok(())
    })();
    let _ = run(
        as_postgres(&bindir.join("pg_ctl")).args(["-D"]).arg(&pgdata).args(["-m", "fast", "-w", "stop"]),
        "pg_ctl stop",
    );
    result?;
    let names: Vec<String> = segment_names(&corpus).into_iter().take(args.segments as usize).collect();
    Ok((pgdata, corpus, names))
}

/// A copy of PGDATA for one run with the corpus in pg_wal and `.ready` files, as the archiver
/// sees it.
fn stage(work: &Path, name: &str, pgdata: &Path, corpus: &Path, names: &[String]) -> Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("pgdata");
    run(Command::new("cp").arg("-a").arg(pgdata).arg(&copy), "cp -a PGDATA")?;
    let wal = copy.join("pg_wal");
    std::fs::remove_dir_all(&wal)?;
    std::fs::create_dir_all(wal.join("archive_status"))?;
    for n in names {
        std::fs::hard_link(corpus.join(n), wal.join(n))
            .or_else(|_| std::fs::copy(corpus.join(n), wal.join(n)).map(|_| ()))?;
        std::fs::write(wal.join("archive_status").join(format!("{n}.ready")), "")?;
    }
    chown_postgres(&dir)?;
    Ok(copy)
}

/// Calls `push(segment)` for every segment in order, from PGDATA, as the archiver does.
fn measure(
    tool: &str,
    mode: &str,
    pgdata: &Path,
    names: &[String],
    repo: &Path,
    push: impl Fn(&str) -> Result<Command>,
) -> Result<Result1> {
    let started = Instant::now();
    let mut lat = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let t = Instant::now();
        let mut cmd = push(&format!("pg_wal/{n}"))?;
        cmd.current_dir(pgdata);
        run(&mut cmd, &format!("{tool} archive-push {n}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        // as PostgreSQL's archiver does once archive_command succeeded
        let status = pgdata.join("pg_wal").join("archive_status");
        std::fs::rename(status.join(format!("{n}.ready")), status.join(format!("{n}.done")))?;
        if (i + 1) % 16 == 0 {
            eprintln!("archive-bench: {tool} {mode}: {}/{} segments", i + 1, names.len());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    let stored = dir_bytes(repo) as f64;
    let raw = names.len() as f64 * 16.0 * 1024.0 * 1024.0;
    Ok(Result1 {
        tool: tool.into(),
        mode: mode.into(),
        segments: names.len(),
        seconds,
        segments_per_second: names.len() as f64 / seconds,
        ack_p50_ms: percentile(&sorted, 50.0),
        ack_p99_ms: percentile(&sorted, 99.0),
        ack_max_ms: sorted.last().copied().unwrap_or(0.0),
        stored_mib: stored / (1024.0 * 1024.0),
        ratio: if stored > 0.0 { raw / stored } else { 0.0 },
    })
}

fn bench(work: &Path, args: &Args) -> Result<Vec<Result1>> {
    let pgbackrest = PathBuf::from("/usr/bin/pgbackrest");
    ensure!(pgbackrest.is_file(), "pgbackrest is not installed: apt-get install pgbackrest");
    let steward = match &args.steward_agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.parent().context("no parent dir")?.join("steward-agent"),
    };
    ensure!(
        steward.is_file(),
        "{} not found: build steward-agent (same profile) or pass --steward-agent",
        steward.display()
    );
    // The postgres user must be able to run it from anywhere.
    let steward_copy = work.join("steward-agent");
    std::fs::copy(&steward, &steward_copy)?;
    let bindir = pg_bindir()?;
    let reuse =
        segment_names(&work.join("corpus")).len() > args.segments as usize && work.join("pgdata/PG_VERSION").is_file();
    let (pgdata, corpus, names) = if reuse {
        eprintln!("archive-bench: reusing the corpus in {}", work.display());
        let corpus = work.join("corpus");
        let names = segment_names(&corpus).into_iter().take(args.segments as usize).collect();
        (work.join("pgdata"), corpus, names)
    } else {
        make_corpus(work, &bindir, args)?
    };
    for n in [
        "steward-zstd-0",
        "steward-lz4-0",
        "steward-zstd-2",
        "steward-lz4-2",
        "steward-zstd-4",
        "pgbackrest-sync-1",
        "pgbackrest-async-2",
        "pgbackrest-async-4",
    ] {
        let _ = std::fs::remove_dir_all(work.join(n));
    }
    eprintln!("archive-bench: corpus of {} segments ready", names.len());
    let mut results = Vec::new();

    let steward_modes = [
        ("sync, zstd-1", "zstd", 0u16),
        ("sync, lz4", "lz4", 0),
        ("async, zstd-1, 2 processes", "zstd", 2),
        ("async, lz4, 2 processes", "lz4", 2),
        ("async, zstd-1, 4 processes", "zstd", 4),
    ];
    for (mode, compress, processes) in steward_modes {
        let name = format!("steward-{compress}-{processes}");
        let copy = stage(work, &name, &pgdata, &corpus, &names)?;
        let repo = work.join(&name).join("repo");
        let spool = work.join(&name).join("spool");
        std::fs::create_dir_all(&repo)?;
        std::fs::create_dir_all(&spool)?;
        chown_postgres(&work.join(&name))?;
        let r = measure("steward-agent", mode, &copy, &names, &repo, |p| {
            let mut c = as_postgres_direct(&steward_copy)?;
            c.args(["archive-push", "--repo"]).arg(&repo).args(["--stanza", "bench", "--compress", compress]);
            if processes > 0 {
                c.arg("--spool").arg(&spool).args(["--process-max", &processes.to_string()]);
            }
            c.arg(p);
            Ok(c)
        })?;
        results.push(r);
    }
    for (mode, asynchronous, processes) in [
        ("sync, zst-1, 1 process", false, 1),
        ("async, zst-1, 2 processes", true, 2),
        ("async, zst-1, 4 processes", true, 4),
    ] {
        let name = format!("pgbackrest-{}-{processes}", if asynchronous { "async" } else { "sync" });
        let copy = stage(work, &name, &pgdata, &corpus, &names)?;
        let dir = work.join(&name);
        let conf = pgbackrest_conf(&dir, &copy, asynchronous, processes, "")?;
        run(
            as_postgres(&pgbackrest).arg(format!("--config={}", conf.display())).args([
                "--stanza=bench",
                "--no-online",
                "stanza-create",
            ]),
            "pgbackrest stanza-create",
        )?;
        let r = measure("pgbackrest", mode, &copy, &names, &dir.join("repo").join("archive"), |p| {
            let mut c = as_postgres_direct(&pgbackrest)?;
            c.arg(format!("--config={}", conf.display())).args(["--stanza=bench", "archive-push", p]);
            Ok(c)
        })?;
        results.push(r);
    }
    Ok(results)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("archive-bench: run as root (PostgreSQL runs as postgres through runuser)");
        return ExitCode::from(2);
    }
    let result = match &args.work_dir {
        Some(dir) => std::fs::create_dir_all(dir).map_err(anyhow::Error::from).and_then(|()| bench(dir, &args)),
        None => {
            let work = match tempfile::Builder::new().prefix("steward-archive-bench-").tempdir_in("/tmp") {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("archive-bench: cannot create a work directory: {e}");
                    return ExitCode::from(2);
                }
            };
            let result = bench(work.path(), &args);
            if args.keep {
                let kept = work.keep();
                eprintln!("archive-bench: work directory kept at {}", kept.display());
            }
            result
        }
    };
    match result {
        Ok(results) => {
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&results).unwrap_or_default()),
                Output::Table => {
                    println!(
                        "WAL archive-push, {} segments of 16 MiB from pgbench, each call waited for in order",
                        args.segments
                    );
                    println!(
                        "{:<14} {:<28} {:>8} {:>9} {:>9} {:>9} {:>10} {:>6}",
                        "tool", "mode", "seg/s", "ack p50", "ack p99", "ack max", "stored", "ratio"
                    );
                    for r in &results {
                        println!(
                            "{:<14} {:<28} {:>8.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}MiB {:>6.2}",
                            r.tool,
                            r.mode,
                            r.segments_per_second,
                            r.ack_p50_ms,
                            r.ack_p99_ms,
                            r.ack_max_ms,
                            r.stored_mib,
                            r.ratio
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("archive-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
