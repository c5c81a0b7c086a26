//! `cp-bench`: scale and speed of the control plane (issue 8, first part).
//!
//! Starts a 3-node control plane on loopback (release binaries next to this executable, or
//! `STEWARD_BIN_DIR`) with `--rate-limit 1000000`, so the per-caller limiter does not cap the
//! load, and measures, each phase for `--secs` with `--clients` concurrent REST clients:
//!
//! - **teams**: `POST /v1/teams` through the leader: one Raft write per request and nothing
//!   else (no provisioning), i.e. acknowledged Raft proposals/s as the REST API reaches them;
//! - **teams via follower**: the same through a follower (which forwards to the leader);
//! - **reads**: `GET /v1/databases` (linearizable) on the leader and on a follower;
//! - **databases**: `POST /v1/databases` (202) through the leader, with `--hosts` simulated
//!   agents (real gRPC protocol, agent certificates, no PostgreSQL) registered so placement
//!   succeeds; provisioning then tries to reach the simulated agents, whose address is
//!   unreachable, so this phase includes that background work;
//! - **election**: `--elections` times, SIGKILL the leader and time until a surviving node
//!   reports a surviving leader on `/healthz` (polled every 5 ms); the killed node is restarted
//!   before the next run;
//! - **agents** (`--agents N`, 0 skips): N simulated agents register and heartbeat at 1 Hz for
//!   `--agent-secs`; reports heartbeat RPC latency and the leader's CPU and RSS over that time.
//!
//! For each load phase it also reports the CPU each node used (from /proc/<pid>/stat), in
//! cores. Run: `cargo build --release --bins && cargo run --release -p steward-tests --bin
//! cp-bench`. Results: docs/benchmarks.md ("Control-plane scale").

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use steward_tests::benchkit::percentile;
use steward_tests::{admin_token, sim, start_group, tls, wait_leader, Node, Rest, Scratch};

#[derive(Parser, Debug)]
#[command(name = "cp-bench", about = "Measures writes, reads, elections and agent load of a 3-node control plane")]
struct Args {
    /// Concurrent REST clients in each load phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Duration of each load phase, in seconds.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Leader kills to time.
    #[arg(long, default_value_t = 5)]
    elections: u32,
    /// Simulated hosts registered for the database-creation phase (0 skips the phase).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Simulated agents heartbeating at 1 Hz in the last phase (0 skips it).
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// Duration of the agents phase, in seconds (after all agents registered).
    #[arg(long, default_value_t = 30)]
    agent_secs: u64,
}

/// Result of one load phase.
struct Load {
    name: String,
    ok: u64,
    errors: u64,
    secs: f64,
    lat_ms: Vec<f64>,
    cpu: Vec<(u64, f64)>,
    first_error: Option<String>,
}

impl Load {
    fn row(&self) -> String {
        let cpu: Vec<String> = self.cpu.iter().map(|(id, c)| format!("{id}:{c:.2}")).collect();
        format!(
            "| {} | {:.0} | {:.1} | {:.1} | {} | {} |",
            self.name,
            self.ok as f64 / self.secs,
            percentile(&self.lat_ms, 50.0),
            percentile(&self.lat_ms, 99.0),
            self.errors,
            cpu.join(" ")
        )
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set of `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn tick_hz() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

fn pids(nodes: &[Node]) -> Vec<(u64, u32)> {
    nodes.iter().filter_map(|n| Some((n.id, n.proc.as_ref()?.pid()?))).collect()
}

/// Runs `clients` loops of `op(client, seq)` for `secs`; an op returns Ok(true) when acknowledged.
async fn load<F, Fut>(name: &str, nodes: &[Node], clients: usize, secs: u64, op: F) -> Load
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<bool>> + Send,
{
    let before: Vec<(u64, u32, Option<u64>)> = pids(nodes).into_iter().map(|(id, p)| (id, p, cpu_ticks(p))).collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (op, lat, errors, first_error) = (op.clone(), lat.clone(), errors.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match op(c, seq).await {
                    Ok(true) => mine.push(t.elapsed().as_secs_f64() * 1000.0),
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(format!("{e:#}"));
                    }
                }
                seq += 1;
            }
            lat.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let hz = tick_hz();
    let cpu =
        before.into_iter().filter_map(|(id, p, b)| Some((id, (cpu_ticks(p)? - b?) as f64 / hz / elapsed))).collect();
    let mut lat_ms = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
    lat_ms.sort_by(f64::total_cmp);
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Load {
        name: name.into(),
        ok: lat_ms.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        secs: elapsed,
        lat_ms,
        cpu,
        first_error,
    }
}

/// The leader's index in `nodes` (all agreeing).
async fn leader_index(rest: &Rest, nodes: &[Node]) -> Result<usize> {
    let id = wait_leader(rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    nodes.iter().position(|n| n.id == id).context("leader is not one of the nodes")
}

/// SIGKILLs the leader and returns the time until a survivor reports a surviving leader.
async fn election(nodes: &mut [Node]) -> Result<Duration> {
    let rest = Rest::default();
    let probe = Rest { http: tls::https_client(Duration::from_millis(300)) };
    let li = leader_index(&rest, nodes).await?;
    let old = nodes[li].id;
    let survivors: Vec<(u64, String)> =
        nodes.iter().filter(|n| n.id != old).map(|n| (n.id, n.url("/healthz"))).collect();
    nodes[li].kill();
    let t0 = Instant::now();
    let took = loop {
        let mut found = false;
        for (_, url) in &survivors {
            if let Ok((200, v)) = probe.send(reqwest::Method::GET, url, None, None).await {
                if v["leader_id"].as_u64().is_some_and(|l| l != old && survivors.iter().any(|(id, _)| *id == l)) {
                    found = true;
                    break;
                }
            }
        }
        if found {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("no new leader 60 s after killing node {old}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    nodes[li].start()?;
    wait_leader(&rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await?;
    Ok(took)
}

/// One simulated agent heartbeating at 1 Hz until `end`, recording the latency of each heartbeat
/// sent from `measure_from` on.
async fn agent(grpc: Vec<String>, host_id: String, end: Instant, measure_from: Instant, lat: Arc<Mutex<Vec<f64>>>) {
    let mut mine = Vec::new();
    sim::heartbeat_loop(&grpc, &host_id, Duration::from_secs(1), end, |sent, took| {
        if sent >= measure_from {
            mine.push(took.as_secs_f64() * 1000.0);
        }
    })
    .await;
    lat.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = Scratch::new("cp-bench")?;
    let (token_file, token) = admin_token(scratch.path())?;
    let extra = ["--rate-limit", "1000000"];
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::new(scratch.path(), id, &token_file, &extra)).collect();
    let rest = Rest::default();
    start_group(&mut nodes, &rest).await?;
    let li = leader_index(&rest, &nodes).await?;
    let fi = (li + 1) % nodes.len();
    eprintln!("3 nodes up; leader {}, follower used {}", nodes[li].id, nodes[fi].id);
    let mut loads = Vec::new();

    for (label, idx, run) in [("POST /v1/teams via leader", li, 0), ("POST /v1/teams via follower", fi, 1)] {
        let (rest, token, url) = (rest.clone(), token.clone(), nodes[idx].url("/v1/teams"));
        eprintln!("phase: {label}");
        loads.push(
            load(label, &nodes, args.clients, args.secs, move |c, seq| {
                let (rest, token, url) = (rest.clone(), token.clone(), url.clone());
                async move {
                    let body = json!({"name": format!("t{run}c{c}s{seq}"), "contact": "bench@example.com"});
                    let (s, _) = rest.post(&url, &token, &body).await?;
                    Ok(s == 201)
                }
            })
            .await,
        );
    }
    for (label, idx) in [("GET /v1/databases on leader", li), ("GET /v1/databases on follower", fi)] {
        let (rest, token, url) = (rest.clone(), token.clone(), nodes[idx].url("/v1/databases"));
        eprintln!("phase: {label}");
        loads.push(
            load(label, &nodes, args.clients, args.secs, move |_, _| {
                let (rest, token, url) = (rest.clone(), token.clone(), url.clone());
                async move { Ok(rest.get(&url, &token).await?.0 == 200) }
            })
            .await,
        );
    }

    if args.hosts > 0 {
        let grpc: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
        let life = Duration::from_secs(args.secs + 120);
        let hosts: Vec<_> =
            (0..args.hosts).map(|h| sim::spawn_host(grpc.clone(), &format!("bench-h{h}"), life)).collect();
        // They register within a few heartbeats (300 ms apart); the REST API does not list hosts.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (s, v) = rest
            .post(&nodes[li].url("/v1/teams"), &token, &json!({"name": "dbowner", "contact": "bench@example.com"}))
            .await?;
        if s != 201 {
            bail!("creating the owner team: {s} {v}");
        }
        let label = "POST /v1/databases via leader";
        eprintln!("phase: {label}");
        let (rest2, token2, url) = (rest.clone(), token.clone(), nodes[li].url("/v1/databases"));
        loads.push(
            load(label, &nodes, args.clients, args.secs, move |c, seq| {
                let (rest, token, url) = (rest2.clone(), token2.clone(), url.clone());
                async move {
                    let body =
                        json!({"name": format!("d{c}s{seq}"), "owner": "dbowner", "purpose": "bench", "plan": "small"});
                    let (s, v) = rest.post(&url, &token, &body).await?;
                    if s != 202 && s != 201 {
                        bail!("{s} {v}");
                    }
                    Ok(true)
                }
            })
            .await,
        );
        for h in hosts {
            h.abort();
        }
    }

    let mut elections = Vec::new();
    for run in 1..=args.elections {
        let took = election(&mut nodes).await?;
        eprintln!("election {run}: {} ms", took.as_millis());
        elections.push(took.as_secs_f64() * 1000.0);
    }

    let mut agents_report = None;
    if args.agents > 0 {
        eprintln!("phase: {} agents at 1 Hz", args.agents);
        let li = leader_index(&rest, &nodes).await?;
        let grpc: Vec<String> = std::iter::once(nodes[li].grpc.clone())
            .chain(nodes.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, n)| n.grpc.clone()))
            .collect();
        // Certificates first, so issuing them is not measured.
        for a in 0..args.agents {
            tls::host_material(&format!("agent{a}"))?;
        }
        let warmup = Duration::from_secs(20);
        let measure_from = Instant::now() + warmup;
        let end = measure_from + Duration::from_secs(args.agent_secs);
        let lat = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..args.agents)
            .map(|a| {
                let (grpc, lat) = (grpc.clone(), lat.clone());
                tokio::spawn(async move {
                    // Spread the agents over the second.
                    tokio::time::sleep(Duration::from_millis((a as u64 * 1000) / args.agents as u64)).await;
                    agent(grpc, format!("agent{a}"), end, measure_from, lat).await
                })
            })
            .collect();
        tokio::time::sleep_until(measure_from.into()).await;
        let ps = pids(&nodes);
        let before: Vec<Option<u64>> = ps.iter().map(|(_, p)| cpu_ticks(*p)).collect();
        let t = Instant::now();
        for task in tasks {
            let _ = task.await;
        }
        let secs = t.elapsed().as_secs_f64();
        let hz = tick_hz();
        let cpu: Vec<String> = ps
            .iter()
            .zip(before)
            .map(|((id, p), b)| {
                let c = match (cpu_ticks(*p), b) {
                    (Some(a), Some(b)) => (a - b) as f64 / hz / secs,
                    _ => f64::NAN,
                };
                format!(
                    "node {id}{}: {c:.2} cores, RSS {:.0} MiB",
                    if *id == nodes[li].id { " (leader)" } else { "" },
                    rss_mib(*p)
                )
            })
            .collect();
        let mut l = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
        l.sort_by(f64::total_cmp);
        agents_report = Some(format!(
            "{} agents, {:.0} s measured: {} heartbeats ({:.0}/s), latency p50 {:.1} ms, p99 {:.1} ms; {}",
            args.agents,
            secs,
            l.len(),
            l.len() as f64 / secs,
            percentile(&l, 50.0),
            percentile(&l, 99.0),
            cpu.join("; ")
        ));
    }

    println!("\n{} clients, {} s per phase, 3 nodes on loopback\n", args.clients, args.secs);
    println!("| phase | ok/s | p50 ms | p99 ms | errors | CPU cores per node (id:cores) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for l in &loads {
        println!("{}", l.row());
    }
    for l in &loads {
        if let Some(e) = &l.first_error {
            println!("\nfirst error in {}: {e}", l.name);
        }
    }
    if !elections.is_empty() {
        let runs: Vec<String> = elections.iter().map(|e| format!("{e:.0}")).collect();
        let mut sorted = elections.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "\nleader re-election after SIGKILL (ms): {}; median {:.0}",
            runs.join(", "),
            percentile(&sorted, 50.0)
        );
    }
    if let Some(r) = agents_report {
        println!("\n{r}");
    }
    for n in &mut nodes {
        n.kill();
    }
    Ok(())
}
