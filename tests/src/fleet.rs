//! A test fleet for HA scenarios: control-plane nodes in the root namespace (on the lab
//! bridge), and database hosts in their own network namespaces, each running a real agent that
//! runs real PostgreSQL. Writers record every acknowledged commit, and which member took it, so
//! tests can check that nothing acknowledged was lost and that no two members accepted writes at
//! the same time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use steward_proto::v1::{ClusterInfo, ListClustersRequest};

use crate::netns::{Host, Lab};
use crate::sim::{op_req, operator};
use crate::{admin_token, wait_for, Node, Proc, Rest, Scratch};

/// The fleet; dropping it kills everything and removes the namespaces.
pub struct Fleet {
    pub nodes: Vec<Node>,
    pub hosts: Vec<Host>,
    pub agents: Vec<Option<Proc>>,
    pub admin: String,
    pub rest: Rest,
    pub token: String,
    // Dropped last: the lab kills what runs in the namespaces, the scratch stops PostgreSQL.
    pub lab: Lab,
    pub scratch: Scratch,
    /// Small filesystems mounted as hosts' data paths (for disk-full scenarios).
    pub mounts: Vec<std::path::PathBuf>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.mounts.is_empty() {
            return;
        }
        // Everything that may hold files open on the mounts must be gone before unmounting.
        self.agents.clear();
        if let Err(e) = self.lab.cleanup() {
            eprintln!("lab cleanup: {e:#}");
        }
        crate::stop_postgres_under(self.scratch.path());
        for m in &self.mounts {
            let out = std::process::Command::new("umount").arg(m).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("umount {}: {out:?}", m.display());
            }
        }
    }
}

impl Fleet {
    /// `cp` control-plane nodes and `n` database hosts; creates a team and returns once every
    /// host has registered.
    pub async fn start(cp: usize, n: u8) -> Result<Self> {
        Self::start_with(cp, n, &[]).await
    }

    /// Like [`Fleet::start`], with `(host index, MiB)` tmpfs mounts as those hosts' data paths.
    /// Scheduled backups are off (scenarios that test them use [`Fleet::start_with_backups`]).
    pub async fn start_with(cp: usize, n: u8, small_disks: &[(usize, u32)]) -> Result<Self> {
        Self::launch(cp, n, small_disks, &["--backup-full-every", "off"]).await
    }

    /// Like [`Fleet::start`], with the control plane scheduling a full backup of every cluster
    /// that serves databases every hour (so once, right away) and no incremental ones.
    pub async fn start_with_backups(cp: usize, n: u8) -> Result<Self> {
        Self::launch(cp, n, &[], &["--backup-full-every", "1h", "--backup-incr-every", "off"]).await
    }

    async fn launch(cp: usize, n: u8, small_disks: &[(usize, u32)], cp_args: &[&str]) -> Result<Self> {
        let mut lab = Lab::new()?;
        let scratch = Scratch::new("steward-fleet-")?;
        let root = scratch.path().to_path_buf();
        let (token_file, admin) = admin_token(&root)?;
        let ip = lab.bridge_ip().to_string();
        let mut nodes: Vec<Node> =
            (1..=cp as u64).map(|id| Node::new_on(&ip, &root, id, &token_file, cp_args)).collect();
        let rest = Rest::default();
        crate::start_group(&mut nodes, &rest).await?;
        let mut hosts = Vec::new();
        for i in 1..=n {
            hosts.push(lab.host(i)?);
        }
        let mut fleet = Fleet {
            nodes,
            hosts,
            agents: Vec::new(),
            admin,
            rest,
            token: String::new(),
            lab,
            scratch,
            mounts: Vec::new(),
        };
        for (i, mib) in small_disks {
            let dir = fleet.scratch.path().join(fleet.host_id(*i));
            std::fs::create_dir_all(&dir)?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0755"), "tmpfs"])
                .arg(&dir)
                .output()?;
            ensure!(
                out.status.success(),
                "mounting a tmpfs on {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            fleet.mounts.push(dir);
        }
        crate::agent_copy(fleet.scratch.path())?;
        for i in 0..fleet.hosts.len() {
            let p = fleet.spawn_agent(i)?;
            fleet.agents.push(Some(p));
        }
        let (s, v) = fleet.rest.post(&fleet.nodes[0].url("/v1/teams"), &fleet.admin, &json!({"name": "shop"})).await?;
        ensure!(s == 201, "team: {s} {v}");
        fleet.token = v["token"].as_str().unwrap_or_default().to_string();
        Ok(fleet)
    }

    /// Host id of host `i` (0-based).
    pub fn host_id(&self, i: usize) -> String {
        format!("host-{}", i + 1)
    }

    /// Index of the host with this id.
    pub fn index_of(&self, host_id: &str) -> Option<usize> {
        (0..self.hosts.len()).find(|i| self.host_id(*i) == host_id)
    }

    /// Starts host `i`'s agent inside its namespace.
    pub fn spawn_agent(&self, i: usize) -> Result<Proc> {
        let h = &self.hosts[i];
        let ip = h.ip.to_string();
        let root = self.scratch.path();
        let mut args: Vec<String> = Vec::new();
        for n in &self.nodes {
            args.extend(["--control-plane".to_string(), n.grpc.clone()]);
        }
        let host_id = self.host_id(i);
        crate::tls::issue(steward_proto::tls::Role::Agent, &host_id, &[&ip], &root.join(&host_id).join("tls"))?;
        args.extend(
            [
                "--listen",
                &format!("{ip}:7410"),
                "--data-path",
                &root.join(&host_id).display().to_string(),
                "--host-id",
                &host_id,
                "--pg-listen",
                &ip,
                "--pg-host",
                &ip,
                "--pg-port",
                "5432",
                "--memory-budget-mb",
                "256",
                "--zone",
                &format!("zone-{}", i + 1),
                // every cluster archives its WAL into one shared repository, as on NFS
                "--repo",
                &root.join("repo").display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        args.insert(0, "run".into());
        h.spawn(&format!("agent-{}", i + 1), root.join("steward-agent"), &args, &root.join(format!("{host_id}.log")))
    }

    /// A node that answers (the first one not killed).
    pub fn live_node(&self) -> Result<&Node> {
        self.nodes.iter().find(|n| n.proc.is_some()).context("every control-plane node is down")
    }

    /// Checks WAL archiving across a failover: the timeline history file of the cluster's
    /// current timeline reaches the shared repository (the new primary archives it at its
    /// promotion), and the current primary's archiver has never failed.
    pub async fn check_archiving(&self, uri: &str) -> Result<()> {
        let c = self.cluster().await?;
        let (client, task) = connect_read_write(uri).await.context("no writable member to check archiving on")?;
        let row =
            client.query_one("SELECT failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver", &[]).await;
        task.abort();
        let row = row.context("reading pg_stat_archiver")?;
        let (failed, last_failed): (i64, String) = (row.get(0), row.get(1));
        let timeline = c.members.iter().find(|m| m.host_id == c.primary_host).map(|m| m.timeline).unwrap_or(1);
        ensure!(failed == 0, "archive_command failed {failed} times on the primary (last for {last_failed})");
        // The control plane exports what the primary's agent reports about archiving (the leader
        // does: heartbeats reach it alone), so look at every live node's /metrics.
        let prefix = format!("steward_archive_failures_total{{cluster=\"{}\",host=\"{}\"}} ", c.id, c.primary_host);
        let age_prefix = format!("steward_archive_last_success_age_seconds{{cluster=\"{}\",", c.id);
        wait_for("archiving metrics of the current primary", Duration::from_secs(30), || async {
            let mut text = String::new();
            for node in self.nodes.iter().filter(|n| n.proc.is_some()) {
                if let Ok((_, m)) = self.rest.send(reqwest::Method::GET, &node.url("/metrics"), None, None).await {
                    text.push_str(m.as_str().unwrap_or(""));
                }
            }
            let failures =
                text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(str::trim).map(str::to_string);
            let age = text
                .lines()
                .find(|l| l.starts_with(age_prefix.as_str()))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(f) = &failures {
                ensure!(f == "0", "the control plane reports {f} archive failures");
            }
            // after a promotion, the new timeline's history file has been archived
            let recent = age.is_some_and(|a| if timeline > 1 { a >= 0 } else { a >= -1 });
            Ok((failures.is_some() && recent).then_some(()))
        })
        .await?;
        if timeline > 1 {
            let dir = self.scratch.path().join("repo").join(&c.id).join("archive");
            let prefix = format!("{timeline:08X}.history-");
            wait_for("the new timeline's history file in the archive", Duration::from_secs(30), || async {
                let found = std::fs::read_dir(&dir)
                    .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&prefix)))
                    .unwrap_or(false);
                Ok(found.then_some(()))
            })
            .await?;
        }
        Ok(())
    }

    /// The HA cluster as the operator API reports it.
    pub async fn cluster(&self) -> Result<ClusterInfo> {
        let mut last = None;
        for n in self.nodes.iter().filter(|n| n.proc.is_some()) {
            match operator(&n.grpc)?.list_clusters(op_req(&self.admin, ListClustersRequest {})).await {
                Ok(r) => {
                    return r
                        .into_inner()
                        .clusters
                        .into_iter()
                        .find(|c| c.availability == "ha")
                        .context("no ha cluster")
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::anyhow!("no control-plane node answered: {last:?}"))
    }

    /// Creates an `ha` database, waits until it is active with both standbys streaming, creates
    /// the `acks` table, and returns the connection URI.
    pub async fn ha_database(&self) -> Result<String> {
        let node = self.live_node()?;
        // Agents register asynchronously: 503 until three hosts are there.
        let v = wait_for("three hosts to accept an ha database", Duration::from_secs(30), || async {
            let body = json!({"name": "orders", "purpose": "chaos", "availability": "ha"});
            let (s, v) = self.rest.post(&node.url("/v1/databases"), &self.token, &body).await?;
            match s {
                202 => Ok(Some(v)),
                503 => Ok(None),
                _ => anyhow::bail!("create: {s} {v}"),
            }
        })
        .await?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let db = wait_for("the ha database to become active", Duration::from_secs(240), || async {
            let (s, v) = self.rest.get(&node.url(&format!("/v1/databases/{id}")), &self.token).await?;
            ensure!(s == 200 && v["state"] != "failed", "get: {s} {v}");
            Ok((v["state"] == "active").then_some(v))
        })
        .await?;
        wait_for("both standbys streaming", Duration::from_secs(60), || async {
            let c = self.cluster().await?;
            Ok((c.members.iter().filter(|m| m.role == "standby" && m.running && m.in_recovery).count() == 2)
                .then_some(()))
        })
        .await?;
        let uri = db["connection"]["uri"].as_str().context("uri")?.to_string();
        let (client, task) = crate::pg_connect_task(&uri).await?;
        client
            .batch_execute("CREATE TABLE acks (id bigint PRIMARY KEY, server text, at timestamptz DEFAULT now())")
            .await?;
        drop(client);
        task.abort();
        Ok(uri)
    }

    /// URI of one member only (`host:5432`), with the database's credentials from `uri`.
    pub fn pinned_uri(uri: &str, host: &Host) -> String {
        let (head, tail) = uri.split_once('@').unwrap_or((uri, ""));
        let path = tail.split_once('/').map(|(_, p)| p).unwrap_or("");
        let db = path.split('?').next().unwrap_or("");
        format!("{head}@{}:5432/{db}?connect_timeout=2&sslmode=require", host.ip)
    }
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    pub at: Instant,
    /// Which member took it (the server's address as the client saw it).
    pub member: std::net::Ipv4Addr,
}

/// Connects like libpq does with a multi-host URI and `target_session_attrs=read-write`: each
/// host in turn, each within `connect_timeout` for the whole handshake (tokio-postgres bounds
/// only the TCP connect, and a frozen host still completes that in its kernel), keeping the first
/// that accepts writes.
pub async fn connect_read_write(uri: &str) -> Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let (head, tail) = uri.split_once('@')?;
    let (hosts, path) = tail.split_once('/')?;
    let db = path.split('?').next().unwrap_or("");
    for host in hosts.split(',') {
        let single = format!("{head}@{host}/{db}");
        let attempt = async {
            let (client, task) = crate::pg_connect_task(&single).await.ok()?;
            let ro: String = client.query_one("SHOW transaction_read_only", &[]).await.ok()?.get(0);
            if ro == "off" {
                Some((client, task))
            } else {
                task.abort();
                None
            }
        };
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
            return Some(c);
        }
    }
    None
}

/// A writer inserting rows until stopped, recording each acknowledged insert.
pub struct Writer {
    pub acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Writes through `uri` with ids starting at `first_id` (distinct ranges per writer), giving
    /// each INSERT [`Writer::DEFAULT_STATEMENT_TIMEOUT`] before it reconnects.
    pub fn start(uri: String, first_id: i64) -> Self {
        Self::start_with_timeout(uri, first_id, Self::DEFAULT_STATEMENT_TIMEOUT)
    }

    /// How long the tests' writers wait for one INSERT: generous, since a loaded CI machine may
    /// be slow to commit, and a timeout only costs a reconnect.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);

    /// Like [`Writer::start`], abandoning an INSERT (and reconnecting) after `statement_timeout`:
    /// the client-side timeout decides how soon a writer stuck on a frozen or cut-off primary
    /// moves on, so a benchmark can model a client that sets one.
    pub fn start_with_timeout(uri: String, first_id: i64, statement_timeout: Duration) -> Self {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (acks.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut next = first_id;
            while !s.load(Ordering::Relaxed) {
                let Some((client, task)) = connect_read_write(&uri).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let server = client
                    .query_one("SELECT host(inet_server_addr())", &[])
                    .await
                    .ok()
                    .and_then(|r| r.get::<_, Option<String>>(0))
                    .and_then(|s| s.parse().ok());
                let Some(member) = server else {
                    task.abort();
                    continue;
                };
                while !s.load(Ordering::Relaxed) {
                    let id = next;
                    next += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert =
                        client.execute("INSERT INTO acks (id, server) VALUES ($1, host(inet_server_addr()))", &params);
                    match tokio::time::timeout(statement_timeout, insert).await {
                        Ok(Ok(_)) => {
                            a.lock().unwrap_or_else(|e| e.into_inner()).push(Ack { id, at: Instant::now(), member })
                        }
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                task.abort();
            }
        });
        Self { acks, stop, task }
    }

    pub fn count(&self) -> usize {
        self.acks.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Waits until at least `n` more writes were acknowledged.
    pub async fn wait_more(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.count() + n;
        wait_for("acknowledged writes", timeout, || async { Ok((self.count() >= target).then_some(())) }).await
    }

    /// Stops and returns every acknowledged write.
    pub async fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// The longest pause between consecutive acknowledged writes from `from` on.
pub fn longest_pause(acks: &[Ack], from: Instant) -> Duration {
    let mut t: Vec<Instant> = acks.iter().map(|a| a.at).filter(|t| *t + Duration::from_millis(500) > from).collect();
    t.sort();
    t.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default()
}

/// Checks that every acknowledged id is on the current primary, and that no member acknowledged
/// a write after another member had started acknowledging (one writable primary at a time).
pub async fn verify(uri: &str, acks: &[Ack]) -> Result<()> {
    let (client, task) = connect_read_write(uri).await.context("no writable member to verify against")?;
    let rows = client.query("SELECT id FROM acks", &[]).await?;
    task.abort();
    let present: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acks.iter().map(|a| a.id).filter(|id| !present.contains(id)).collect();
    ensure!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(10)]);
    let mut sorted: Vec<&Ack> = acks.iter().collect();
    sorted.sort_by_key(|a| a.at);
    // Once a member acknowledged after another, the earlier one must never acknowledge again.
    let mut retired = BTreeSet::new();
    let mut current = None;
    for a in sorted {
        ensure!(!retired.contains(&a.member), "{} acknowledged a write after another member had taken over", a.member);
        if let Some(c) = current {
            if c != a.member {
                retired.insert(c);
            }
        }
        current = Some(a.member);
    }
    Ok(())
}
