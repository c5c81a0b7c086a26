//! High availability on loopback with real agents and PostgreSQL: an `ha` database gets a
//! primary and two synchronous standbys on three hosts; the primary's postmaster is SIGKILLed
//! under a concurrent writer; a standby is promoted at a new epoch; every acknowledged row is on
//! the new primary; the old primary rejoins as a standby.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use steward_proto::v1::{ClusterInfo, ListClustersRequest};
use steward_tests::sim::{op_req, operator};
use steward_tests::{admin_token, bin, free_port, wait_for, wait_leader, Node, Proc, Rest, Scratch};

async fn cluster(node: &Node, admin: &str) -> Result<ClusterInfo> {
    let r = operator(&node.grpc)?.list_clusters(op_req(admin, ListClustersRequest {})).await?.into_inner();
    r.clusters.into_iter().find(|c| c.availability == "ha").context("no ha cluster")
}

/// Acknowledged writes and the times around the outage.
#[derive(Default)]
struct Log {
    acked: BTreeSet<i64>,
    /// (time of ack, id) of every acknowledged insert.
    times: Vec<(Instant, i64)>,
}

async fn writer(uri: String, log: Arc<Mutex<Log>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut next = 1i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Ok(Ok((client, task))) =
            tokio::time::timeout(Duration::from_secs(3), steward_tests::pg_connect_task(&uri)).await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = next;
            next += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.execute("INSERT INTO acks (id) VALUES ($1)", &[&id]),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    l.acked.insert(id);
                    l.times.push((Instant::now(), id));
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_postmaster_kill_fails_over_without_losing_acknowledged_writes() -> Result<()> {
    let scratch = Scratch::new("steward-ha-")?;
    let root = scratch.path();
    let (token_file, admin) = admin_token(root)?;
    let mut node = Node::new(root, 1, &token_file, &[]);
    let m = node.member();
    node.args.extend(["--initial-member".to_string(), m]);
    node.start()?;
    let rest = Rest::default();
    wait_leader(&rest, &[&node], Duration::from_secs(30)).await?;

    let mut agents = Vec::new();
    for (i, zone) in ["a", "b", "c"].iter().enumerate() {
        let listen = format!("127.0.0.1:{}", free_port());
        let data_path = root.join(format!("host-{zone}"));
        steward_tests::tls::issue(
            steward_proto::tls::Role::Agent,
            &format!("host-{zone}"),
            &[],
            &data_path.join("tls"),
        )?;
        let args: Vec<String> = [
            "run",
            "--control-plane",
            &node.grpc,
            "--listen",
            &listen,
            "--data-path",
            &root.join(format!("host-{zone}")).display().to_string(),
            "--host-id",
            &format!("host-{zone}"),
            "--pg-listen",
            "127.0.0.1",
            "--pg-port",
            &free_port().to_string(),
            "--memory-budget-mb",
            "256",
            "--zone",
            zone,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        agents.push(Proc::spawn(
            &format!("agent-{i}"),
            &bin("steward-agent"),
            &args,
            &root.join(format!("agent-{zone}.log")),
        )?);
    }

    let (s, v) = rest.post(&node.url("/v1/teams"), &admin, &json!({"name": "shop"})).await?;
    ensure!(s == 201, "team: {s} {v}");
    let token = v["token"].as_str().unwrap_or_default().to_string();
    let created = wait_for("three hosts to accept an ha database", Duration::from_secs(30), || async {
        let (s, v) = rest
            .post(
                &node.url("/v1/databases"),
                &token,
                &json!({"name": "orders", "purpose": "ha test", "availability": "ha"}),
            )
            .await?;
        match s {
            202 => Ok(Some(v)),
            503 => Ok(None),
            _ => anyhow::bail!("create: {s} {v}"),
        }
    })
    .await?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    let t = Instant::now();
    let db = wait_for("the ha database to become active", Duration::from_secs(240), || async {
        let (s, v) = rest.get(&node.url(&format!("/v1/databases/{id}")), &token).await?;
        ensure!(s == 200 && v["state"] != "failed", "get: {s} {v}");
        Ok((v["state"] == "active").then_some(v))
    })
    .await?;
    println!("ha database active {:?} after POST", t.elapsed());
    let uri = db["connection"]["uri"].as_str().context("uri")?.to_string();
    ensure!(db["connection"]["hosts"].as_array().map(Vec::len) == Some(3), "uri lists three members: {uri}");
    ensure!(db["connection"]["read_only_uri"].is_string(), "read-only uri missing");

    let before = cluster(&node, &admin).await?;
    ensure!(before.epoch == 1 && before.members.len() == 3, "cluster: {before:?}");
    let old_primary = before.primary_host.clone();
    wait_for("both standbys streaming", Duration::from_secs(60), || async {
        let c = cluster(&node, &admin).await?;
        Ok((c.members.iter().filter(|m| m.role == "standby" && m.running && m.in_recovery).count() == 2).then_some(()))
    })
    .await?;

    let (client, conn_task) = steward_tests::pg_connect_task(&uri).await?;
    client.batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY, at timestamptz DEFAULT now())").await?;
    drop(client);
    conn_task.abort();

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = tokio::spawn(writer(uri.clone(), log.clone(), stop.clone()));
    wait_for("writes before the failure", Duration::from_secs(30), || async {
        Ok((log.lock().map(|l| l.acked.len()).unwrap_or(0) >= 50).then_some(()))
    })
    .await?;

    // SIGKILL the primary's postmaster.
    let pidfile = root.join(&old_primary).join("clusters").join(&before.id).join("pgdata").join("postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)?.lines().next().unwrap_or("").trim().parse()?;
    let killed_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let acked_at_kill = log.lock().map(|l| l.acked.len()).unwrap_or(0);

    let after = wait_for("a standby promoted at epoch 2", Duration::from_secs(30), || async {
        let c = cluster(&node, &admin).await?;
        Ok((c.epoch == 2 && c.primary_host != old_primary).then_some(c))
    })
    .await?;
    println!("failover recorded {:?} after the kill: {} -> {}", killed_at.elapsed(), old_primary, after.primary_host);
    wait_for("writes after the failover", Duration::from_secs(30), || async {
        Ok((log.lock().map(|l| l.acked.len()).unwrap_or(0) >= acked_at_kill + 50).then_some(()))
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), w).await;

    let (acked, gap) = {
        let l = log.lock().unwrap_or_else(|e| e.into_inner());
        // The longest pause between two acknowledged writes from just before the kill on (orphaned
        // backends of a SIGKILLed postmaster may still commit for a moment).
        let mut times: Vec<Instant> =
            l.times.iter().map(|(t, _)| *t).filter(|t| *t + Duration::from_millis(500) > killed_at).collect();
        times.sort();
        let gap = times.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default();
        (l.acked.clone(), gap)
    };
    println!("write gap across the failover: {gap:?} ({} acknowledged writes)", acked.len());

    let (client, conn_task) = steward_tests::pg_connect_task(&uri).await?;
    let rows = client.query("SELECT id FROM acks", &[]).await?;
    let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i64> = acked.difference(&present).collect();
    ensure!(lost.is_empty(), "{} acknowledged writes lost: {:?}", lost.len(), lost.iter().take(10).collect::<Vec<_>>());
    drop(client);
    conn_task.abort();

    // The old primary comes back as a standby of the new timeline.
    let rejoined = wait_for("the old primary to rejoin as standby", Duration::from_secs(120), || async {
        let c = cluster(&node, &admin).await?;
        Ok(c.members
            .iter()
            .find(|m| m.host_id == old_primary && m.role == "standby" && m.running && m.in_recovery)
            .cloned())
    })
    .await?;
    ensure!(rejoined.timeline >= 2, "rejoined member on timeline {}", rejoined.timeline);
    drop(agents);
    Ok(())
}
