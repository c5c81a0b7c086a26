//! `cp-bench`: scale and speed of the control plane (issue 8).
//!
//! Starts a 3-node control plane on loopback (release binaries next to this executable, or
//! `STEWARD_BIN_DIR`) with `--rate-limit 1000000`, so the per-caller limiter does not cap the
//! load, and measures, each phase for `--secs` with `--clients` concurrent REST clients:
//!
//! - **teams**: `POST /v1/teams` through the leader: one Raft write per request and nothing
//!   else (no provisioning), i.e. acknowledged Raft proposals/s as the REST API reaches them;
//! - **teams via follower**: the same through a follower (which forwards to the leader);
//!   for each write phase the report also gives the log entries the leader's group commit
//!   proposed and the commands per entry (its `/metrics` before and after the phase);
//! - **teams, open loop** (`--rate R`, 0 skips): `POST /v1/teams` through the leader at R
//!   requests a second, each sent on schedule and timed from then: the latency at that load
//!   (the closed-loop phases above measure the most a node takes, where latency is queueing),
//!   then `GET /v1/databases` on the same schedule, which shows what the machine and the client
//!   add without Raft;
//! - **reads**: `GET /v1/databases` (linearizable) on the leader and on a follower;
//! - **databases** (`--hosts N`, 0 skips): `POST /v1/databases` (202) through the leader, with
//!   N simulated agents (real gRPC protocol, agent certificates, no PostgreSQL) registered so
//!   placement succeeds; their agent address is unreachable, so provisioning keeps retrying
//!   in the background of this phase;
//! - **election**: `--elections` times, SIGKILL the leader and time until a surviving node
//!   reports a surviving leader on `/healthz` (polled every 5 ms); the killed node is restarted
//!   before the next run, and each kill waits until all nodes applied the same last entry;
//! - **agents** (`--agents N`, 0 skips; without `--databases`): N simulated agents register and
//!   heartbeat at 1 Hz (after 20 s to register, `--agent-secs` are measured); reports heartbeat
//!   RPC latency and each node's CPU and RSS over that time.
//!
//! With `--databases D` (needs `--agents N`) the last phase is a fleet instead: N simulated
//! agents that also serve the agents' command service (`sim::ServedAgent`: each on its own
//! port of 127.0.0.1 with its own agent certificate; instance and database commands succeed
//! without PostgreSQL and the instances are reported, running, in every heartbeat), so the
//! control plane really provisions on them. In order:
//!
//! 1. the N agents register (time until the leader lists all of them `active`);
//! 2. D `single` databases (plan `small`) are created with `--clients` REST clients through the
//!    leader (creates/s, p50/p99 of acknowledged creates; 503s and timeouts are retried), then
//!    the time until the operator API lists all D `active` (polled every second), with node
//!    CPU/RSS, Raft entries appended and heartbeat latency over creation and activation;
//! 3. a steady window of `--agent-secs`: the agents heartbeat at 1 Hz with their instances;
//!    heartbeat latency p50/p99 and failures, node CPU and RSS, and the Raft log entries the
//!    leader appended meanwhile (last log index before and after from the operator API's
//!    RaftStatus): heartbeats must not be Raft writes;
//! 4. dead-host detection: one agent stops heartbeating; time until the leader logs that it
//!    marks the host down, and until its ListHosts (polled every ~50 ms, one call at a time)
//!    shows it `down`, against the nodes' `--host-down-after-ms` (default 5000); then the time
//!    until it is `active` again once it heartbeats again;
//! 5. snapshot: bytes of `snapshot.db`, `state.db` and `raft-log.db` (with their `-wal` files)
//!    in each node's data dir;
//!    a fresh 4th node joins (join token, AddNode, as tests/tests/raft_failover.rs does) and is
//!    timed until its applied index reaches the leader's last log index, with the snapshots it
//!    installed (and their size, from its log); it is then removed;
//! 6. restart: a follower is SIGKILLed and started again; time until it answers `/healthz`
//!    and until its applied index reaches the leader's last log index.
//!
//! `--snapshot-logs`/`--keep-logs` are passed to the nodes (small runs need them to make the
//! new node install a snapshot rather than replay the log). Every wait has a deadline
//! (`--deadline-secs` for the long ones) and long phases print progress on stderr.
//!
//! For each load phase it also reports the CPU each node used (from /proc/<pid>/stat), in
//! cores. Run: `cargo build --release --bins && cargo run --release -p steward-tests --bin
//! cp-bench -- --agents 1000 --databases 10000`. Results: docs/benchmarks.md ("Control-plane
//! scale").

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use steward_tests::benchkit::percentile;
use steward_tests::{admin_token, metric, sim, start_group, tls, wait_leader, Node, Rest, Scratch};

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
    /// Duration of the agents phase, in seconds (after all agents registered); with
    /// `--databases`, of the steady window.
    #[arg(long, default_value_t = 30)]
    agent_secs: u64,
    /// Databases to create over the `--agents` simulated hosts, which then serve the agents'
    /// command service (0: the plain agents phase instead).
    #[arg(long, default_value_t = 0)]
    databases: usize,
    /// Deadline of each long wait (creating the databases, their activation), in seconds.
    #[arg(long, default_value_t = 1800)]
    deadline_secs: u64,
    /// Requests a second of the open-loop write phase (`POST /v1/teams` via the leader, each
    /// request sent on schedule and timed from it), for latency at a given load (0 skips it).
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Duration of the open-loop write phase, in seconds (default: `--secs`). Long enough to
    /// hold snapshots (at 2,000/s the nodes build one every ~40 s), its p99 includes them; the
    /// report lists the snapshots built during each phase.
    #[arg(long)]
    open_loop_secs: Option<u64>,
    /// Passed to the nodes (their default is 5000).
    #[arg(long)]
    host_down_after_ms: Option<u64>,
    /// Passed to the nodes: a snapshot every this many log entries (their default is 10000).
    #[arg(long)]
    snapshot_logs: Option<u64>,
    /// Passed to the nodes: log entries kept after a snapshot (their default is 1000).
    #[arg(long)]
    keep_logs: Option<u64>,
    /// Keep the nodes' state databases in their data dirs on disk (the nodes' default) instead
    /// of on tmpfs under /dev/shm (`--state-dir`, as the packaged unit does with /run).
    #[arg(long)]
    state_on_disk: bool,
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
    /// Snapshots the nodes built during the phase: (node id, seconds into the phase).
    snapshots: Vec<(u64, f64)>,
    /// Requests slower than [`SLOW_MS`], by second of the phase (seconds without any left out).
    slow_by_second: Vec<(u64, u64)>,
    /// Write phases: the log entries the leader's group commit proposed during the phase and
    /// the commands in them (from its `/metrics`), i.e. how well writes were batched.
    batching: Option<(u64, u64)>,
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
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set of `pid`, in MiB.
pub(crate) fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

pub(crate) fn tick_hz() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

pub(crate) fn pids(nodes: &[Node]) -> Vec<(u64, u32)> {
    nodes.iter().filter_map(|n| Some((n.id, n.proc.as_ref()?.pid()?))).collect()
}

/// Runs `clients` loops of `op(client, seq)` for `secs`; an op returns Ok(true) when acknowledged.
async fn load<F, Fut>(name: &str, nodes: &[Node], clients: usize, secs: u64, op: F) -> Load
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<bool>> + Send,
{
    let run = Run::start(nodes);
    let end = run.start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (op, tally) = (op.clone(), run.tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                tally.record(t, op(c, seq).await);
                seq += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    run.finish(name)
}

/// One request of the write and read phases.
#[derive(Clone, Copy)]
enum Call {
    /// `POST /v1/teams` with a new name per phase (`run`), client and request: one Raft write.
    CreateTeam { run: u32 },
    /// `GET /v1/databases`: one linearizable read.
    ListDatabases,
}

impl Call {
    fn path(self) -> &'static str {
        match self {
            Call::CreateTeam { .. } => "/v1/teams",
            Call::ListDatabases => "/v1/databases",
        }
    }

    /// Sends it; true when answered as expected (201, 200).
    async fn send(self, rest: &Rest, url: &str, token: &str, client: usize, seq: u64) -> Result<bool> {
        match self {
            Call::CreateTeam { run } => {
                let body = json!({"name": format!("t{run}c{client}s{seq}"), "contact": "bench@example.com"});
                Ok(rest.post(url, token, &body).await?.0 == 201)
            }
            Call::ListDatabases => Ok(rest.get(url, token).await?.0 == 200),
        }
    }
}

/// Open-loop load: `rate` requests a second for `secs`, each started on schedule whether or
/// not earlier ones have answered, and timed from its scheduled start (so a stall shows in the
/// latencies instead of lowering the request rate). `op` gets client 0 and the request's number.
async fn paced<F, Fut>(name: &str, nodes: &[Node], rate: u64, secs: u64, op: F) -> Load
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<bool>> + Send + 'static,
{
    let run = Run::start(nodes);
    let total = rate.saturating_mul(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = run.start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let (op, tally) = (op.clone(), run.tally.clone());
        tasks.spawn(async move { tally.record(due, op(0, i).await) });
        // Reap finished requests as we go, so the set stays the size of what is in flight.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    run.finish(name)
}

/// Latencies and failures of one load phase, shared by its request tasks.
struct Tally {
    lat_ms: Mutex<Vec<f64>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// The phase's start, and for each second of it the requests slower than [`SLOW_MS`]:
    /// whether slow requests come in bursts (a snapshot, a stalled disk) or everywhere.
    start: Instant,
    slow_by_second: Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// The latency goal at 2,000 writes/s; requests slower than this are counted per second.
const SLOW_MS: f64 = 20.0;

impl Tally {
    fn new(start: Instant) -> Self {
        Self {
            lat_ms: Mutex::default(),
            errors: AtomicU64::default(),
            first_error: Mutex::default(),
            start,
            slow_by_second: Mutex::default(),
        }
    }

    /// Records one request that started (or was due) at `since`.
    fn record(&self, since: Instant, outcome: Result<bool>) {
        match outcome {
            Ok(true) => {
                let ms = since.elapsed().as_secs_f64() * 1000.0;
                self.lat_ms.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                if ms > SLOW_MS {
                    let second = since.saturating_duration_since(self.start).as_secs();
                    *self.slow_by_second.lock().unwrap_or_else(|p| p.into_inner()).entry(second).or_default() += 1;
                }
            }
            Ok(false) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(format!("{e:#}"));
            }
        }
    }
}

/// One load phase in progress: its start, the nodes' CPU time at the start, and its tally.
struct Run {
    start: Instant,
    start_wall: std::time::SystemTime,
    cpu_before: Vec<(u64, u32, Option<u64>)>,
    /// Each node's snapshot metadata file, whose modification time says when it built one.
    snapshot_metas: Vec<(u64, std::path::PathBuf)>,
    tally: Arc<Tally>,
}

impl Run {
    fn start(nodes: &[Node]) -> Self {
        let cpu_before = pids(nodes).into_iter().map(|(id, p)| (id, p, cpu_ticks(p))).collect();
        let snapshot_metas = nodes.iter().map(|n| (n.id, n.dir.join("raft").join("snapshot.meta.json"))).collect();
        let start = Instant::now();
        let tally = Arc::new(Tally::new(start));
        Self { start, start_wall: std::time::SystemTime::now(), cpu_before, snapshot_metas, tally }
    }

    fn finish(self, name: &str) -> Load {
        let elapsed = self.start.elapsed().as_secs_f64();
        let hz = tick_hz();
        let cpu = self
            .cpu_before
            .into_iter()
            .filter_map(|(id, p, b)| Some((id, (cpu_ticks(p)? - b?) as f64 / hz / elapsed)))
            .collect();
        let mut lat_ms = std::mem::take(&mut *self.tally.lat_ms.lock().unwrap_or_else(|p| p.into_inner()));
        lat_ms.sort_by(f64::total_cmp);
        let first_error = self.tally.first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        // The last snapshot of each node, if it came during the phase (a node that built two
        // shows its last one only).
        let mut snapshots: Vec<(u64, f64)> = self
            .snapshot_metas
            .iter()
            .filter_map(|(id, path)| {
                let at = std::fs::metadata(path).ok()?.modified().ok()?.duration_since(self.start_wall).ok()?;
                Some((*id, at.as_secs_f64()))
            })
            .collect();
        snapshots.sort_by(|a, b| a.1.total_cmp(&b.1));
        let slow_by_second = std::mem::take(&mut *self.tally.slow_by_second.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect();
        Load {
            slow_by_second,
            snapshots,
            batching: None,
            name: name.into(),
            ok: lat_ms.len() as u64,
            errors: self.tally.errors.load(Ordering::Relaxed),
            secs: elapsed,
            lat_ms,
            cpu,
            first_error,
        }
    }
}

/// The group-commit counters on `node`'s `/metrics`: (log entries proposed, commands in them).
/// `None` when the node does not answer; the report then leaves batching out.
async fn group_commit_counts(rest: &Rest, node: &Node, token: &str) -> Option<(u64, u64)> {
    let entries = metric(rest, node, token, "steward_raft_proposal_entries_total").await.ok()?;
    let commands = metric(rest, node, token, "steward_raft_proposals_total").await.ok()?;
    Some((entries as u64, commands as u64))
}

/// The leader's index in `nodes` (all agreeing).
pub(crate) async fn leader_index(rest: &Rest, nodes: &[Node]) -> Result<usize> {
    let id = wait_leader(rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    nodes.iter().position(|n| n.id == id).context("leader is not one of the nodes")
}

/// Waits until every node reports the same last log index and has applied it (`/healthz`): a
/// healthy, caught-up group, as a leader usually dies in. (Right after a restart a node may
/// still lack the newest entries; killing the leader then costs an extra election timeout, since
/// the lagging node's first vote is refused. That case is the restart line's, not this one's.)
async fn caught_up(rest: &Rest, nodes: &[Node]) -> Result<()> {
    steward_tests::wait_for("all nodes at the same applied index", Duration::from_secs(30), || async {
        let mut seen = Vec::new();
        for n in nodes {
            let (s, v) = rest.send(reqwest::Method::GET, &n.url("/healthz"), None, None).await?;
            if s != 200 {
                return Ok(None);
            }
            let (last, applied) = (v["last_log_index"].as_u64(), v["last_applied"].as_u64());
            if last.is_none() || last != applied {
                return Ok(None);
            }
            seen.push(last);
        }
        Ok(seen.windows(2).all(|w| w[0] == w[1]).then_some(()))
    })
    .await
}

/// SIGKILLs the leader and returns the time until a survivor reports a surviving leader.
async fn election(nodes: &mut [Node]) -> Result<Duration> {
    let rest = Rest::default();
    let probe = Rest { http: tls::https_client(Duration::from_millis(300)) };
    let li = leader_index(&rest, nodes).await?;
    caught_up(&rest, nodes).await?;
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
    if args.databases > 0 && args.agents == 0 {
        bail!("--databases needs simulated hosts to place them on: give --agents N too");
    }
    let scratch = Scratch::new("cp-bench")?;
    let (token_file, token) = admin_token(scratch.path())?;
    let mut extra: Vec<String> = vec!["--rate-limit".into(), "1000000".into()];
    for (flag, v) in [
        ("--host-down-after-ms", args.host_down_after_ms),
        ("--snapshot-logs", args.snapshot_logs),
        ("--keep-logs", args.keep_logs),
    ] {
        if let Some(v) = v {
            extra.extend([flag.to_string(), v.to_string()]);
        }
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::new(scratch.path(), id, &token_file, &extra)).collect();
    // The state databases on tmpfs, removed with this directory at the end.
    let state_root = match args.state_on_disk {
        true => None,
        false => Some(tempfile::Builder::new().prefix("cp-bench-state").tempdir_in("/dev/shm")?),
    };
    if let Some(root) = &state_root {
        for n in &mut nodes {
            n.args.extend(["--state-dir".into(), root.path().join(format!("cp-{}", n.id)).display().to_string()]);
        }
    }
    let rest = Rest::default();
    start_group(&mut nodes, &rest).await?;
    let li = leader_index(&rest, &nodes).await?;
    let fi = (li + 1) % nodes.len();
    eprintln!("3 nodes up; leader {}, follower used {}", nodes[li].id, nodes[fi].id);
    let mut loads = Vec::new();
    // (label, node, request, pace, secs): closed loop with `--clients` clients, or open loop at
    // `--rate`.
    let secs = args.secs;
    let mut phases = vec![
        ("POST /v1/teams via leader".to_string(), li, Call::CreateTeam { run: 0 }, None, secs),
        ("POST /v1/teams via follower".to_string(), fi, Call::CreateTeam { run: 1 }, None, secs),
    ];
    if args.rate > 0 {
        let open = |what: &str| format!("{what}, {} req/s open loop", args.rate);
        let open_secs = args.open_loop_secs.unwrap_or(secs);
        let label = format!("{} for {open_secs} s", open("POST /v1/teams via leader"));
        phases.push((label, li, Call::CreateTeam { run: 2 }, Some(args.rate), open_secs));
        // The same schedule without Raft: what the machine and the client add by themselves.
        phases.push((open("GET /v1/databases on leader"), li, Call::ListDatabases, Some(args.rate), secs));
    }
    phases.push(("GET /v1/databases on leader".to_string(), li, Call::ListDatabases, None, secs));
    phases.push(("GET /v1/databases on follower".to_string(), fi, Call::ListDatabases, None, secs));
    for (label, idx, call, rate, secs) in phases {
        eprintln!("phase: {label}");
        let (op_rest, op_token, url) = (rest.clone(), token.clone(), nodes[idx].url(call.path()));
        let op = move |client, seq| {
            let (rest, token, url) = (op_rest.clone(), op_token.clone(), url.clone());
            async move { call.send(&rest, &url, &token, client, seq).await }
        };
        let writes = matches!(call, Call::CreateTeam { .. });
        let before = if writes { group_commit_counts(&rest, &nodes[li], &token).await } else { None };
        let mut l = match rate {
            Some(rate) => paced(&label, &nodes, rate, secs, op).await,
            None => load(&label, &nodes, args.clients, secs, op).await,
        };
        if let Some(b) = before {
            l.batching = group_commit_counts(&rest, &nodes[li], &token)
                .await
                .map(|a| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)));
        }
        loads.push(l);
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
    let mut fleet_report = Vec::new();
    if args.databases > 0 {
        let cfg = fleet::Config {
            agents: args.agents,
            databases: args.databases,
            clients: args.clients,
            steady: Duration::from_secs(args.agent_secs),
            deadline: Duration::from_secs(args.deadline_secs),
            down_after_ms: args.host_down_after_ms.unwrap_or(5000),
        };
        if let Err(e) =
            fleet::phases(&cfg, &mut nodes, scratch.path(), &token_file, &token, &extra, &mut fleet_report).await
        {
            fleet_report.push(format!("FLEET PHASE FAILED: {e:#}"));
        }
    } else if args.agents > 0 {
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
        let slow: u64 = l.slow_by_second.iter().map(|(_, n)| n).sum();
        if slow > 0 {
            let mut worst = l.slow_by_second.clone();
            worst.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let worst: Vec<String> = worst.iter().take(8).map(|(s, n)| format!("{n} in second {s}")).collect();
            println!(
                "\n{}: {slow} requests over {SLOW_MS} ms ({:.2}%), in {} of its seconds; most: {}",
                l.name,
                slow as f64 * 100.0 / (l.ok.max(1)) as f64,
                l.slow_by_second.len(),
                worst.join(", ")
            );
        }
        if let Some((entries, commands)) = l.batching.filter(|(e, _)| *e > 0) {
            println!(
                "\ngroup commit during {}: {entries} log entries ({:.0}/s), {:.1} commands per entry",
                l.name,
                entries as f64 / l.secs,
                commands as f64 / entries as f64
            );
        }
        if !l.snapshots.is_empty() {
            let at: Vec<String> = l.snapshots.iter().map(|(id, s)| format!("node {id} at {s:.1} s")).collect();
            println!("\nsnapshots built during {}: {}", l.name, at.join(", "));
        }
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
    if !fleet_report.is_empty() {
        println!("\nfleet: {} agents, {} databases\n", args.agents, args.databases);
        for l in &fleet_report {
            println!("- {l}");
        }
    }
    for n in &mut nodes {
        n.kill();
    }
    Ok(())
}

/// The fleet phases (`--databases`): simulated agents serving the command service, databases
/// provisioned on them, steady heartbeats, dead-host detection, snapshot install, restart.
mod fleet {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};
    use serde_json::json;
    use steward_proto::v1::operator_client::OperatorClient;
    use steward_proto::v1::{
        AddNodeRequest, CreateJoinTokenRequest, ListClustersRequest, ListDatabasesRequest, ListHostsRequest,
        ListOperationsRequest, RaftStatusReply, RaftStatusRequest, RemoveNodeRequest,
    };
    use steward_tests::benchkit::percentile;
    use steward_tests::sim::{self, op_req, ServedAgent};
    use steward_tests::{tls, wait_for, wait_leader, Node, Rest};
    use tonic::transport::Channel;

    use super::{cpu_ticks, leader_index, pids, rss_mib, tick_hz};

    /// What the fleet phases do.
    pub struct Config {
        pub agents: usize,
        pub databases: usize,
        pub clients: usize,
        pub steady: Duration,
        pub deadline: Duration,
        /// The nodes' --host-down-after-ms.
        pub down_after_ms: u64,
    }

    type Op = OperatorClient<Channel>;

    /// Owner team of the fleet's databases; host ids are `fleet-<n>`.
    const TEAM: &str = "fleet";

    fn op(addr: &str) -> Result<Op> {
        Ok(sim::operator(addr)?.max_decoding_message_size(256 << 20))
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    fn mib(bytes: u64) -> f64 {
        bytes as f64 / (1024.0 * 1024.0)
    }

    async fn raft_status(c: &mut Op, token: &str) -> Result<RaftStatusReply> {
        let mut r = op_req(token, RaftStatusRequest {});
        r.set_timeout(Duration::from_secs(5));
        Ok(c.raft_status(r).await?.into_inner())
    }

    /// The leader's id and last log index, as the leader itself reports them.
    async fn leader_log(nodes: &[Node], token: &str) -> Result<(u64, u64)> {
        wait_for("a leader to report its Raft status", Duration::from_secs(60), || async {
            for n in nodes.iter().filter(|n| n.proc.is_some()) {
                let Ok(s) = raft_status(&mut op(&n.grpc)?, token).await else { continue };
                let Some(l) = nodes.iter().find(|m| m.id == s.leader_id && m.proc.is_some()) else { continue };
                let ls = raft_status(&mut op(&l.grpc)?, token).await?;
                if ls.leader_id == ls.node_id {
                    return Ok(Some((ls.node_id, ls.last_log_index)));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Every heartbeat sent after registration: when, and its latency in ms (`None`: failed).
    type BeatLog = Arc<Mutex<Vec<(Instant, Option<f64>)>>>;

    /// The simulated agents and their heartbeat tasks.
    struct Agents {
        served: Vec<ServedAgent>,
        tasks: Vec<Option<tokio::task::JoinHandle<()>>>,
        /// When each agent's last heartbeat was answered.
        last_ok: Vec<Arc<Mutex<Option<Instant>>>>,
        log: BeatLog,
        grpc: Vec<String>,
    }

    impl Agents {
        /// (Re)starts agent `a`'s heartbeats at 1 Hz after `delay`; `registered`: it resumes
        /// heartbeating without registering first.
        fn spawn(&mut self, a: usize, delay: Duration, registered: bool) {
            let mut beat = self.served[a].beat.clone();
            beat.registered = registered;
            let (grpc, log, last) = (self.grpc.clone(), self.log.clone(), self.last_ok[a].clone());
            let task = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let end = Instant::now() + Duration::from_secs(30 * 86_400);
                sim::heartbeat_loop_with(&grpc, &beat, Duration::from_secs(1), end, |sent, took| {
                    if let Some(t) = took {
                        *lock(&last) = Some(sent + t);
                    }
                    lock(&log).push((sent, took.map(|t| t.as_secs_f64() * 1000.0)));
                })
                .await
            });
            if let Some(old) = self.tasks[a].replace(task) {
                old.abort();
            }
        }

        /// Stops agent `a`'s heartbeats (it keeps serving commands).
        fn stop(&mut self, a: usize) {
            if let Some(t) = self.tasks[a].take() {
                t.abort();
            }
        }
    }

    impl Drop for Agents {
        fn drop(&mut self) {
            for t in self.tasks.iter_mut().filter_map(Option::take) {
                t.abort();
            }
        }
    }

    /// Heartbeats sent in `[from, to)`: sorted latencies of the answered ones, and the failed count.
    fn beats_between(log: &BeatLog, from: Instant, to: Instant) -> (Vec<f64>, usize) {
        let l = lock(log);
        let mut ok = Vec::new();
        let mut failed = 0;
        for (_, v) in l.iter().filter(|(at, _)| *at >= from && *at < to) {
            match v {
                Some(v) => ok.push(*v),
                None => failed += 1,
            }
        }
        ok.sort_by(f64::total_cmp);
        (ok, failed)
    }

    /// A point in time: each node's CPU ticks and RSS, the leader and its last log index.
    struct Mark {
        at: Instant,
        procs: Vec<(u64, u32, Option<u64>, f64)>,
        leader: u64,
        last_log: u64,
    }

    async fn mark(nodes: &[Node], token: &str) -> Result<Mark> {
        let (leader, last_log) = leader_log(nodes, token).await?;
        let procs = pids(nodes).into_iter().map(|(id, p)| (id, p, cpu_ticks(p), rss_mib(p))).collect();
        Ok(Mark { at: Instant::now(), procs, leader, last_log })
    }

    /// Node CPU (cores) and RSS, Raft entries appended and heartbeats between two marks.
    fn window(what: &str, a: &Mark, b: &Mark, log: &BeatLog) -> String {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let hz = tick_hz();
        let nodes: Vec<String> = b
            .procs
            .iter()
            .map(|(id, pid, t1, rss)| {
                let before = a.procs.iter().find(|(i, p, _, _)| i == id && p == pid).and_then(|x| x.2);
                let cores = match (before, t1) {
                    (Some(t0), Some(t1)) => format!("{:.2}", t1.saturating_sub(t0) as f64 / hz / secs),
                    _ => "n/a (restarted)".into(),
                };
                let lead = if *id == b.leader { " (leader)" } else { "" };
                format!("node {id}{lead} {cores} cores, RSS {rss:.0} MiB")
            })
            .collect();
        let (ok, failed) = beats_between(log, a.at, b.at);
        let leader = if a.leader == b.leader {
            format!("leader {}", b.leader)
        } else {
            format!("LEADER CHANGED {} -> {}", a.leader, b.leader)
        };
        format!(
            "{what} ({secs:.1} s): {}; Raft log entries appended: {} (last log index {} -> {}, {leader}); \
             heartbeats: {} answered ({:.0}/s), {failed} failed, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            nodes.join(", "),
            b.last_log.saturating_sub(a.last_log),
            a.last_log,
            b.last_log,
            ok.len(),
            ok.len() as f64 / secs,
            percentile(&ok, 50.0),
            percentile(&ok, 99.0),
            ok.last().copied().unwrap_or(0.0),
        )
    }

    /// Polls the leader's ListHosts (via `lop`) until `count` fleet hosts are active.
    async fn wait_registered(lop: &mut Op, token: &str, count: usize, deadline: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let hosts = lop.list_hosts(op_req(token, ListHostsRequest {})).await;
            let active = match &hosts {
                Ok(h) => h.get_ref().hosts.iter().filter(|h| h.id.starts_with("fleet-") && h.state == "active").count(),
                Err(_) => 0,
            };
            if active >= count {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > deadline {
                bail!(
                    "only {active} of {count} simulated hosts are active {:.0} s after they started heartbeating (last \
                     ListHosts: {})",
                    t0.elapsed().as_secs_f64(),
                    hosts.err().map(|e| e.message().to_string()).unwrap_or_else(|| "ok".into())
                );
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                eprintln!("  {active}/{count} hosts active after {:.0} s", t0.elapsed().as_secs_f64());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Outcome of creating the databases.
    struct Creates {
        acked: u64,
        /// 409 on a retry: an earlier attempt that timed out had created it.
        conflicts: u64,
        gave_up: u64,
        errors: u64,
        /// The deadline passed before all were created.
        late: bool,
        first_error: Option<String>,
        lat_ms: Vec<f64>,
        secs: f64,
    }

    /// Creates `f0` .. `f<n-1>` owned by [`TEAM`] with `clients` concurrent clients, retrying
    /// failures (up to 20 times each, backing off), until done or `deadline` passed.
    async fn create_databases(
        rest: &Rest,
        url: &str,
        token: &str,
        n: usize,
        clients: usize,
        deadline: Duration,
    ) -> Result<Creates> {
        let next = Arc::new(AtomicUsize::new(0));
        let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // acked, conflicts, gave up, errors
        let first_error = Arc::new(Mutex::new(None::<String>));
        let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let late = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let end = start + deadline;
        let progress = {
            let c = counters.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let done = c[0].load(Ordering::Relaxed) + c[1].load(Ordering::Relaxed);
                    eprintln!(
                        "  created {done}/{n} in {:.0} s ({:.0}/s), {} failed attempts so far",
                        start.elapsed().as_secs_f64(),
                        done as f64 / start.elapsed().as_secs_f64(),
                        c[3].load(Ordering::Relaxed)
                    );
                }
            })
        };
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (rest, url, token) = (rest.clone(), url.to_string(), token.to_string());
            let (next, c, first_error, lat, late) =
                (next.clone(), counters.clone(), first_error.clone(), lat.clone(), late.clone());
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                'dbs: loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let body =
                        json!({"name": format!("f{i}"), "owner": TEAM, "purpose": "cp-bench fleet", "plan": "small"});
                    for attempt in 1u64..=20 {
                        if Instant::now() > end {
                            late.store(true, Ordering::Relaxed);
                            break 'dbs;
                        }
                        let t = Instant::now();
                        let error = match rest.post(&url, &token, &body).await {
                            Ok((201 | 202, _)) => {
                                mine.push(t.elapsed().as_secs_f64() * 1000.0);
                                c[0].fetch_add(1, Ordering::Relaxed);
                                continue 'dbs;
                            }
                            Ok((409, _)) if attempt > 1 => {
                                c[1].fetch_add(1, Ordering::Relaxed);
                                continue 'dbs;
                            }
                            Ok((s, v)) => format!("{s} {v}"),
                            Err(e) => format!("{e:#}"),
                        };
                        c[3].fetch_add(1, Ordering::Relaxed);
                        lock(&first_error).get_or_insert(error);
                        tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    }
                    c[2].fetch_add(1, Ordering::Relaxed);
                }
                lock(&lat).extend(mine);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        progress.abort();
        let secs = start.elapsed().as_secs_f64();
        let mut lat_ms = std::mem::take(&mut *lock(&lat));
        lat_ms.sort_by(f64::total_cmp);
        let r = Creates {
            acked: counters[0].load(Ordering::Relaxed),
            conflicts: counters[1].load(Ordering::Relaxed),
            gave_up: counters[2].load(Ordering::Relaxed),
            errors: counters[3].load(Ordering::Relaxed),
            late: late.load(Ordering::Relaxed),
            first_error: lock(&first_error).take(),
            lat_ms,
            secs,
        };
        Ok(r)
    }

    /// Database states of the fleet's databases, from the operator API.
    async fn db_states(lop: &mut Op, token: &str) -> Result<BTreeMap<String, usize>> {
        let mut r = op_req(token, ListDatabasesRequest {});
        r.set_timeout(Duration::from_secs(30));
        let dbs = lop.list_databases(r).await.context("ListDatabases")?.into_inner().databases;
        let mut states = BTreeMap::new();
        for d in dbs.iter().filter(|d| d.owner == TEAM) {
            *states.entry(d.state.clone()).or_insert(0) += 1;
        }
        Ok(states)
    }

    /// Polls every second until `expected` fleet databases are `active` or `failed`; returns
    /// the time since `since`, the last counts, and whether `deadline` passed first (reported
    /// on stderr).
    async fn wait_active(
        lop: &mut Op,
        token: &str,
        expected: usize,
        since: Instant,
        deadline: Duration,
    ) -> Result<(Duration, BTreeMap<String, usize>, bool)> {
        let t0 = Instant::now();
        let mut last_print = Instant::now();
        let mut last_err = String::new();
        let mut states = BTreeMap::new();
        loop {
            match db_states(lop, token).await {
                Ok(s) => states = s,
                Err(e) => last_err = format!("{e:#}"),
            }
            let get = |k: &str| states.get(k).copied().unwrap_or(0);
            if get("active") + get("failed") >= expected {
                return Ok((since.elapsed(), states, false));
            }
            if t0.elapsed() > deadline {
                eprintln!(
                    "  deadline: the {expected} databases are not all active {} s after the last create: {states:?} \
                     (last error: {last_err})",
                    deadline.as_secs()
                );
                return Ok((since.elapsed(), states, true));
            }
            if last_print.elapsed() > Duration::from_secs(5) {
                eprintln!("  {:.0} s: {states:?} of {expected}", since.elapsed().as_secs_f64());
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Polls the leader's ListHosts, one call at a time at most every 50 ms, until `host_id`
    /// is in `state`; returns when that answer arrived, the calls made and their mean latency.
    async fn wait_host_state(
        lop: &mut Op,
        token: &str,
        host_id: &str,
        state: &str,
        deadline: Duration,
    ) -> Result<(Instant, usize, f64)> {
        let t0 = Instant::now();
        let mut calls = 0usize;
        let mut total = Duration::ZERO;
        loop {
            let t = Instant::now();
            let r = lop.list_hosts(op_req(token, ListHostsRequest {})).await;
            calls += 1;
            total += t.elapsed();
            if let Ok(r) = r {
                if r.get_ref().hosts.iter().any(|h| h.id == host_id && h.state == state) {
                    return Ok((Instant::now(), calls, total.as_secs_f64() * 1000.0 / calls as f64));
                }
            }
            if t0.elapsed() > deadline {
                bail!("host {host_id} was not listed {state} within {} s", deadline.as_secs());
            }
            tokio::time::sleep_until((t + Duration::from_millis(50)).into()).await;
        }
    }

    /// The node's `--state-dir`, or its data dir (the state then lives under it, in raft/).
    fn state_dir(node: &Node) -> std::path::PathBuf {
        let at = node.args.iter().position(|a| a == "--state-dir");
        at.and_then(|i| node.args.get(i + 1)).map_or_else(|| node.dir.clone(), std::path::PathBuf::from)
    }

    /// Bytes of the SQLite database `name` under `dir`, with its `-wal` and `-shm` files.
    fn file_bytes(dir: &Path, name: &str) -> u64 {
        steward_tests::benchkit::dir_bytes_where(dir, |f| {
            f.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
    }

    /// How long after `since` the node log `log` says `host_id` was marked down.
    fn marked_down_at(log: &Path, host_id: &str, since: chrono::DateTime<chrono::Utc>) -> Option<chrono::Duration> {
        let text = std::fs::read_to_string(log).ok()?;
        let needle = format!("host_id={host_id} ");
        text.lines().filter(|l| l.contains("marking down") && l.contains(&needle)).find_map(|l| {
            let at =
                chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?).ok()?.with_timezone(&chrono::Utc);
            (at >= since).then(|| at - since)
        })
    }

    /// Polls `url` (a `/healthz`) every 20 ms until it answers 200.
    async fn wait_healthz(probe: &Rest, url: &str, deadline: Duration) -> Result<Instant> {
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = probe.send(reqwest::Method::GET, url, None, None).await {
                return Ok(Instant::now());
            }
            if t0.elapsed() > deadline {
                bail!("{url} did not answer within {} s", deadline.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls node `addr`'s RaftStatus every 50 ms until it applied `index`.
    async fn wait_applied(
        addr: &str,
        token: &str,
        index: u64,
        deadline: Duration,
    ) -> Result<(Instant, RaftStatusReply)> {
        let t0 = Instant::now();
        let mut c = op(addr)?;
        loop {
            let last = match raft_status(&mut c, token).await {
                Ok(s) if s.last_applied >= index => return Ok((Instant::now(), s)),
                Ok(s) => format!("applied {}", s.last_applied),
                Err(e) => format!("{e:#}"),
            };
            if t0.elapsed() > deadline {
                bail!("node at {addr} did not apply index {index} within {} s (last: {last})", deadline.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the fleet phases, appending each result line to `out` as it is measured (so a failure
    /// keeps what was measured before it).
    pub async fn phases(
        cfg: &Config,
        nodes: &mut [Node],
        root: &Path,
        token_file: &Path,
        token: &str,
        extra: &[&str],
        out: &mut Vec<String>,
    ) -> Result<()> {
        let rest = Rest::default();
        let n = cfg.agents;
        let li = leader_index(&rest, nodes).await?;
        let grpc: Vec<String> = std::iter::once(nodes[li].grpc.clone())
            .chain(nodes.iter().enumerate().filter(|(i, _)| *i != li).map(|(_, n)| n.grpc.clone()))
            .collect();

        // 1. Agents: certificates, command services, registration.
        eprintln!("phase: fleet of {n} simulated agents serving the command service");
        let t = Instant::now();
        let mut served = Vec::with_capacity(n);
        for a in 0..n {
            served.push(ServedAgent::start(&format!("fleet-{a}")).await?);
            if (a + 1) % 250 == 0 {
                eprintln!("  {}/{n} agents serving ({:.0} s)", a + 1, t.elapsed().as_secs_f64());
            }
        }
        eprintln!("  {n} agents serving after {:.1} s (certificates issued)", t.elapsed().as_secs_f64());
        let mut agents = Agents {
            served,
            tasks: (0..n).map(|_| None).collect(),
            last_ok: (0..n).map(|_| Arc::new(Mutex::new(None))).collect(),
            log: Arc::new(Mutex::new(Vec::new())),
            grpc,
        };
        for a in 0..n {
            // Spread the agents over the second.
            agents.spawn(a, Duration::from_millis((a as u64 * 1000) / n as u64), false);
        }
        let mut lop = op(&nodes[li].grpc)?;
        let took = wait_registered(&mut lop, token, n, Duration::from_secs(120 + n as u64 / 10)).await?;
        out.push(format!(
            "registration: {n} simulated agents (each serving the command service on its own port with its own \
             certificate) active {:.1} s after they started",
            took.as_secs_f64()
        ));

        // 2. Databases.
        let (s, v) = rest
            .post(&nodes[li].url("/v1/teams"), token, &json!({"name": TEAM, "contact": "bench@example.com"}))
            .await?;
        if s != 201 {
            bail!("creating the team {TEAM}: {s} {v}");
        }
        eprintln!("phase: create {} databases with {} clients", cfg.databases, cfg.clients);
        let m0 = mark(nodes, token).await?;
        let c =
            create_databases(&rest, &nodes[li].url("/v1/databases"), token, cfg.databases, cfg.clients, cfg.deadline)
                .await?;
        let m1 = mark(nodes, token).await?;
        let created = (c.acked + c.conflicts) as usize;
        if c.late {
            out.push(format!(
                "DEADLINE: only {created} of {} databases were created within --deadline-secs {}; the next phases run \
                 with those",
                cfg.databases,
                cfg.deadline.as_secs()
            ));
        }
        out.push(format!(
            "creates: {created} of {} databases acknowledged (202) in {:.1} s via the leader with {} clients: {:.0} \
             creates/s, p50 {:.1} ms, p99 {:.1} ms; {} failed attempts retried ({} creates found done on retry, {} \
             given up after 20 attempts){}",
            cfg.databases,
            c.secs,
            cfg.clients,
            created as f64 / c.secs,
            percentile(&c.lat_ms, 50.0),
            percentile(&c.lat_ms, 99.0),
            c.errors,
            c.conflicts,
            c.gave_up,
            c.first_error
                .map(|e| format!("; first failure: {}", e.chars().take(300).collect::<String>()))
                .unwrap_or_default()
        ));
        out.push(window("while creating", &m0, &m1, &agents.log));
        eprintln!("phase: wait until the {created} databases are active");
        let (all_active, states, late) = wait_active(&mut lop, token, created, m0.at, cfg.deadline).await?;
        let m2 = mark(nodes, token).await?;
        let failed = states.get("failed").copied().unwrap_or(0);
        if late {
            out.push(format!(
                "DEADLINE: the {created} databases were not all active or failed {} s (--deadline-secs) after the last \
                 create; the next phases run anyway",
                cfg.deadline.as_secs()
            ));
        }
        out.push(format!(
            "activation: {} {created} databases active or failed {:.1} s after the first create ({:.1} s after the \
             last): {states:?}",
            if late { "NOT ALL of the" } else { "all" },
            all_active.as_secs_f64(),
            m2.at.duration_since(m1.at).as_secs_f64()
        ));
        out.push(window("from the last create until all active", &m1, &m2, &agents.log));
        let mut r =
            op_req(token, ListOperationsRequest { state: String::new(), kind: "provision".into(), limit: 10_000 });
        r.set_timeout(Duration::from_secs(30));
        if let Ok(ops) = lop.list_operations(r).await {
            let ops = ops.into_inner().operations;
            let retried: Vec<_> = ops.iter().filter(|o| o.attempts > 0).collect();
            let first_failed = ops.iter().find(|o| o.state == "failed").map(|o| o.error.clone()).unwrap_or_default();
            out.push(format!(
                "provision operations: {} listed, {} needed more than one attempt ({} attempts retried in all){}",
                ops.len(),
                retried.len(),
                retried.iter().map(|o| u64::from(o.attempts)).sum::<u64>(),
                if failed > 0 { format!("; first failure: {first_failed}") } else { String::new() }
            ));
        }
        let (instances, dbs) =
            agents.served.iter().map(|a| a.instances.counts()).fold((0, 0), |(i, d), (a, b)| (i + a, d + b));
        let mut r = op_req(token, ListClustersRequest {});
        r.set_timeout(Duration::from_secs(30));
        let clusters = lop.list_clusters(r).await.context("ListClusters")?.into_inner().clusters;
        let members: Vec<_> = clusters.iter().flat_map(|c| c.members.iter()).collect();
        out.push(format!(
            "simulated agents hold {instances} instances and {dbs} databases; the leader lists {} clusters ({} ready), \
             {} members of which {} observed running",
            clusters.len(),
            clusters.iter().filter(|c| c.state == "ready").count(),
            members.len(),
            members.iter().filter(|m| m.running).count()
        ));

        let mut r = op_req(token, ListHostsRequest {});
        r.set_timeout(Duration::from_secs(30));
        let hosts = lop.list_hosts(r).await.context("ListHosts")?.into_inner().hosts;
        let mut per_host: Vec<u32> = hosts.iter().filter(|h| h.id.starts_with("fleet-")).map(|h| h.databases).collect();
        per_host.sort_unstable();
        out.push(format!(
            "placement: {} of {n} hosts carry databases; databases per host min {}, median {}, max {}",
            per_host.iter().filter(|d| **d > 0).count(),
            per_host.first().copied().unwrap_or(0),
            per_host.get(per_host.len() / 2).copied().unwrap_or(0),
            per_host.last().copied().unwrap_or(0)
        ));

        // 3. Steady heartbeats.
        eprintln!("phase: steady window, {n} agents at 1 Hz with their instances, {} s", cfg.steady.as_secs());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let s0 = mark(nodes, token).await?;
        let steady_end = Instant::now() + cfg.steady;
        while Instant::now() < steady_end {
            tokio::time::sleep(Duration::from_secs(10).min(steady_end.saturating_duration_since(Instant::now()))).await;
            let (ok, failed) = beats_between(&agents.log, s0.at, Instant::now());
            eprintln!("  {:.0} s: {} heartbeats answered, {failed} failed", s0.at.elapsed().as_secs_f64(), ok.len());
        }
        let s1 = mark(nodes, token).await?;
        out.push(window(&format!("steady, {n} agents at 1 Hz with {created} databases"), &s0, &s1, &agents.log));

        // 4. Dead host.
        let victim = n - 1;
        let host_id = agents.served[victim].host_id.clone();
        eprintln!("phase: {host_id} stops heartbeating");
        let last_answered = *lock(&agents.last_ok[victim]);
        agents.stop(victim);
        let stopped = Instant::now();
        let stopped_wall = chrono::Utc::now();
        let deadline = Duration::from_millis(cfg.down_after_ms) + Duration::from_secs(60);
        let (down_at, calls, mean_call) = wait_host_state(&mut lop, token, &host_id, "down", deadline).await?;
        // The leader's own record of the decision, free of the polling delay.
        let (leader_id, _) = leader_log(nodes, token).await?;
        let logged = nodes
            .iter()
            .find(|n| n.id == leader_id)
            .and_then(|n| marked_down_at(&n.dir.with_extension("log"), &host_id, stopped_wall));
        agents.spawn(victim, Duration::ZERO, true);
        let resumed = Instant::now();
        let (back_at, _, _) = wait_host_state(&mut lop, token, &host_id, "active", Duration::from_secs(60)).await?;
        out.push(format!(
            "dead host: {host_id} stopped heartbeating; the leader logged \"marking down\" {} after the stop; \
             ListHosts listed it down {} ms after the stop ({} after its last answered heartbeat; threshold \
             --host-down-after-ms {}); ListHosts polled {calls} times, one call at a time, at most every 50 ms (mean \
             call {mean_call:.0} ms, so that figure is late by up to that); listed active again {} ms after its \
             heartbeats resumed",
            logged
                .map(|d| format!("{} ms", d.num_milliseconds()))
                .unwrap_or_else(|| "(not found in the leader's log)".into()),
            ms(down_at - stopped),
            last_answered.map(|l| format!("{} ms", ms(down_at - l))).unwrap_or_else(|| "n/a".into()),
            cfg.down_after_ms,
            ms(back_at - resumed),
        ));

        // 5. Snapshot size and install on a new node.
        let ls = raft_status(&mut lop, token).await?;
        out.push(format!(
            "Raft log on the leader (node {}): snapshot at index {}, first log index {}, last log index {}{}",
            ls.node_id,
            ls.snapshot_index,
            ls.first_log_index,
            ls.last_log_index,
            if ls.snapshot_index == 0 {
                "; NO SNAPSHOT has been built (fewer entries than the nodes' --snapshot-logs): the sizes below have \
                 no snapshot.db and the new node replays the log; pass a smaller --snapshot-logs"
            } else if ls.snapshot_index < m1.last_log {
                "; the snapshot predates the last creates"
            } else {
                ""
            }
        ));
        for node in nodes.iter() {
            let [snap, log] = ["snapshot.db", "raft-log.db"].map(|f| file_bytes(&node.dir, f));
            let state = file_bytes(&state_dir(node), "state.db");
            out.push(format!(
                "storage of node {}: snapshot.db {:.1} MiB, state.db {:.1} MiB, raft-log.db {:.1} MiB ({snap} / {state} / \
                 {log} bytes, -wal and -shm files included)",
                node.id,
                mib(snap),
                mib(state),
                mib(log),
            ));
        }
        eprintln!("phase: a 4th node joins and catches up");
        let li = leader_index(&rest, nodes).await?;
        let mut lop = op(&nodes[li].grpc)?;
        let join = lop
            .create_join_token(op_req(token, CreateJoinTokenRequest { role: "controlplane".into(), ttl_seconds: 600 }))
            .await
            .context("creating a join token")?
            .into_inner();
        let mut n4 = Node::new(root, 4, token_file, extra);
        n4.args.extend(["--join-url".to_string(), nodes[li].api.clone(), "--join-token".to_string(), join.token]);
        n4.start()?;
        let probe = Rest { http: tls::https_client(Duration::from_millis(500)) };
        wait_healthz(&probe, &n4.url("/healthz"), Duration::from_secs(60)).await.context("the 4th node starting")?;
        let (_, target) = leader_log(nodes, token).await?;
        let t0 = Instant::now();
        let add = AddNodeRequest { id: 4, grpc_addr: n4.grpc.clone(), api_addr: n4.api.clone() };
        let leader_grpc = nodes[li].grpc.clone();
        wait_for("node 4 to be added", Duration::from_secs(120), || {
            let (addr, add, token) = (leader_grpc.clone(), add.clone(), token.to_string());
            async move {
                let mut r = op_req(&token, add);
                r.set_timeout(Duration::from_secs(120));
                Ok(Some(op(&addr)?.add_node(r).await?.into_inner()))
            }
        })
        .await?;
        let added = t0.elapsed();
        let (caught_at, s4) = wait_applied(&n4.grpc, token, target, cfg.deadline).await?;
        let log4 = std::fs::read_to_string(n4.dir.with_extension("log")).unwrap_or_default();
        let installs: Vec<String> = log4
            .lines()
            .filter(|l| l.contains("installed snapshot from leader"))
            .filter_map(|l| l.split("bytes=").nth(1).and_then(|b| b.split_whitespace().next()).map(str::to_string))
            .collect();
        out.push(format!(
            "snapshot install: a 4th node (join token, AddNode) reached the leader's last log index {target} {} ms \
             after AddNode was called (AddNode, which waits for the learner to catch up, returned after {} ms); \
             snapshots installed: {}{}; its state.db {:.1} MiB",
            ms(caught_at - t0),
            ms(added),
            s4.snapshots_installed,
            if installs.is_empty() {
                " (it caught up by replaying the log)".to_string()
            } else {
                format!(" (bytes per its log: {})", installs.join(", "))
            },
            mib(file_bytes(&n4.dir, "state.db")),
        ));
        let mut r = op_req(token, RemoveNodeRequest { id: 4 });
        r.set_timeout(Duration::from_secs(60));
        if let Err(e) = lop.remove_node(r).await {
            out.push(format!("removing the 4th node failed: {}", e.message()));
        }
        n4.kill();
        wait_leader(&rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await?;

        // 6. Restart of a follower.
        let li = leader_index(&rest, nodes).await?;
        let fi = (li + 1) % nodes.len();
        eprintln!("phase: restart of follower node {}", nodes[fi].id);
        nodes[fi].kill();
        let t0 = Instant::now();
        nodes[fi].start()?;
        let (_, target) = leader_log(nodes, token).await?;
        let healthy = wait_healthz(&probe, &nodes[fi].url("/healthz"), Duration::from_secs(120)).await?;
        let (caught, sf) = wait_applied(&nodes[fi].grpc, token, target, Duration::from_secs(300)).await?;
        out.push(format!(
            "restart: follower node {} SIGKILLed and started again: /healthz answered after {} ms; applied the \
             leader's last log index {target} after {} ms (snapshots installed since start: {})",
            nodes[fi].id,
            ms(healthy - t0),
            ms(caught - t0),
            sf.snapshots_installed
        ));
        wait_leader(&rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await?;
        let end = mark(nodes, token).await?;
        out.push(window("whole fleet phase after registration", &m0, &end, &agents.log));
        Ok(())
    }
}
