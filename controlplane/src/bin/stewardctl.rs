//! `stewardctl`: the operator CLI. Talks gRPC to any control-plane node.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use steward_proto::v1::operator_client::OperatorClient;
use steward_proto::v1::*;
use tonic::transport::Channel;

/// Operate a Steward fleet: Raft status and membership, hosts, clusters, databases, operations.
///
/// Connections use mutual TLS: --tls-dir holds ca.pem and an operator certificate (node.pem,
/// node.key), made with `steward-controlplane pki issue --role operator`. Authenticate with an
/// admin or operator token: --token, $STEWARD_ADMIN_TOKEN, or --token-file.
#[derive(Parser)]
#[command(name = "stewardctl", version, about, long_about = None)]
struct Cli {
    /// gRPC address of any control-plane node.
    #[arg(long, global = true, env = "STEWARD_SERVER", default_value = "127.0.0.1:7400")]
    server: String,
    /// Admin token.
    #[arg(long, global = true, env = "STEWARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token (e.g. .steward/admin.token in dev).
    #[arg(long, global = true, env = "STEWARD_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Directory with ca.pem, node.pem and node.key (an operator certificate). Default
    /// ~/.config/steward/tls; `steward-controlplane dev` prints the one to use.
    #[arg(long, global = true, env = "STEWARD_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Raft group status and membership.
    #[command(subcommand)]
    Raft(RaftCmd),
    /// List database hosts and their state.
    Hosts,
    /// List PostgreSQL clusters with their members: role, running, timeline, replication lag.
    Clusters,
    /// List every database (all teams).
    Databases,
    /// Show one operation.
    Operation { id: String },
    /// Recent operations, newest first: provisioning, backups, failovers, moves, archives.
    Operations {
        /// Only this state: running, succeeded or failed.
        #[arg(long)]
        state: Option<String>,
        /// Only this kind (provision, backup, move, archive, restore, ...).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The audit log, newest first: who changed what, when, and the outcome.
    Audit {
        /// Only entries about this target (a database id, team, cluster/label, ...).
        #[arg(long)]
        target: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// List recorded backups, newest first: what, from which member, label in the repository,
    /// size. The repository itself: `steward-agent info --repo ... --stanza <cluster>`.
    Backups {
        /// Only this cluster's.
        #[arg(long)]
        cluster: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// HA cluster actions.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Database actions: move to another cluster.
    #[command(subcommand)]
    Database(DatabaseCmd),
    /// Host actions: drain (move every database away), undrain, revoke.
    #[command(subcommand)]
    Host(HostCmd),
    /// One-time tokens with which new agents and control-plane nodes get their certificates.
    #[command(subcommand)]
    JoinToken(JoinTokenCmd),
}

#[derive(Subcommand)]
enum JoinTokenCmd {
    /// Create a join token (shown once). Start the new agent with
    /// `steward-agent run --join-token <token> --join-url <control-plane REST address> ...`.
    Create {
        /// What the token admits: agent or controlplane.
        #[arg(long, default_value = "agent")]
        role: String,
        /// How long the token stays usable, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum DatabaseCmd {
    /// Move a live database to another cluster without downtime: its tables are copied and kept
    /// in sync by logical replication, then writers are blocked for a moment while the rest is
    /// applied, and its placement and connection URI switch to the new cluster. Applications
    /// pick up the new `connection.uri` (GET /v1/databases/{id}); the old one refuses them.
    ///
    /// Every table needs a primary key or a replica identity: the move is refused beforehand,
    /// with what to do, when one does not (see --check). Waits and prints progress unless
    /// --no-wait.
    Move {
        /// Database id, or <team>/<name> (see `stewardctl databases`).
        database: String,
        /// Target cluster id (see `stewardctl clusters`); default: where placement puts it.
        #[arg(long)]
        to: Option<String>,
        /// Only say where it would go and what stops it.
        #[arg(long, conflicts_with_all = ["abort", "no_wait"])]
        check: bool,
        /// Return once the move started (follow it with `stewardctl operation <id>`).
        #[arg(long)]
        no_wait: bool,
        /// Roll back the database's running move instead (only before it switched).
        #[arg(long, conflicts_with = "to")]
        abort: bool,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Drain a host: it takes no new databases, and every database with an instance on it is
    /// moved to a cluster elsewhere, one at a time (`stewardctl hosts` shows how far).
    Drain {
        /// Host id (see `stewardctl hosts`).
        host: String,
        /// Wait until no database is left on the host, printing progress.
        #[arg(long)]
        wait: bool,
    },
    /// End a drain: the host takes databases again.
    Undrain {
        /// Host id.
        host: String,
    },
    /// Revoke a host's certificate: its agent can no longer connect, register, heartbeat or
    /// renew, and the host is treated as down (its primaries fail over). Permanent: a rebuilt
    /// machine joins under a new host id.
    Revoke {
        /// Host id.
        host: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Planned switchover: stop the primary gracefully, promote a caught-up standby, repoint the
    /// others; the old primary rejoins as a standby. Writes pause for well under a second.
    Switchover {
        /// Cluster id (see `stewardctl clusters`).
        cluster: String,
        /// Standby host to promote (default: the most caught-up standby).
        #[arg(long)]
        to: Option<String>,
    },
    /// Back up a cluster now, besides the schedule (--backup-full-every/--backup-incr-every on
    /// the control plane). Taken from a healthy standby when there is one; expires what the
    /// databases' backup_retention_days no longer need.
    Backup {
        /// Cluster id (see `stewardctl clusters`).
        cluster: String,
        /// Full, or incremental (changed pages since the last backup; full if there is none).
        #[arg(long = "type", value_enum, default_value_t = BackupType::Incr)]
        kind: BackupType,
        /// Wait for the backup to finish, printing its progress.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum BackupType {
    Full,
    Incr,
}

#[derive(Subcommand)]
enum RaftCmd {
    /// Term, leader, log and snapshot positions, members.
    Status,
    /// Add a control-plane node (start it first with no --initial-member).
    AddNode {
        #[arg(long)]
        id: u64,
        /// Its gRPC address.
        #[arg(long)]
        grpc: String,
        /// Its REST address.
        #[arg(long)]
        api: String,
    },
    /// Remove a control-plane node from the group.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
}

fn token(cli: &Cli) -> anyhow::Result<String> {
    if let Some(t) = &cli.token {
        return Ok(t.trim().to_string());
    }
    if let Some(p) = &cli.token_file {
        return Ok(std::fs::read_to_string(p)
            .with_context(|| format!("reading token file {}", p.display()))?
            .trim()
            .to_string());
    }
    anyhow::bail!("no admin token: pass --token, set STEWARD_ADMIN_TOKEN, or pass --token-file")
}

fn req<T>(token: &str, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().context("token is not valid header text")?);
    r.set_timeout(std::time::Duration::from_secs(30));
    Ok(r)
}

/// Polls an operation until it ends, printing each new step to stderr.
async fn wait_operation(
    c: &mut OperatorClient<Channel>,
    tok: &str,
    mut o: OperationInfo,
    deadline: std::time::Duration,
) -> anyhow::Result<OperationInfo> {
    let mut last_step = String::new();
    let until = std::time::Instant::now() + deadline;
    while o.state == "running" && std::time::Instant::now() < until {
        if o.step != last_step {
            eprintln!("  {}", o.step.replace("backing_up_from:", "backing up from "));
            last_step = o.step.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        o = c.get_operation(req(tok, GetOperationRequest { id: o.id.clone() })?).await?.into_inner();
    }
    Ok(o)
}

/// The id of a database named by id or by `<team>/<name>`.
async fn database_id(c: &mut OperatorClient<Channel>, tok: &str, name: &str) -> anyhow::Result<String> {
    let dbs = c.list_databases(req(tok, ListDatabasesRequest {})?).await?.into_inner().databases;
    let found = dbs.iter().find(|d| d.id == name && d.state != "deleted").or_else(|| {
        name.split_once('/')
            .and_then(|(team, n)| dbs.iter().find(|d| d.owner == team && d.name == n && d.state != "deleted"))
    });
    found
        .map(|d| d.id.clone())
        .ok_or_else(|| anyhow::anyhow!("no database {name}: give its id or <team>/<name> (see stewardctl databases)"))
}

fn operation_json(o: &OperationInfo) -> serde_json::Value {
    serde_json::json!({"id": o.id, "kind": o.kind, "database_id": o.database_id, "state": o.state, "step": o.step,
        "attempts": o.attempts, "error": o.error, "detail": o.detail, "created_at": o.created_at,
        "updated_at": o.updated_at})
}

fn print_operations(out: Output, ops: Vec<OperationInfo>) {
    if out == Output::Json {
        println!("{}", serde_json::Value::Array(ops.iter().map(operation_json).collect()));
        return;
    }
    table(
        &["ID", "KIND", "DATABASE", "STATE", "STEP", "ATTEMPTS", "CREATED", "DETAIL", "ERROR"],
        ops.into_iter()
            .map(|o| {
                vec![
                    o.id,
                    o.kind,
                    o.database_id,
                    o.state,
                    o.step,
                    o.attempts.to_string(),
                    o.created_at,
                    o.detail,
                    o.error,
                ]
            })
            .collect(),
    );
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{:w$}", c, w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn members_json(m: &[RaftMember]) -> serde_json::Value {
    serde_json::json!(m
        .iter()
        .map(|m| serde_json::json!({"id": m.id, "grpc_addr": m.grpc_addr, "api_addr": m.api_addr, "voter": m.voter}))
        .collect::<Vec<_>>())
}

fn print_members(out: Output, m: &[RaftMember]) {
    if out == Output::Json {
        println!("{}", members_json(m));
    } else {
        table(
            &["ID", "GRPC", "API", "VOTER"],
            m.iter()
                .map(|m| vec![m.id.to_string(), m.grpc_addr.clone(), m.api_addr.clone(), m.voter.to_string()])
                .collect(),
        );
    }
}

fn print_hosts(out: Output, hosts: &[HostInfo]) {
    if out == Output::Json {
        let v: Vec<_> = hosts
            .iter()
            .map(|h| {
                serde_json::json!({"id": h.id, "hostname": h.hostname, "agent_addr": h.agent_addr, "zone": h.zone,
                    "state": h.state, "cores": h.cores, "memory_bytes": h.memory_bytes,
                    "disk_free_bytes": h.disk_free_bytes, "last_heartbeat": h.last_heartbeat, "pg_host": h.pg_host,
                    "pg_port": h.pg_port, "databases": h.databases, "drain_note": h.drain_note})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return;
    }
    let gib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 30) as f64);
    table(
        &[
            "ID",
            "STATE",
            "ZONE",
            "AGENT",
            "POSTGRES",
            "CORES",
            "MEM GiB",
            "FREE GiB",
            "DATABASES",
            "LAST HEARTBEAT",
            "DRAIN",
        ],
        hosts
            .iter()
            .map(|h| {
                vec![
                    h.id.clone(),
                    h.state.clone(),
                    h.zone.clone(),
                    h.agent_addr.clone(),
                    format!("{}:{}", h.pg_host, h.pg_port),
                    h.cores.to_string(),
                    gib(h.memory_bytes),
                    gib(h.disk_free_bytes),
                    h.databases.to_string(),
                    h.last_heartbeat.clone(),
                    h.drain_note.clone(),
                ]
            })
            .collect(),
    );
}

fn print_backups(out: Output, backups: &[BackupInfo]) {
    if out == Output::Json {
        let v: Vec<_> = backups
            .iter()
            .map(|b| {
                serde_json::json!({"operation_id": b.operation_id, "cluster_id": b.cluster_id, "kind": b.kind,
                    "kind_taken": b.kind_taken, "requested_by": b.requested_by, "retention_days": b.retention_days,
                    "state": b.state, "host_id": b.host_id, "from_standby": b.from_standby, "label": b.label,
                    "size_bytes": b.size_bytes, "stored_bytes": b.stored_bytes, "stop_lsn": b.stop_lsn,
                    "error": b.error, "created_at": b.created_at, "finished_at": b.finished_at})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return;
    }
    let mib = |b: u64| format!("{:.1}", b as f64 / f64::from(1u32 << 20));
    table(
        &["CLUSTER", "STARTED", "KIND", "STATE", "FROM", "LABEL", "SIZE MiB", "STORED MiB", "BY", "ERROR"],
        backups
            .iter()
            .map(|b| {
                let kind = if b.kind_taken.is_empty() { b.kind.clone() } else { b.kind_taken.clone() };
                let from = match (b.host_id.as_str(), b.from_standby) {
                    ("", _) => String::new(),
                    (h, true) => format!("{h} (standby)"),
                    (h, false) => format!("{h} (primary)"),
                };
                vec![
                    b.cluster_id.clone(),
                    b.created_at.clone(),
                    kind,
                    b.state.clone(),
                    from,
                    b.label.clone(),
                    mib(b.size_bytes),
                    mib(b.stored_bytes),
                    b.requested_by.clone(),
                    b.error.clone(),
                ]
            })
            .collect(),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tok = token(&cli)?;
    let tls_dir = match &cli.tls_dir {
        Some(d) => d.clone(),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/steward/tls"))
            .ok_or_else(|| anyhow::anyhow!("no --tls-dir given and $HOME is not set"))?,
    };
    let tls = steward_proto::tls::TlsMaterial::load(&steward_proto::tls::TlsDir(tls_dir.clone()))
        .with_context(|| format!("loading the operator certificate from {} (--tls-dir)", tls_dir.display()))?;
    let config = tls.client_config(&[steward_proto::tls::Role::ControlPlane])?;
    let channel = steward_proto::tls::transport::channel(&cli.server, config, std::time::Duration::from_secs(3))
        .context("invalid --server address")?;
    let c = OperatorClient::new(channel);
    let server = cli.server.clone();
    let result = run(&cli, c, &tok).await;
    if let Err(e) = &result {
        if let Some(status) = e.downcast_ref::<tonic::Status>() {
            if status.code() == tonic::Code::Unavailable && status.message().contains("transport") {
                anyhow::bail!(
                    "cannot reach the control plane at {server}: is it running, and does it trust the certificate in {}? ({})",
                    tls_dir.display(),
                    status.message()
                );
            }
            anyhow::bail!("{}", status.message());
        }
    }
    result
}

async fn run(cli: &Cli, mut c: OperatorClient<Channel>, tok: &str) -> anyhow::Result<()> {
    let tok = tok.to_string();
    let out = cli.output;
    match &cli.command {
        Cmd::Raft(RaftCmd::Status) => {
            let s = c.raft_status(req(&tok, RaftStatusRequest {})?).await?.into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"node_id": s.node_id, "term": s.term, "leader_id": s.leader_id, "state": s.state,
                        "last_log_index": s.last_log_index, "last_applied": s.last_applied, "snapshot_index": s.snapshot_index,
                        "first_log_index": s.first_log_index, "snapshots_installed": s.snapshots_installed, "members": members_json(&s.members)})
                );
            } else {
                println!("node {} is {} in term {}; leader {}", s.node_id, s.state, s.term, s.leader_id);
                println!(
                    "log: first {} last {}; applied {}; snapshot {}",
                    s.first_log_index, s.last_log_index, s.last_applied, s.snapshot_index
                );
                print_members(out, &s.members);
            }
        }
        Cmd::Raft(RaftCmd::AddNode { id, grpc, api }) => {
            let r = c
                .add_node(req(&tok, AddNodeRequest { id: *id, grpc_addr: grpc.clone(), api_addr: api.clone() })?)
                .await?
                .into_inner();
            print_members(out, &r.members);
        }
        Cmd::Raft(RaftCmd::RemoveNode { id }) => {
            let r = c.remove_node(req(&tok, RemoveNodeRequest { id: *id })?).await?.into_inner();
            print_members(out, &r.members);
        }
        Cmd::Hosts => {
            let r = c.list_hosts(req(&tok, ListHostsRequest {})?).await?.into_inner();
            print_hosts(out, &r.hosts);
        }
        Cmd::Clusters => {
            let r = c.list_clusters(req(&tok, ListClustersRequest {})?).await?.into_inner();
            if out == Output::Json {
                let v: Vec<_> = r
                    .clusters
                    .iter()
                    .map(|k| {
                        let members: Vec<_> = k
                            .members
                            .iter()
                            .map(|m| serde_json::json!({"host_id": m.host_id, "port": m.port, "role": m.role, "state": m.state,
                                "running": m.running, "in_recovery": m.in_recovery, "timeline": m.timeline,
                                "received_lsn": m.received_lsn, "replayed_lsn": m.replayed_lsn, "lag_bytes": m.lag_bytes, "fenced": m.fenced}))
                            .collect();
                        serde_json::json!({"id": k.id, "availability": k.availability, "pg_major": k.pg_major, "primary_host": k.primary_host,
                            "epoch": k.epoch, "port": k.port, "state": k.state, "databases": k.databases, "members": members})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let mut rows = Vec::new();
                for k in &r.clusters {
                    for (i, m) in k.members.iter().enumerate() {
                        let first = |v: String| if i == 0 { v } else { String::new() };
                        rows.push(vec![
                            first(k.id.clone()),
                            first(k.availability.clone()),
                            first(k.state.clone()),
                            first(k.epoch.to_string()),
                            first(k.databases.to_string()),
                            format!("{}:{}", m.host_id, m.port),
                            if m.fenced { format!("{} (fenced)", m.role) } else { m.role.clone() },
                            m.running.to_string(),
                            m.timeline.to_string(),
                            m.lag_bytes.to_string(),
                        ]);
                    }
                }
                table(
                    &[
                        "CLUSTER",
                        "AVAILABILITY",
                        "STATE",
                        "EPOCH",
                        "DATABASES",
                        "MEMBER",
                        "ROLE",
                        "RUNNING",
                        "TIMELINE",
                        "LAG BYTES",
                    ],
                    rows,
                );
            }
        }
        Cmd::Databases => {
            let r = c.list_databases(req(&tok, ListDatabasesRequest {})?).await?.into_inner();
            if out == Output::Json {
                let v: Vec<_> = r.databases.iter().map(|d| serde_json::json!({"id": d.id, "name": d.name, "owner": d.owner, "state": d.state, "cluster_id": d.cluster_id, "availability": d.availability, "created_at": d.created_at})).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                table(
                    &["ID", "NAME", "OWNER", "STATE", "CLUSTER", "AVAILABILITY", "CREATED"],
                    r.databases
                        .iter()
                        .map(|d| {
                            vec![
                                d.id.clone(),
                                d.name.clone(),
                                d.owner.clone(),
                                d.state.clone(),
                                d.cluster_id.clone(),
                                d.availability.clone(),
                                d.created_at.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Switchover { cluster, to }) => {
            let r = c
                .switchover(req(
                    &tok,
                    SwitchoverRequest { cluster_id: cluster.clone(), target_host: to.clone().unwrap_or_default() },
                )?)
                .await?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    serde_json::json!({"old_primary": r.old_primary, "new_primary": r.new_primary, "epoch": r.epoch, "write_pause_ms": r.write_pause_ms})
                );
            } else {
                println!(
                    "switched {cluster} from {} to {} (epoch {}); writes paused {} ms",
                    r.old_primary, r.new_primary, r.epoch, r.write_pause_ms
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Backup { cluster, kind, wait }) => {
            let kind = if *kind == BackupType::Full { "full" } else { "incr" };
            let mut o = c
                .start_backup(req(&tok, StartBackupRequest { cluster_id: cluster.clone(), kind: kind.into() })?)
                .await?
                .into_inner();
            eprintln!("backup {} of {cluster} started ({kind})", o.id);
            if *wait {
                o = wait_operation(&mut c, &tok, o, std::time::Duration::from_secs(6 * 3600)).await?;
                let b = c
                    .list_backups(req(&tok, ListBackupsRequest { cluster_id: cluster.clone(), limit: 20 })?)
                    .await?
                    .into_inner()
                    .backups
                    .into_iter()
                    .find(|b| b.operation_id == o.id);
                print_backups(out, b.as_slice());
                if o.state != "succeeded" {
                    anyhow::bail!("backup {} {}: {}", o.id, o.state, o.error);
                }
            } else if out == Output::Json {
                println!("{}", serde_json::json!({"operation_id": o.id, "state": o.state}));
            } else {
                println!("{}", o.id);
            }
        }
        Cmd::Audit { target, limit } => {
            let r = c
                .list_audit(req(&tok, ListAuditRequest { target: target.clone().unwrap_or_default(), limit: *limit })?)
                .await?
                .into_inner();
            if out == Output::Json {
                let v: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| serde_json::json!({"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action, "target": e.target, "outcome": e.outcome}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                table(
                    &["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "OUTCOME"],
                    r.entries
                        .iter()
                        .map(|e| {
                            vec![
                                e.seq.to_string(),
                                e.at.clone(),
                                e.actor.clone(),
                                e.action.clone(),
                                e.target.clone(),
                                e.outcome.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Backups { cluster, limit } => {
            let r = c
                .list_backups(req(
                    &tok,
                    ListBackupsRequest { cluster_id: cluster.clone().unwrap_or_default(), limit: *limit },
                )?)
                .await?
                .into_inner();
            print_backups(out, &r.backups);
        }
        Cmd::Operation { id } => {
            let o = c.get_operation(req(&tok, GetOperationRequest { id: id.clone() })?).await?.into_inner();
            if out == Output::Json {
                println!("{}", operation_json(&o));
            } else {
                print_operations(out, vec![o]);
            }
        }
        Cmd::Operations { state, kind, limit } => {
            let r = ListOperationsRequest {
                state: state.clone().unwrap_or_default(),
                kind: kind.clone().unwrap_or_default(),
                limit: *limit,
            };
            let ops = c.list_operations(req(&tok, r)?).await?.into_inner().operations;
            print_operations(out, ops);
        }
        Cmd::Database(DatabaseCmd::Move { database, to, check, no_wait, abort }) => {
            let id = database_id(&mut c, &tok, database).await?;
            if *abort {
                let o = c.abort_move(req(&tok, AbortMoveRequest { database_id: id.clone() })?).await?.into_inner();
                eprintln!("rolling back move {} of {id}", o.id);
                let o = wait_operation(&mut c, &tok, o, std::time::Duration::from_secs(3600)).await?;
                if out == Output::Json {
                    println!("{}", operation_json(&o));
                } else {
                    println!("move {} {}: {}", o.id, o.state, if o.error.is_empty() { &o.detail } else { &o.error });
                }
                return Ok(());
            }
            let mut r = req(
                &tok,
                MoveDatabaseRequest {
                    database_id: id.clone(),
                    target_cluster_id: to.clone().unwrap_or_default(),
                    check_only: *check,
                },
            )?;
            r.set_timeout(std::time::Duration::from_secs(120));
            let reply = c.move_database(r).await?.into_inner();
            if *check {
                if out == Output::Json {
                    println!(
                        "{}",
                        serde_json::json!({"database_id": id, "target_cluster_id": reply.target_cluster_id, "problems": reply.problems})
                    );
                } else if reply.problems.is_empty() {
                    println!("{id} can be moved; it would go to {}", reply.target_cluster_id);
                } else {
                    println!("{id} cannot be moved yet:");
                    for p in &reply.problems {
                        println!("  - {p}");
                    }
                }
                if !reply.problems.is_empty() {
                    std::process::exit(1);
                }
                return Ok(());
            }
            let o = reply.operation.context("the control plane returned no operation")?;
            eprintln!("moving {id} to {} (operation {})", reply.target_cluster_id, o.id);
            if *no_wait {
                if out == Output::Json {
                    println!("{}", operation_json(&o));
                } else {
                    println!("{}", o.id);
                }
                return Ok(());
            }
            let o = wait_operation(&mut c, &tok, o, std::time::Duration::from_secs(24 * 3600)).await?;
            if out == Output::Json {
                println!("{}", operation_json(&o));
            } else {
                println!("move {} {}: {}", o.id, o.state, if o.error.is_empty() { &o.detail } else { &o.error });
            }
            if o.state != "succeeded" {
                anyhow::bail!("move {} {}: {}", o.id, o.state, o.error);
            }
        }
        Cmd::Host(HostCmd::Drain { host, wait }) => {
            let mut h = c
                .drain_host(req(&tok, DrainHostRequest { host_id: host.clone(), undrain: false })?)
                .await?
                .into_inner();
            eprintln!("draining {host}: {} database(s) to move", h.databases);
            if *wait {
                let mut last = String::new();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(24 * 3600);
                while h.databases > 0 && std::time::Instant::now() < deadline {
                    let now = format!("{} database(s) left; {}", h.databases, h.drain_note);
                    if now != last {
                        eprintln!("  {now}");
                        last = now;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let hosts = c.list_hosts(req(&tok, ListHostsRequest {})?).await?.into_inner().hosts;
                    h = hosts.into_iter().find(|x| x.id == *host).context("the host vanished")?;
                }
                if h.databases > 0 {
                    anyhow::bail!("{host} still has {} database(s): {}", h.databases, h.drain_note);
                }
                eprintln!("{host} is drained");
            }
            print_hosts(out, &[h]);
        }
        Cmd::Host(HostCmd::Undrain { host }) => {
            let h =
                c.drain_host(req(&tok, DrainHostRequest { host_id: host.clone(), undrain: true })?).await?.into_inner();
            print_hosts(out, &[h]);
        }
        Cmd::Host(HostCmd::Revoke { host }) => {
            let h = c.revoke_host(req(&tok, RevokeHostRequest { host_id: host.clone() })?).await?.into_inner();
            print_hosts(out, &[h]);
        }
        Cmd::JoinToken(JoinTokenCmd::Create { role, ttl }) => {
            let r = c
                .create_join_token(req(&tok, CreateJoinTokenRequest { role: role.clone(), ttl_seconds: *ttl })?)
                .await?
                .into_inner();
            if out == Output::Json {
                println!("{}", serde_json::json!({"token": r.token, "role": role, "expires_at": r.expires_at}));
            } else {
                println!("{}", r.token);
                eprintln!("one-time {role} join token, valid until {}; it is not shown again", r.expires_at);
            }
        }
    }
    Ok(())
}
