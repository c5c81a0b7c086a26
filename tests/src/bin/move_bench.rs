//! `move-bench`: the write pause of database moves under load. Starts a control-plane node and
//! two agents on loopback, makes a pgbench database (scale 70 is about 1 GB), then moves it back
//! and forth between the two hosts' clusters while `pgbench` writes to it and a writer that
//! follows `connection.uri` inserts one row at a time. Per move it records how long the copy and
//! the whole move took, the write pause the control plane measured (block → switch), and the
//! pause the following writer saw (its last acknowledged insert on the old cluster → its first
//! on the new one); every acknowledged insert is checked on the final cluster.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use steward_tests::benchkit::{percentile, pg_bindir};
use steward_tests::writer::{switch_pause, UriWriter};
use steward_tests::{wait_for, Scratch, Stack};

#[derive(Parser)]
#[command(about = "Write pause of database moves between clusters under pgbench load")]
struct Args {
    /// pgbench scale of the moved database (70 is about 1 GB).
    #[arg(long, default_value_t = 70)]
    scale: u32,
    /// Moves, alternating between the two clusters.
    #[arg(long, default_value_t = 6)]
    moves: u32,
    /// pgbench clients writing during each move.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Output format.
    #[arg(long, default_value = "table")]
    output: String,
}

/// One measured move.
struct Sample {
    copy: Duration,
    total: Duration,
    server_pause_ms: u64,
    client_pause: Duration,
    pgbench_tps: f64,
}

fn pgbench(uri: &str, args: &[&str]) -> Result<Command> {
    let mut c = Command::new(pg_bindir()?.join("pgbench"));
    c.args(args).arg(uri);
    Ok(c)
}

fn stewardctl(stack: &Stack, args: &[&str]) -> Result<String> {
    let (ok, out, err) = stack.stewardctl(args)?;
    ensure!(ok, "stewardctl {}: {err}{out}", args.join(" "));
    Ok(out)
}

fn cluster_of(stack: &Stack, id: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&stewardctl(stack, &["databases", "--output", "json"])?)?;
    let db = v.as_array().and_then(|a| a.iter().find(|d| d["id"] == id)).context("database not listed")?;
    Ok(db["cluster_id"].as_str().unwrap_or_default().to_string())
}

/// Stops pgbench (the write block ends its sessions anyway) and reads its transactions/s.
fn stop_pgbench(mut child: Child) -> f64 {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = Scratch::new("steward-move-bench-")?;
    let stack = Stack::launch(scratch.path(), 1, 2, &[], &["--memory-budget-mb", "2048"], false).await?;
    let shop = stack.team("bench").await?;
    let db = stack.active_database(&shop, "bench").await?;
    let id = db["id"].as_str().context("id")?.to_string();
    let spare = stack.active_database(&shop, "spare").await?;
    let clusters = [cluster_of(&stack, &id)?, cluster_of(&stack, spare["id"].as_str().context("id")?)?];
    ensure!(clusters[0] != clusters[1], "both databases landed on {}", clusters[0]);
    let uri = db["connection"]["uri"].as_str().context("uri")?.to_string();

    eprintln!("pgbench -i -s {} ...", args.scale);
    let init = Instant::now();
    let out = pgbench(&uri, &["-i", "-q", "-s", &args.scale.to_string()])?.output()?;
    ensure!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    let client = steward_tests::pg_connect(&uri).await?;
    // pgbench_history has no primary key: the move's check says to give it a replica identity.
    client
        .batch_execute(
            "ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
             CREATE TABLE acks (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
    let size: i64 = client.query_one("SELECT pg_database_size(current_database())", &[]).await?.get(0);
    eprintln!("database: {:.0} MiB, made in {:.0} s", size as f64 / 1048576.0, init.elapsed().as_secs_f64());

    let url = stack.node().url(&format!("/v1/databases/{id}"));
    let writer = UriWriter::start(stack.rest.clone(), vec![url.clone()], shop.clone());
    let mut samples = Vec::new();
    for i in 0..args.moves {
        let to = &clusters[((i + 1) % 2) as usize];
        let (_, v) = stack.rest.get(&url, &shop).await?;
        let uri = v["connection"]["uri"].as_str().context("uri")?.to_string();
        let load = pgbench(&uri, &["-n", "-c", &args.clients.to_string(), "-j", "2", "-T", "3600"])?
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let acks_before = writer.count();
        let started = Instant::now();
        let op = stewardctl(&stack, &["database", "move", &id, "--to", to, "--no-wait"])?.trim().to_string();
        let op_url = stack.node().url(&format!("/v1/operations/{op}"));
        let copied_at = std::cell::Cell::new(None);
        let done = wait_for("the move to end", Duration::from_secs(3600), || async {
            let (_, v) = stack.rest.get(&op_url, &shop).await?;
            let step = v["step"].as_str().unwrap_or("");
            let copying = step.starts_with("initial_copy") || step.starts_with("prepare") || step == "queued";
            if copied_at.get().is_none() && !copying {
                copied_at.set(Some(started.elapsed()));
            }
            Ok((v["state"] != "running").then_some(v))
        })
        .await?;
        let total = started.elapsed();
        let tps = stop_pgbench(load);
        ensure!(done["state"] == "succeeded", "move {i}: {done}");
        let detail = done["detail"].as_str().unwrap_or("");
        let server_pause_ms = detail
            .split("writes paused ")
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        wait_for("writes on the new cluster", Duration::from_secs(60), || async {
            Ok((writer.count() > acks_before + 20).then_some(()))
        })
        .await?;
        let acks = writer.acks();
        let client_pause = switch_pause(&acks[acks_before.saturating_sub(1)..]).unwrap_or_default();
        let s =
            Sample { copy: copied_at.get().unwrap_or(total), total, server_pause_ms, client_pause, pgbench_tps: tps };
        eprintln!(
            "move {}: copy {:.1} s, total {:.1} s, write pause {} ms (server) / {} ms (client), pgbench {:.0} tps",
            i + 1,
            s.copy.as_secs_f64(),
            s.total.as_secs_f64(),
            s.server_pause_ms,
            s.client_pause.as_millis(),
            s.pgbench_tps
        );
        samples.push(s);
    }
    let acks = writer.stop().await;
    let (_, v) = stack.rest.get(&url, &shop).await?;
    let client = steward_tests::pg_connect(v["connection"]["uri"].as_str().context("uri")?).await?;
    let have: std::collections::BTreeSet<i64> =
        client.query("SELECT id FROM acks", &[]).await?.iter().map(|r| r.get(0)).collect();
    let lost = acks.iter().filter(|a| !have.contains(&a.id)).count();
    ensure!(lost == 0, "{lost} acknowledged writes lost");

    let mut client_ms: Vec<f64> = samples.iter().map(|s| s.client_pause.as_secs_f64() * 1000.0).collect();
    let mut server_ms: Vec<f64> = samples.iter().map(|s| s.server_pause_ms as f64).collect();
    client_ms.sort_by(f64::total_cmp);
    server_ms.sort_by(f64::total_cmp);
    if args.output == "json" {
        let rows: Vec<Value> = samples
            .iter()
            .map(|s| {
                json!({"copy_s": s.copy.as_secs_f64(), "total_s": s.total.as_secs_f64(),
                    "server_pause_ms": s.server_pause_ms, "client_pause_ms": s.client_pause.as_millis() as u64,
                    "pgbench_tps": s.pgbench_tps})
            })
            .collect();
        println!("{}", json!({"database_bytes": size, "acknowledged_writes": acks.len(), "lost": lost, "moves": rows}));
        return Ok(());
    }
    println!(
        "database {:.0} MiB, {} acknowledged writes by the following writer, none lost",
        size as f64 / 1048576.0,
        acks.len()
    );
    println!("| move | copy | total | write pause (control plane) | write pause (client) | pgbench tps |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, s) in samples.iter().enumerate() {
        println!(
            "| {} | {:.1} s | {:.1} s | {} ms | {} ms | {:.0} |",
            i + 1,
            s.copy.as_secs_f64(),
            s.total.as_secs_f64(),
            s.server_pause_ms,
            s.client_pause.as_millis(),
            s.pgbench_tps
        );
    }
    println!(
        "write pause, client: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; control plane: p50 {:.0} ms, max {:.0} ms",
        percentile(&client_ms, 50.0),
        percentile(&client_ms, 95.0),
        client_ms.last().copied().unwrap_or(0.0),
        percentile(&server_ms, 50.0),
        server_ms.last().copied().unwrap_or(0.0)
    );
    Ok(())
}
