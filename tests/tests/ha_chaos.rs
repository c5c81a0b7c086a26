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
        .arg("--tls-dir")
        .arg(steward_tests::tls::operator_dir())
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

/// Backups run by the control plane: the schedule takes a full backup of the new cluster, an
/// operator asks for an incremental one, which comes from a standby; the chain restores into a
/// new server that holds the rows written before it; the backup age and the repository size
/// reach the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_come_from_a_standby_and_restore() -> Result<()> {
    use steward_proto::v1::{BackupInfo, ListBackupsRequest, StartBackupRequest};
    use steward_tests::sim::{op_req, operator};

    let _serial = SERIAL.lock().await;
    let fleet = Fleet::start_with_backups(1, 3).await?;
    let uri = fleet.ha_database().await?;
    let c = fleet.cluster().await?;
    let node = fleet.nodes[0].grpc.clone();
    let backup = |op: Option<String>| {
        let (node, admin, cluster) = (node.clone(), fleet.admin.clone(), c.id.clone());
        async move {
            let r = operator(&node)?
                .list_backups(op_req(&admin, ListBackupsRequest { cluster_id: cluster, limit: 10 }))
                .await?
                .into_inner();
            let b: Option<BackupInfo> =
                r.backups.into_iter().find(|b| op.as_ref().is_none_or(|id| &b.operation_id == id));
            match b {
                Some(b) if b.state == "failed" => anyhow::bail!("backup failed: {b:?}"),
                Some(b) if b.state == "succeeded" => Ok(Some(b)),
                _ => Ok(None),
            }
        }
    };

    // The schedule backs up a cluster that serves a database right away (none exists yet).
    let full = wait_for("the scheduled full backup", Duration::from_secs(180), || backup(None)).await?;
    ensure!(full.kind_taken == "full" && full.requested_by == "schedule" && full.size_bytes > 0, "{full:?}");

    let (client, task) = steward_tests::pg_connect_task(&uri).await?;
    client.batch_execute("INSERT INTO acks (id, server) SELECT g, 'before-incr' FROM generate_series(1, 50) g").await?;

    // An operator's incremental backup, taken from a standby while the primary serves.
    let op = operator(&node)?
        .start_backup(op_req(&fleet.admin, StartBackupRequest { cluster_id: c.id.clone(), kind: "incr".into() }))
        .await?
        .into_inner();
    ensure!(op.kind == "backup" && op.state == "running", "{op:?}");
    let incr =
        wait_for("the operator's incremental backup", Duration::from_secs(180), || backup(Some(op.id.clone()))).await?;
    ensure!(incr.kind_taken == "incr" && incr.label.starts_with(&full.label), "{incr:?} after {full:?}");
    ensure!(incr.from_standby && incr.host_id != c.primary_host, "not from a standby: {incr:?}");
    ensure!(incr.stored_bytes < full.stored_bytes, "incremental stored more than the full one: {incr:?}");
    // Operators see both backups with stewardctl, newest first.
    let out = std::process::Command::new(steward_tests::bin("stewardctl"))
        .arg("--tls-dir")
        .arg(steward_tests::tls::operator_dir())
        .args(["--server", &node, "--token", &fleet.admin, "backups", "--cluster", &c.id, "--output", "json"])
        .output()?;
    ensure!(out.status.success(), "stewardctl backups: {}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let labels: Vec<&str> =
        listed.as_array().map(|a| a.iter().filter_map(|b| b["label"].as_str()).collect()).unwrap_or_default();
    ensure!(labels == vec![incr.label.as_str(), full.label.as_str()], "stewardctl backups: {listed}");

    // A point a second before one more commit, for the point-in-time copy below.
    client.batch_execute("INSERT INTO acks (id, server) VALUES (2000, 'kept')").await?;
    let target: String = client
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[])
        .await?
        .get(0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.batch_execute("INSERT INTO acks (id, server) VALUES (3000, 'after-target')").await?;
    drop(client);
    task.abort();

    // Restore the chain as of the incremental backup's end into a new server: a standby's
    // backup (pg_control copied last) must reach consistency and hold the rows.
    let (restored, port) = restore_and_start(&fleet, &c.id, &incr.stop_lsn).await?;
    let db: String = restored
        .query_one("SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', 'template1')", &[])
        .await?
        .get(0);
    drop(restored);
    let sock = fleet.scratch.path().join("restored").join("sock");
    let conninfo = format!("host={} port={port} user=postgres dbname={db}", sock.display());
    let (rc, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let before: i64 = rc.query_one("SELECT count(*) FROM acks WHERE server = 'before-incr'", &[]).await?.get(0);
    ensure!(before == 50, "the restored server has {before} of the 50 rows written before the backup");
    task.abort();

    // A product team copies its database to the point in time through REST: a new database of
    // the same team holding exactly what was committed before the target.
    let api = fleet.nodes[0].url("/v1/databases");
    let (s, list) = fleet.rest.get(&api, &fleet.token).await?;
    ensure!(s == 200, "list: {s} {list}");
    let source_id = list["databases"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "orders"))
        .and_then(|d| d["id"].as_str())
        .context("the orders database")?
        .to_string();
    let body = serde_json::json!({"target_time": target, "name": "orders_before"});
    let (s, copy) = fleet.rest.post(&format!("{api}/{source_id}/restore"), &fleet.token, &body).await?;
    ensure!(s == 202 && copy["restored_from"]["database_id"] == source_id.as_str(), "restore: {s} {copy}");
    let copy_id = copy["id"].as_str().context("copy id")?.to_string();
    let copy = wait_for("the point-in-time copy to become active", Duration::from_secs(300), || async {
        let (s, v) = fleet.rest.get(&format!("{api}/{copy_id}"), &fleet.token).await?;
        ensure!(s == 200 && v["state"] != "failed", "get copy: {s} {v}");
        Ok((v["state"] == "active").then_some(v))
    })
    .await?;
    ensure!(copy["owner"] == "shop" && copy["name"] == "orders_before", "{copy}");
    let copy_uri = copy["connection"]["uri"].as_str().context("copy uri")?;
    let (cc, task) = steward_tests::pg_connect_task(copy_uri).await?;
    let rows: Vec<(i64, String)> = cc
        .query("SELECT id, server FROM acks WHERE id >= 1000 ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    ensure!(rows == vec![(2000, "kept".to_string())], "the copy at {target} holds {rows:?}");
    let n: i64 = cc.query_one("SELECT count(*) FROM acks WHERE server = 'before-incr'", &[]).await?.get(0);
    ensure!(n == 50, "the copy has {n} of the 50 earlier rows");
    // The copy belongs to the team's role: it can write.
    cc.batch_execute("INSERT INTO acks (id, server) VALUES (4000, 'copy')").await?;
    task.abort();

    // The primary's agent reports the newest backup and the stanza's size (every 30 s).
    let age = format!("steward_backup_last_success_age_seconds{{cluster=\"{}\",host=\"{}\"}} ", c.id, c.primary_host);
    let size = format!("steward_repository_bytes{{cluster=\"{}\",host=\"{}\"}} ", c.id, c.primary_host);
    wait_for("the backup in the control plane's metrics", Duration::from_secs(75), || async {
        let (_, m) = fleet.rest.send(reqwest::Method::GET, &fleet.nodes[0].url("/metrics"), None, None).await?;
        let text = m.as_str().unwrap_or("").to_string();
        let value =
            |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<i64>().ok());
        let succeeded = text.lines().find_map(|l| l.strip_prefix("steward_backups{state=\"succeeded\"} "));
        Ok(match (value(&age), value(&size), succeeded) {
            (Some(a), Some(b), Some("2")) if a >= 0 && b > 0 => Some(()),
            _ => None,
        })
    })
    .await
}

/// Restores `stanza` from the fleet's repository up to `stop_lsn` into `<scratch>/restored`,
/// starts it on loopback (no archiving) and waits until recovery ended; returns a superuser
/// connection and the port. The fleet's scratch directory stops it when the test ends.
async fn restore_and_start(fleet: &Fleet, stanza: &str, stop_lsn: &str) -> Result<(tokio_postgres::Client, u16)> {
    use steward_agent::backup::{self, RecoveryTarget, RestoreOptions};
    use steward_agent::pg::{Instance, InstanceSpec, PgBinaries, RunAs};

    let dir = fleet.scratch.path().join("restored");
    let repo = backup::Repository::open(&fleet.scratch.path().join("repo").display().to_string())?;
    let run_as = RunAs::detect()?;
    let opts = RestoreOptions {
        label: None,
        target: RecoveryTarget::Lsn(stop_lsn.to_string()),
        agent_exe: fleet.scratch.path().join("steward-agent"),
        parallel: 2,
        delta: false,
    };
    backup::restore(&repo, stanza, &dir.join("data"), &run_as, &opts).await?;
    let port = steward_tests::free_port();
    let spec = InstanceSpec {
        cluster_id: "restored".into(),
        data_dir: dir.join("data"),
        socket_dir: dir.join("sock"),
        port,
        listen_addresses: "127.0.0.1".into(),
        memory_budget_bytes: 256 << 20,
        cores: 1,
        archive: None,
    };
    let inst = Instance::new(spec, PgBinaries::discover(None)?, run_as);
    inst.write_config().await?;
    inst.start().await?;
    let client = inst.superuser_client().await?;
    wait_for("the restored server to finish recovery", Duration::from_secs(120), || async {
        let r: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await?.get(0);
        Ok((!r).then_some(()))
    })
    .await?;
    Ok((client, port))
}
