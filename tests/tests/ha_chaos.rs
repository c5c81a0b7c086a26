//! Chaos suite for HA clusters: database hosts are network namespaces running real agents and
//! PostgreSQL. Each scenario runs a writer through the multi-host URI and a writer pinned to the
//! primary, breaks something, and checks after recovery that every acknowledged write is on the
//! current primary and that no two members accepted writes at the same time.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use steward_tests::fleet::{longest_pause, verify, Fleet, Writer};
use steward_tests::wait_for;

/// One scenario at a time: each runs three PostgreSQL instances and control-plane nodes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    fleet: Fleet,
    uri: String,
    primary: usize,
    writer: Writer,
    pinned: Writer,
}

async fn setup(cp: usize) -> Result<Setup> {
    let fleet = Fleet::start(cp, 3).await?;
    let uri = fleet.ha_database().await?;
    let c = fleet.cluster().await?;
    ensure!(c.epoch == 1, "fresh cluster at epoch {}", c.epoch);
    let primary = fleet.index_of(&c.primary_host).context("primary host")?;
    let writer = Writer::start(uri.clone(), 1);
    let pinned = Writer::start(Fleet::pinned_uri(&uri, &fleet.hosts[primary]), 1_000_000_000);
    writer.wait_more(30, Duration::from_secs(30)).await?;
    pinned.wait_more(30, Duration::from_secs(30)).await?;
    Ok(Setup { fleet, uri, primary, writer, pinned })
}

/// Waits for a failover away from `old` and for writes to flow again; returns the time from
/// `broken_at` to the recorded failover.
async fn await_failover(s: &Setup, old: &str, broken_at: Instant) -> Result<Duration> {
    wait_for("a failover to another member", Duration::from_secs(30), || async {
        let c = s.fleet.cluster().await?;
        Ok((c.epoch >= 2 && c.primary_host != old).then_some(()))
    })
    .await?;
    let took = broken_at.elapsed();
    s.writer.wait_more(30, Duration::from_secs(30)).await?;
    Ok(took)
}

async fn finish(s: Setup, old: &str, broken_at: Instant) -> Result<()> {
    let last_seen = std::sync::Mutex::new(String::new());
    wait_for("the old primary to rejoin as a standby", Duration::from_secs(120), || async {
        let c = s.fleet.cluster().await?;
        if let Ok(mut l) = last_seen.lock() {
            *l = format!("{:?}", c.members);
        }
        Ok(c.members
            .iter()
            .any(|m| m.host_id == old && m.role == "standby" && m.running && m.in_recovery)
            .then_some(()))
    })
    .await
    .map_err(|e| {
        e.context(format!("members as last seen: {}", last_seen.lock().map(|l| l.clone()).unwrap_or_default()))
    })?;
    let mut acks = s.writer.finish().await;
    println!("longest write pause after the fault: {:?}", longest_pause(&acks, broken_at));
    acks.extend(s.pinned.finish().await);
    verify(&s.uri, &acks).await?;
    s.fleet.check_archiving(&s.uri).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_host_frozen() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    let at = Instant::now();
    s.fleet.hosts[s.primary].freeze()?;
    let took = await_failover(&s, &old, at).await?;
    println!("frozen primary: failover recorded after {took:?}");
    s.fleet.hosts[s.primary].thaw()?;
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_host_partitioned() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    let at = Instant::now();
    s.fleet.hosts[s.primary].partition()?;
    let took = await_failover(&s, &old, at).await?;
    println!("partitioned primary: failover recorded after {took:?}");
    s.fleet.hosts[s.primary].heal()?;
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_partitioned_outbound_only() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    let at = Instant::now();
    // The primary's host receives but cannot send: no heartbeat reaches the control plane.
    s.fleet.hosts[s.primary].partition_outbound()?;
    let took = await_failover(&s, &old, at).await?;
    println!("outbound-partitioned primary: failover recorded after {took:?}");
    s.fleet.hosts[s.primary].heal_outbound()?;
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_partitioned_inbound_only() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    let at = Instant::now();
    // The primary's host sends but receives nothing: heartbeats arrive, lease grants do not.
    s.fleet.hosts[s.primary].partition_inbound()?;
    let took = await_failover(&s, &old, at).await?;
    println!("inbound-partitioned primary: failover recorded after {took:?}");
    s.fleet.hosts[s.primary].heal_inbound()?;
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_leader_killed_during_failover() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut s = setup(3).await?;
    let old = s.fleet.host_id(s.primary);
    let c = s.fleet.cluster().await?;
    let leader =
        steward_tests::wait_leader(&s.fleet.rest, &s.fleet.nodes.iter().collect::<Vec<_>>(), Duration::from_secs(10))
            .await?;
    let pidfile = s.fleet.scratch.path().join(&old).join("clusters").join(&c.id).join("pgdata").join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.lines().next().unwrap_or("").trim().parse()?;
    let at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    // Kill the control-plane leader while it reacts to the failure.
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Some(n) = s.fleet.nodes.iter_mut().find(|n| n.id == leader) {
        n.kill();
    }
    let took = await_failover(&s, &old, at).await?;
    println!("failover with the control-plane leader killed: recorded after {took:?}");
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_down_primary_keeps_serving() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut s = setup(1).await?;
    let before = s.writer.count();
    let at = Instant::now();
    for n in s.fleet.nodes.iter_mut() {
        n.kill();
    }
    // Three lease periods without any control plane: the standbys' acknowledgements keep the
    // primary's lease alive.
    tokio::time::sleep(Duration::from_millis(3 * 2500)).await;
    let during = s.writer.count() - before;
    let pause = longest_pause(&s.writer.acks.lock().map(|a| a.clone()).unwrap_or_default(), at);
    ensure!(during > 100, "only {during} writes acknowledged while the control plane was down");
    ensure!(pause < Duration::from_secs(1), "writes paused {pause:?} while the control plane was down");
    println!("control plane down: {during} writes in 7.5 s, longest pause {pause:?}");
    s.fleet.nodes[0].start()?;
    let c = wait_for("the control plane back", Duration::from_secs(30), || async { Ok(s.fleet.cluster().await.ok()) })
        .await?;
    ensure!(c.epoch == 1 && c.primary_host == s.fleet.host_id(s.primary), "primary changed: {c:?}");
    s.writer.wait_more(30, Duration::from_secs(30)).await?;
    let mut acks = s.writer.finish().await;
    acks.extend(s.pinned.finish().await);
    verify(&s.uri, &acks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    let c = s.fleet.cluster().await?;
    let token_file = s.fleet.scratch.path().join("admin.token");
    let at = Instant::now();
    let out = std::process::Command::new(steward_tests::bin("stewardctl"))
        .args(["--server", &s.fleet.nodes[0].grpc, "--token-file", &token_file.display().to_string(), "-o", "json"])
        .args(["cluster", "switchover", &c.id])
        .output()?;
    ensure!(out.status.success(), "switchover failed: {}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(reply["old_primary"] == old.as_str() && reply["new_primary"] != old.as_str(), "reply: {reply}");
    ensure!(reply["epoch"] == 2, "reply: {reply}");
    s.writer.wait_more(30, Duration::from_secs(30)).await?;
    println!("switchover: control plane measured a write pause of {} ms", reply["write_pause_ms"]);
    let after = s.fleet.cluster().await?;
    ensure!(after.primary_host != old && after.epoch == 2, "cluster after switchover: {after:?}");
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_disk_full() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // Placement puts the primary on host-1 (equal fill, lowest id): host-3 is a standby on a
    // small filesystem.
    // (Placement wants 1 GiB free on a host, so the filesystem is a little larger than that.)
    let fleet = Fleet::start_with(1, 3, &[(2, 1100)]).await?;
    let uri = fleet.ha_database().await?;
    let c = fleet.cluster().await?;
    ensure!(c.primary_host == "host-1", "expected the primary on host-1: {c:?}");
    let writer = Writer::start(uri.clone(), 1);
    writer.wait_more(30, Duration::from_secs(30)).await?;
    // Fill host-3's disk.
    let fill = fleet.scratch.path().join("host-3").join("fill");
    // dd stops with ENOSPC once the filesystem is full (its exit status says so: expected).
    let _ = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", fill.display()))
        .arg("bs=1M")
        .output()?;
    let df = std::process::Command::new("df").arg("--output=avail").arg(fill.parent().unwrap_or(&fill)).output()?;
    println!("host-3 free after filling: {}", String::from_utf8_lossy(&df.stdout).replace('\n', " "));
    let at = Instant::now();
    // Make a lot of WAL flow, so the standby needs new segments it has no room for; the primary
    // keeps acknowledging through host-2.
    let (client, task) = steward_tests::fleet::connect_read_write(&uri).await.context("connect")?;
    client
        .batch_execute(
            "CREATE TABLE filler AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 200000) g",
        )
        .await?;
    task.abort();
    wait_for("the full standby to fall behind", Duration::from_secs(60), || async {
        let c = fleet.cluster().await?;
        Ok(c.members.iter().any(|m| m.host_id == "host-3" && (m.lag_bytes > 16 << 20 || !m.running)).then_some(()))
    })
    .await?;
    writer.wait_more(300, Duration::from_secs(60)).await?;
    let during = fleet.cluster().await?;
    ensure!(during.epoch == 1 && during.primary_host == "host-1", "a full standby disk caused a failover: {during:?}");
    println!(
        "standby disk full: writes continued, longest pause {:?}",
        longest_pause(&writer.acks.lock().map(|a| a.clone()).unwrap_or_default(), at)
    );
    std::fs::remove_file(&fill)?;
    wait_for("the standby to stream again", Duration::from_secs(90), || async {
        let c = fleet.cluster().await?;
        Ok(c.members
            .iter()
            .any(|m| m.host_id == "host-3" && m.running && m.in_recovery && m.lag_bytes < 16 << 20)
            .then_some(()))
    })
    .await?;
    let acks = writer.finish().await;
    verify(&uri, &acks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_postgres_hung() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup(1).await?;
    let old = s.fleet.host_id(s.primary);
    // Stop every PostgreSQL process on the primary's host but not the agent, like a stuck disk:
    // the port still accepts connections, but nothing commits.
    let pg: Vec<i32> = s.fleet.hosts[s.primary]
        .pids()?
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .collect();
    ensure!(!pg.is_empty(), "no postgres processes found on {old}");
    let at = Instant::now();
    for p in &pg {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::Signal::SIGSTOP)?;
    }
    let took = await_failover(&s, &old, at).await?;
    println!("hung primary (write probe failing): failover recorded after {took:?}");
    for p in &pg {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::Signal::SIGCONT);
    }
    finish(s, &old, at).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_state_reaches_the_control_plane_metrics() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start(1, 3).await?;
    fleet.ha_database().await?;
    let c = fleet.cluster().await?;
    // An operator's backup of the primary, through its unix socket.
    let host_dir = fleet.scratch.path().join(&c.primary_host);
    let out = std::process::Command::new(steward_tests::bin("steward-agent"))
        .args(["backup", "--repo", &fleet.scratch.path().join("repo").display().to_string(), "--stanza", &c.id])
        .args(["--pg-data", &host_dir.join("clusters").join(&c.id).join("pgdata").display().to_string()])
        .args(["--socket-dir", &host_dir.join("run").display().to_string(), "--port", "5432", "--output", "json"])
        .output()?;
    ensure!(out.status.success(), "backup failed: {}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(manifest["kind"] == "full" && manifest["files"].as_array().is_some_and(|f| !f.is_empty()), "{manifest}");
    // The primary's agent reports it (its repository report refreshes every 30 s).
    let age = format!("steward_backup_last_success_age_seconds{{cluster=\"{}\",host=\"{}\"}} ", c.id, c.primary_host);
    let size = format!("steward_repository_bytes{{cluster=\"{}\",host=\"{}\"}} ", c.id, c.primary_host);
    wait_for("the backup in the control plane's metrics", Duration::from_secs(75), || async {
        let (_, m) = fleet.rest.send(reqwest::Method::GET, &fleet.nodes[0].url("/metrics"), None, None).await?;
        let text = m.as_str().unwrap_or("").to_string();
        let value =
            |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<i64>().ok());
        Ok(match (value(&age), value(&size)) {
            (Some(a), Some(b)) if a >= 0 && b > 0 => Some(()),
            _ => None,
        })
    })
    .await
}
