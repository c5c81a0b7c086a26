//! `failover-bench`: how long writes stop when an HA primary fails.
//!
//! For each fault kind, each run starts a fresh fleet (one control-plane node, three database
//! hosts in network namespaces, see [`steward_tests::fleet`]), creates an `ha` database, writes
//! through its multi-host URI, breaks the primary and measures:
//!
//! - **write outage**: from the last write acknowledged by the old primary to the first write
//!   acknowledged by any other member, as the client saw them;
//! - **failover recorded**: from the fault to the moment the operator API reports the cluster at
//!   a new epoch with another primary;
//! - **direct outage**: from the last write acknowledged by the old primary to the first write
//!   on a connection held open to another member ([`Probe`]), i.e. when the new primary first
//!   took a write, whatever the client's timeouts.
//!
//! Each run then repairs the fault (thaw / heal), waits for the old primary to rejoin as a
//! standby, and checks with [`verify`] that no acknowledged write was lost and that no two
//! members accepted writes at the same time. A run that fails this check (or any other step)
//! makes the bench exit non-zero.
//!
//! Needs root (network namespaces) and the workspace binaries built into the same target
//! directory (`cargo build --workspace --bins`), or `STEWARD_BIN_DIR`. `--logs-dir` keeps each
//! run's control-plane, agent and PostgreSQL logs. Results: docs/benchmarks.md.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::json;
use steward_proto::v1::ClusterInfo;
use steward_tests::fleet::{longest_pause, verify, Ack, Fleet, Writer};
use steward_tests::netns::Host;

/// Writes acknowledged before the fault, and after the failover before the fault is repaired.
const WRITES_AROUND_FAULT: usize = 50;
/// How often the operator API is polled for the failover.
const POLL: Duration = Duration::from_millis(20);
/// Deadline for one operator-API call while polling.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for the writes before the fault.
const WRITES_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline from the fault to the failover recorded in the control plane.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline from the fault to writes acknowledged by another member.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for the old primary to come back as a streaming standby after the repair.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Parser, Debug)]
#[command(name = "failover-bench", about = "Measures the write outage of HA failovers on a local fleet (needs root)")]
struct Args {
    /// Runs per fault kind, each on a fresh fleet.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Fault kinds to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sigkill,freeze,partition")]
    kinds: Vec<Kind>,
    /// Result format on stdout (progress always goes to stderr).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// How long the URI writer waits for one INSERT before it gives up on the connection and
    /// reconnects through the URI, in milliseconds. With a frozen or cut-off primary the
    /// in-flight INSERT never returns, so this (plus the URI's `connect_timeout=2` spent on the
    /// old primary, listed first) bounds how soon the client can reach the new primary.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    statement_timeout_ms: u64,
    /// Deadline for one whole run (fleet start to clean-up), in seconds.
    #[arg(long, default_value_t = 600)]
    run_timeout_secs: u64,
    /// Copy every run's logs (control plane, agents, PostgreSQL) to `<DIR>/<kind>-<run>/`
    /// before its fleet is removed.
    #[arg(long, value_name = "DIR")]
    logs_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// SIGKILL the primary's postmaster.
    Sigkill,
    /// SIGSTOP every process on the primary's host; SIGCONT after the failover.
    Freeze,
    /// Cut the primary's host off the network in both directions; heal after the failover.
    Partition,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Sigkill => "sigkill",
            Kind::Freeze => "freeze",
            Kind::Partition => "partition",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
    Table,
}

/// One successful run.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    kind: Kind,
    run: u32,
    /// Last ack by the old primary → first ack by another member.
    outage_ms: u64,
    /// Fault → failover recorded in the control plane.
    failover_recorded_ms: u64,
    /// Fault → first ack by another member.
    fault_to_first_write_ms: u64,
    /// Last ack by the old primary (any writer) → first ack by a probe connected directly to
    /// another member: the outage a client sees that needs no reconnect and no timeout.
    direct_outage_ms: u64,
    /// Fault → first ack by a direct probe (the new primary accepts writes).
    fault_to_direct_write_ms: u64,
    /// Repair (thaw / heal; the fault itself for sigkill) → old primary streaming as a standby.
    rejoin_ms: u64,
    old_primary: String,
    new_primary: String,
    /// Longest pause between consecutive acks (any member) from the fault to the end of the run.
    longest_pause_ms: u64,
    /// Acknowledged writes checked by `verify` (both writers).
    verified_writes: usize,
}

/// Why a run failed; verification failures are reported apart from everything else.
enum RunError {
    Verification(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Other(e)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Polls `f` every [`POLL`] until it returns `Some`, for at most `timeout`; the error names
/// `what` and the last error `f` returned.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = String::from("none");
    loop {
        match tokio::time::timeout(CALL_TIMEOUT, f()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last_err = format!("{e:#}"),
            Err(_) => last_err = format!("no answer within {CALL_TIMEOUT:?}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err})");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A fault in place; dropping it repairs what can be repaired (thaw / heal), so an error
/// between fault and repair never leaves a host frozen or cut off for longer than the run.
struct Fault<'a> {
    kind: Kind,
    host: &'a Host,
    active: bool,
}

impl<'a> Fault<'a> {
    /// Breaks the primary (`host`, whose postmaster is `pid`); returns the fault and when it
    /// started (taken just before acting, as the chaos tests do).
    fn inject(kind: Kind, host: &'a Host, pid: Option<i32>) -> Result<(Self, Instant)> {
        let at = Instant::now();
        match kind {
            Kind::Sigkill => {
                let pid = pid.context("no postmaster pid")?;
                kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("SIGKILL to postmaster {pid}"))?;
            }
            Kind::Freeze => host.freeze().context("freezing the primary's host")?,
            Kind::Partition => host.partition().context("partitioning the primary's host")?,
        }
        Ok((Self { kind, host, active: true }, at))
    }

    fn repair(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.active, false) {
            return Ok(());
        }
        match self.kind {
            Kind::Sigkill => Ok(()),
            Kind::Freeze => self.host.thaw().context("thawing the old primary's host"),
            Kind::Partition => self.host.heal().context("healing the old primary's host"),
        }
    }
}

impl Drop for Fault<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.repair() {
            eprintln!("failover-bench: repairing the fault during clean-up: {e:#}");
        }
    }
}

/// The postmaster pid of `cluster` on `host_id`, from its `postmaster.pid`.
fn postmaster_pid(scratch: &Path, host_id: &str, cluster: &ClusterInfo) -> Result<i32> {
    let file = scratch.join(host_id).join("clusters").join(&cluster.id).join("pgdata").join("postmaster.pid");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let pid: i32 =
        text.lines().next().unwrap_or("").trim().parse().with_context(|| format!("pid in {}", file.display()))?;
    ensure!(pid > 1, "implausible postmaster pid {pid} in {}", file.display());
    Ok(pid)
}

fn snapshot(w: &Writer) -> Vec<Ack> {
    w.acks.lock().map(|a| a.clone()).unwrap_or_default()
}

/// Number of acks not taken by `old`, and when the first of them was taken.
fn taken_by_others(acks: &[Ack], old: Ipv4Addr) -> (usize, Option<Instant>) {
    let others = acks.iter().filter(|a| a.member != old);
    let n = others.clone().count();
    (n, others.map(|a| a.at).min())
}

/// Writes to one member directly over a connection opened before the fault: polls
/// `pg_is_in_recovery()` every 10 ms (no reconnect, so no authentication per poll) and, once
/// the member has left recovery, inserts like a [`Writer`]. Shows when the new primary first
/// accepts a write, independent of how a client finds it.
struct Probe {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    fn start(uri: String, member: Ipv4Addr, first_id: i64) -> Self {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut next = first_id;
            while !s.load(Ordering::Relaxed) {
                let connect = steward_tests::pg_connect_task(&uri);
                let Ok(Ok((client, conn))) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                while !s.load(Ordering::Relaxed) {
                    let q = client.query_one("SELECT pg_is_in_recovery()", &[]);
                    let Ok(Ok(row)) = tokio::time::timeout(Duration::from_secs(2), q).await else { break };
                    if row.get::<_, bool>(0) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    let id = next;
                    next += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = client.execute("INSERT INTO acks (id, server) VALUES ($1, 'probe')", &params);
                    match tokio::time::timeout(Duration::from_secs(3), insert).await {
                        Ok(Ok(_)) => {
                            a.lock().unwrap_or_else(|e| e.into_inner()).push(Ack { id, at: Instant::now(), member })
                        }
                        // Refused (e.g. read-only again) or stuck: start over on a new connection.
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                conn.abort();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { acks, stop, task }
    }

    async fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Copies every `*.log` file under `from` (control plane, agents, PostgreSQL) to `to`, keeping
/// the relative paths.
fn copy_logs(from: &Path, to: &Path) -> Result<usize> {
    let mut copied = 0;
    let mut stack = vec![from.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "log") {
                let dest = to.join(p.strip_prefix(from).unwrap_or(&p));
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                }
                std::fs::copy(&p, &dest).with_context(|| format!("copying {}", p.display()))?;
                copied += 1;
            }
        }
    }
    Ok(copied)
}

/// One run of `kind` on a fresh fleet. The fleet is dropped (processes killed, namespaces and
/// PostgreSQL removed) when this returns, also on error.
async fn run_once(kind: Kind, run: u32, client: ClientTimeout, logs_dir: Option<&Path>) -> Result<Sample, RunError> {
    let fleet = Fleet::start(1, 3).await.context("starting the fleet")?;
    let result = measure(&fleet, kind, run, client).await;
    if let Some(dir) = logs_dir {
        let to = dir.join(format!("{kind}-{run}"));
        match copy_logs(fleet.scratch.path(), &to) {
            Ok(n) => eprintln!("{kind} run {run}: {n} log files copied to {}", to.display()),
            Err(e) => eprintln!("{kind} run {run}: copying the logs to {}: {e:#}", to.display()),
        }
    }
    result
}

async fn measure(fleet: &Fleet, kind: Kind, run: u32, client: ClientTimeout) -> Result<Sample, RunError> {
    let uri = fleet.ha_database().await.context("creating the ha database")?;
    let c = fleet.cluster().await?;
    if c.epoch != 1 {
        return Err(anyhow::anyhow!("fresh cluster at epoch {}", c.epoch).into());
    }
    let old = c.primary_host.clone();
    let primary = fleet.index_of(&old).with_context(|| format!("primary host {old} is not in the fleet"))?;
    let old_ip = fleet.hosts[primary].ip;
    let writer = Writer::start_with_timeout(uri.clone(), 1, client.0);
    // Only for the check: keeps writing to the old primary itself, so a second writable member
    // after the failover would show up in `verify`.
    let pinned = Writer::start(Fleet::pinned_uri(&uri, &fleet.hosts[primary]), 1_000_000_000);
    let probes: Vec<Probe> = (0..fleet.hosts.len())
        .filter(|i| *i != primary)
        .map(|i| {
            let h = &fleet.hosts[i];
            Probe::start(Fleet::pinned_uri(&uri, h), h.ip, 1_000_000_000 * (2 + i as i64))
        })
        .collect();
    writer.wait_more(WRITES_AROUND_FAULT, WRITES_TIMEOUT).await.context("writes before the fault")?;
    pinned.wait_more(10, WRITES_TIMEOUT).await.context("writes pinned to the primary before the fault")?;
    let pid = match kind {
        Kind::Sigkill => Some(postmaster_pid(fleet.scratch.path(), &old, &c)?),
        _ => None,
    };

    let (mut fault, at) = Fault::inject(kind, &fleet.hosts[primary], pid)?;
    let new = poll("the failover recorded in the control plane", FAILOVER_TIMEOUT, || async {
        let c = fleet.cluster().await?;
        Ok((c.epoch >= 2 && c.primary_host != old).then_some(c.primary_host))
    })
    .await?;
    let recorded = at.elapsed();
    poll("writes through the URI acknowledged by another member", RESUME_TIMEOUT, || async {
        Ok((taken_by_others(&snapshot(&writer), old_ip).0 >= WRITES_AROUND_FAULT).then_some(()))
    })
    .await?;

    fault.repair()?;
    let repaired = match kind {
        Kind::Sigkill => at,
        _ => Instant::now(),
    };
    poll("the old primary back as a streaming standby", REJOIN_TIMEOUT, || async {
        let c = fleet.cluster().await?;
        Ok(c.members
            .iter()
            .any(|m| m.host_id == old && m.role == "standby" && m.running && m.in_recovery)
            .then_some(()))
    })
    .await?;
    let rejoin = repaired.elapsed();
    // Keep writing a little after the rejoin, so a late write on the old primary would show.
    writer.wait_more(20, WRITES_TIMEOUT).await.context("writes after the rejoin")?;

    let acks = writer.finish().await;
    let last_old =
        acks.iter().filter(|a| a.member == old_ip).map(|a| a.at).max().context("no write on the old primary")?;
    let first_new = taken_by_others(&acks, old_ip).1.context("no write on another member")?;
    let pause = longest_pause(&acks, at);
    let mut all = acks;
    all.extend(pinned.finish().await);
    let last_old_any = all.iter().filter(|a| a.member == old_ip).map(|a| a.at).max().unwrap_or(last_old);
    let mut direct = Vec::new();
    for p in probes {
        direct.extend(p.finish().await);
    }
    let first_direct = direct.iter().map(|a| a.at).min().context("no direct write on another member")?;
    all.extend(direct);
    verify(&uri, &all).await.map_err(RunError::Verification)?;
    let outage = first_new.saturating_duration_since(last_old);
    if outage.is_zero() || first_direct <= last_old_any {
        // verify() would have refused an overlap; an outage of zero means bad bookkeeping.
        return Err(anyhow::anyhow!("a write on another member precedes the last one on {old}").into());
    }
    if pause > outage + Duration::from_millis(500) {
        eprintln!("{kind} run {run}: note: longest write pause after the fault {} ms exceeds the outage", ms(pause));
    }
    Ok(Sample {
        kind,
        run,
        outage_ms: ms(outage),
        failover_recorded_ms: ms(recorded),
        fault_to_first_write_ms: ms(first_new.saturating_duration_since(at)),
        direct_outage_ms: ms(first_direct.saturating_duration_since(last_old_any)),
        fault_to_direct_write_ms: ms(first_direct.saturating_duration_since(at)),
        rejoin_ms: ms(rejoin),
        old_primary: old,
        new_primary: new,
        longest_pause_ms: ms(pause),
        verified_writes: all.len(),
    })
}

/// Nearest-rank percentile of sorted `v` (`p` in 0..=100).
fn percentile(sorted: &[u64], p: u32) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    let rank = (u64::from(p) * n as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(n) - 1]
}

#[derive(Debug, Serialize)]
struct Stats {
    n: usize,
    p50: u64,
    p95: u64,
    p99: u64,
    max: u64,
    samples: Vec<u64>,
}

fn stats(samples: Vec<u64>) -> Stats {
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    Stats {
        n: sorted.len(),
        p50: percentile(&sorted, 50),
        p95: percentile(&sorted, 95),
        p99: percentile(&sorted, 99),
        max: sorted.last().copied().unwrap_or(0),
        samples,
    }
}

struct Failure {
    kind: Kind,
    run: u32,
    verification: bool,
    error: String,
}

fn percentile_note(runs: u32) -> String {
    let mut s = String::from("percentiles are nearest-rank over the successful runs");
    if runs < 20 {
        s.push_str(&format!("; with {runs} runs per kind p95 and p99 are the maximum"));
    } else if runs < 100 {
        s.push_str(&format!("; with {runs} runs per kind p99 is the maximum"));
    }
    s
}

fn print_table(args: &Args, samples: &[Sample]) {
    println!("HA failover: {} run(s) per kind, a fresh fleet per run (1 control-plane node, 3 hosts)", args.runs);
    println!("{}", percentile_note(args.runs));
    type Metric = fn(&Sample) -> u64;
    let metrics: [(&str, Metric); 3] = [
        ("write outage through the URI (last ack by the old primary -> first ack by another member)", |s| s.outage_ms),
        ("fault -> failover recorded in the control plane", |s| s.failover_recorded_ms),
        ("direct write outage (last ack by the old primary -> first ack on a connection held to the new one)", |s| {
            s.direct_outage_ms
        }),
    ];
    for (title, metric) in metrics {
        println!();
        println!("{title}");
        println!(
            "{:<10} {:>4} {:>9} {:>9} {:>9} {:>9}  samples (ms, in run order)",
            "kind", "runs", "p50", "p95", "p99", "max"
        );
        for kind in &args.kinds {
            let st = stats(samples.iter().filter(|s| s.kind == *kind).map(metric).collect());
            if st.n == 0 {
                println!("{:<10} {:>4}  (no successful run)", kind.to_string(), 0);
                continue;
            }
            let raw: Vec<String> = st.samples.iter().map(u64::to_string).collect();
            println!(
                "{:<10} {:>4} {:>6} ms {:>6} ms {:>6} ms {:>6} ms  {}",
                kind.to_string(),
                st.n,
                st.p50,
                st.p95,
                st.p99,
                st.max,
                raw.join(", ")
            );
        }
    }
    println!();
    println!("raw samples (ms)");
    println!("  outage    = last ack by the old primary -> first ack by another member, through the URI");
    println!("  recorded  = fault -> failover recorded in the control plane");
    println!("  write     = fault -> first ack by another member through the URI");
    println!("  direct    = last ack by the old primary -> first ack on a connection held to the new primary");
    println!("  d.write   = fault -> first ack on a connection held to the new primary");
    println!("  pause     = longest gap between acks through the URI from the fault on");
    println!("  rejoin    = repair (thaw / heal; the fault for sigkill) -> old primary streaming as a standby");
    println!(
        "{:<10} {:>3} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}  {:<8} -> {:<8} {:>7}",
        "kind", "run", "outage", "recorded", "write", "direct", "d.write", "pause", "rejoin", "old", "new", "writes"
    );
    for s in samples {
        println!(
            "{:<10} {:>3} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}  {:<8} -> {:<8} {:>7}",
            s.kind.to_string(),
            s.run,
            s.outage_ms,
            s.failover_recorded_ms,
            s.fault_to_first_write_ms,
            s.direct_outage_ms,
            s.fault_to_direct_write_ms,
            s.longest_pause_ms,
            s.rejoin_ms,
            s.old_primary,
            s.new_primary,
            s.verified_writes
        );
    }
}

fn print_json(args: &Args, samples: &[Sample], failures: &[Failure]) {
    let mut kinds = serde_json::Map::new();
    for kind in &args.kinds {
        let of = |f: fn(&Sample) -> u64| stats(samples.iter().filter(|s| s.kind == *kind).map(f).collect());
        kinds.insert(
            kind.to_string(),
            json!({
                "outage_ms": of(|s| s.outage_ms),
                "failover_recorded_ms": of(|s| s.failover_recorded_ms),
                "fault_to_first_write_ms": of(|s| s.fault_to_first_write_ms),
                "direct_outage_ms": of(|s| s.direct_outage_ms),
                "fault_to_direct_write_ms": of(|s| s.fault_to_direct_write_ms),
                "longest_pause_ms": of(|s| s.longest_pause_ms),
                "rejoin_ms": of(|s| s.rejoin_ms),
            }),
        );
    }
    let failures: Vec<_> = failures
        .iter()
        .map(|f| json!({"kind": f.kind, "run": f.run, "verification": f.verification, "error": f.error}))
        .collect();
    let out = json!({
        "runs_per_kind": args.runs,
        "percentiles": percentile_note(args.runs),
        "kinds": kinds,
        "samples": samples,
        "failures": failures,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
}

/// The URI writer's client-side timeout for one INSERT.
#[derive(Clone, Copy, Debug)]
struct ClientTimeout(Duration);

/// Outcome of one run on its own runtime.
enum Outcome {
    Done(Result<Sample, RunError>),
    Interrupted,
}

/// Runs one run on a runtime of its own: dropping the runtime afterwards also ends the
/// writers' background tasks when a run fails or times out half-way.
fn run_isolated(
    kind: Kind,
    run: u32,
    timeout: Duration,
    client: ClientTimeout,
    logs_dir: Option<&Path>,
) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
    let outcome = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(timeout, run_once(kind, run, client, logs_dir)) => Outcome::Done(match r {
                Ok(r) => r,
                Err(_) => Err(RunError::Other(anyhow::anyhow!("run did not finish within {timeout:?}"))),
            }),
            _ = tokio::signal::ctrl_c() => Outcome::Interrupted,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(outcome)
}

fn main() -> ExitCode {
    let args = Args::parse();
    for b in ["steward-controlplane", "steward-agent"] {
        let p = steward_tests::bin(b);
        if !p.is_file() {
            eprintln!(
                "failover-bench: {} not found: build the workspace binaries into the same target directory \
                 (cargo build --workspace --bins) or set STEWARD_BIN_DIR",
                p.display()
            );
            return ExitCode::from(2);
        }
    }

    let timeout = Duration::from_secs(args.run_timeout_secs);
    let client = ClientTimeout(Duration::from_millis(args.statement_timeout_ms));
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for kind in &args.kinds {
        for run in 1..=args.runs {
            let started = Instant::now();
            match run_isolated(*kind, run, timeout, client, args.logs_dir.as_deref()) {
                Ok(Outcome::Done(Ok(s))) => {
                    eprintln!(
                        "{kind} run {run}/{}: outage {} ms (failover recorded after {} ms, first write on the new \
                         primary {} ms after the fault; {} -> {}; run took {:.0} s)",
                        args.runs,
                        s.outage_ms,
                        s.failover_recorded_ms,
                        s.fault_to_first_write_ms,
                        s.old_primary,
                        s.new_primary,
                        started.elapsed().as_secs_f64()
                    );
                    samples.push(s);
                }
                Ok(Outcome::Done(Err(e))) => {
                    let (verification, e) = match e {
                        RunError::Verification(e) => (true, e),
                        RunError::Other(e) => (false, e),
                    };
                    let what = if verification { "VERIFICATION FAILED" } else { "FAILED" };
                    eprintln!("{kind} run {run}/{}: {what}: {e:#}", args.runs);
                    failures.push(Failure { kind: *kind, run, verification, error: format!("{e:#}") });
                }
                Ok(Outcome::Interrupted) => {
                    eprintln!("failover-bench: interrupted; the run's fleet was cleaned up");
                    return ExitCode::from(130);
                }
                Err(e) => {
                    eprintln!("failover-bench: cannot start a runtime: {e:#}");
                    return ExitCode::from(2);
                }
            }
        }
    }

    match args.output {
        Output::Table => print_table(&args, &samples),
        Output::Json => print_json(&args, &samples, &failures),
    }
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    let verification = failures.iter().filter(|f| f.verification).count();
    eprintln!(
        "failover-bench: {} of {} runs failed ({verification} verification failure(s): an acknowledged write was \
         lost or two members accepted writes at the same time):",
        failures.len(),
        args.runs as usize * args.kinds.len()
    );
    for f in &failures {
        let what = if f.verification { "verification failed" } else { "failed" };
        eprintln!("  {} run {}: {what}: {}", f.kind, f.run, f.error);
    }
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v = [100, 200, 300, 400, 500];
        assert_eq!(percentile(&v, 50), 300);
        assert_eq!(percentile(&v, 95), 500);
        assert_eq!(percentile(&v, 99), 500);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 95), 95);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn kinds_parse_from_a_comma_list() {
        let a = Args::try_parse_from(["failover-bench", "--kinds", "freeze,sigkill", "--runs", "2"]).unwrap();
        assert_eq!(a.kinds, vec![Kind::Freeze, Kind::Sigkill]);
        assert_eq!(a.runs, 2);
        assert!(Args::try_parse_from(["failover-bench", "--runs", "0"]).is_err());
        assert!(Args::try_parse_from(["failover-bench", "--kinds", "reboot"]).is_err());
    }
}
