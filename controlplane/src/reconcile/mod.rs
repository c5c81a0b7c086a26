//! Reconcilers: leader-only loops that compare the replicated desired state with what agents
//! report and drive agents with idempotent, epoch-carrying commands.

pub mod archive;
pub mod backup;
pub mod drain;
pub mod failover;
pub mod hosts;
pub mod liveness;
pub mod moves;
pub mod placement;
pub mod plan;
pub mod provision;
pub mod rejoin;
pub mod switchover;
pub mod topology;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::grpc::agent_client::AgentClients;
use crate::metrics::Metrics;
use crate::raft::node::RaftNode;
use crate::state::model::op_kind;
use crate::state::query;
use crate::state::Command;
use liveness::Liveness;

/// What every reconciler needs.
pub struct Ctx {
    pub node: Arc<RaftNode>,
    pub liveness: Arc<Liveness>,
    pub agents: AgentClients,
    pub metrics: Arc<Metrics>,
    /// A host with no heartbeat for this long is marked `down`.
    pub down_after: Duration,
    /// When clusters are backed up.
    pub backup_policy: backup::BackupPolicy,
    /// How long a deleted database's archive is kept.
    pub archive_grace: Duration,
    /// When the backup scheduler last looked.
    backup_checked: Mutex<Option<Instant>>,
    /// Operations being worked on by this node.
    in_flight: Mutex<HashSet<String>>,
    /// A rejoin pass is running (it may take as long as a clone).
    rejoining: std::sync::atomic::AtomicBool,
    /// Clusters an operator action (switchover) is changing: automatic failover leaves them be.
    busy: Mutex<HashSet<String>>,
    /// A drain pass is running.
    draining: std::sync::atomic::AtomicBool,
    /// Placements planned on this node whose writes are not applied yet (API creates, moves,
    /// drains): placement counts them, so concurrent creates spread over the hosts.
    pub placing: Arc<plan::Pending>,
    /// Per draining host, what its drain does or what stops it (for operators).
    drain_notes: Mutex<std::collections::HashMap<String, String>>,
}

impl Ctx {
    pub fn new(
        node: Arc<RaftNode>,
        liveness: Arc<Liveness>,
        metrics: Arc<Metrics>,
        down_after: Duration,
        backup_policy: backup::BackupPolicy,
        archive_grace: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            agents: AgentClients::new(node.agent_tls.clone()),
            node,
            liveness,
            metrics,
            down_after,
            backup_policy,
            archive_grace,
            backup_checked: Mutex::new(None),
            in_flight: Mutex::new(HashSet::new()),
            rejoining: Default::default(),
            busy: Mutex::new(HashSet::new()),
            draining: Default::default(),
            drain_notes: Mutex::new(Default::default()),
            placing: Default::default(),
        })
    }
}

impl Ctx {
    /// Claims a cluster for an operator action; false if another one holds it.
    pub fn claim(&self, cluster_id: &str) -> bool {
        self.busy.lock().map(|mut b| b.insert(cluster_id.to_string())).unwrap_or(false)
    }

    pub fn release(&self, cluster_id: &str) {
        if let Ok(mut b) = self.busy.lock() {
            b.remove(cluster_id);
        }
    }

    pub fn is_busy(&self, cluster_id: &str) -> bool {
        self.busy.lock().map(|b| b.contains(cluster_id)).unwrap_or(false)
    }

    /// Records what a host's drain does now; true if that changed.
    pub fn set_drain_note(&self, host_id: &str, note: &str) -> bool {
        let Ok(mut notes) = self.drain_notes.lock() else { return false };
        notes.insert(host_id.to_string(), note.to_string()).as_deref() != Some(note)
    }

    /// What a host's drain does now ("" if unknown or not draining).
    pub fn drain_note(&self, host_id: &str) -> String {
        self.drain_notes.lock().ok().and_then(|n| n.get(host_id).cloned()).unwrap_or_default()
    }

    /// Claims the rejoin pass if none is running.
    fn rejoin_idle(&self) -> bool {
        !self.rejoining.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    fn rejoin_done(&self) {
        self.rejoining.store(false, std::sync::atomic::Ordering::Release);
    }

    /// True at most once every 5 s: the backup scheduler and the archive purge need not look
    /// on every tick.
    fn backup_check_due(&self) -> bool {
        let Ok(mut last) = self.backup_checked.lock() else { return false };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Records that an operation's attempt failed and will be retried, then waits before the next
/// attempt (2, 4, ... up to 64 s).
async fn retry_later(ctx: &Ctx, op_id: &str, what: &str, attempts: i64, error: String) {
    let cmd =
        Command::UpdateOperation { id: op_id.to_string(), step: "retrying".into(), attempts, error, at: crate::now() };
    if let Err(e) = ctx.node.write(cmd).await {
        tracing::warn!(op = %op_id, error = %e, "recording {what} progress failed");
    }
    tokio::time::sleep(Duration::from_secs(2u64 << attempts.min(5))).await;
}

/// Runs the reconcilers forever; they act only while this node leads.
pub async fn run(ctx: Arc<Ctx>) {
    let mut leader_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The tick runs every check; an applied entry only starts the operations it created (at
        // thousands of databases the checks read every host and HA cluster, too much to repeat
        // for every write).
        let full_pass = tokio::select! {
            _ = tick.tick() => true,
            _ = ctx.node.stats.applied.notified() => false,
        };
        if !ctx.node.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        if !full_pass {
            // Let a burst of writes settle so that one pass picks up all their operations.
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else {
            checks(&ctx, since).await;
        }
        start_operations(&ctx).await;
    }
}

/// Host liveness, failover, rejoin, backup schedule, archive purge and drain passes.
async fn checks(ctx: &Arc<Ctx>, since: Instant) {
    if let Err(e) = hosts::mark_overdue(ctx, since).await {
        tracing::warn!(error = %e, "host liveness check failed");
    }
    if let Err(e) = failover::check(ctx, since).await {
        tracing::warn!(error = %e, "failover check failed");
    }
    if ctx.rejoin_idle() {
        let c = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = rejoin::check(&c).await {
                tracing::warn!(error = %e, "rejoin check failed");
            }
            c.rejoin_done();
        });
    }
    // A new leader first lets agents heartbeat (the scheduler needs their archiving state).
    if since.elapsed() > ctx.down_after && ctx.backup_check_due() {
        if let Err(e) = backup::schedule(ctx).await {
            tracing::warn!(error = %e, "backup scheduling failed");
        }
        if let Err(e) = archive::purge(ctx, ctx.archive_grace).await {
            tracing::warn!(error = %e, "removing archives of deleted databases failed");
        }
        // A drain pass asks agents (the move's preflight): never in the way of failover.
        if !ctx.draining.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let c = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = drain::check(&c).await {
                    tracing::warn!(error = %e, "draining hosts failed");
                }
                c.draining.store(false, std::sync::atomic::Ordering::Release);
            });
        }
    }
}

/// Starts a driver for every running operation that has none on this node.
async fn start_operations(ctx: &Arc<Ctx>) {
    match query::running_operations(ctx.node.store.pool()).await {
        Ok(ops) => {
            // A node that restarts with its own old vote leads for a moment before it hears of
            // the newer term: only a leadership a quorum confirms starts operation drivers.
            let fresh_ops = ops.iter().any(|op| ctx.in_flight.lock().map(|s| !s.contains(&op.id)).unwrap_or(false));
            if fresh_ops && ctx.node.linearizable_read().await.is_err() {
                return;
            }
            for op in ops {
                let fresh = ctx.in_flight.lock().map(|mut s| s.insert(op.id.clone())).unwrap_or(false);
                if !fresh {
                    continue;
                }
                let ctx2 = ctx.clone();
                tokio::spawn(async move {
                    let id = op.id.clone();
                    match op.kind.as_str() {
                        op_kind::BACKUP => backup::run(&ctx2, op).await,
                        op_kind::ARCHIVE => archive::run(&ctx2, op).await,
                        op_kind::MOVE => moves::run(&ctx2, op).await,
                        _ => provision::run(&ctx2, op).await,
                    }
                    if let Ok(mut s) = ctx2.in_flight.lock() {
                        s.remove(&id);
                    }
                });
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing running operations failed"),
    }
}
