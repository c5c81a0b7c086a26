//! The move operation: a live database goes to another cluster without downtime. The source's
//! agent publishes it, the target's agent creates roles, database and schema and subscribes
//! (copy, then streaming); once the target has caught up, the source blocks the database's
//! writers, the target applies what is left, takes the sequences and opens the database to its
//! role, and the placement (and so `connection.uri`) switches in one Raft write. Then the
//! source's copy is removed.
//!
//! Every step is idempotent and the move's state is in Raft, so a new leader runs the operation
//! again from the top and lands where the old one was. Until the switch, a move can be rolled
//! back (an operator's abort, a schema changed under it, a target that does not catch up):
//! the target's copy goes and the source's writers are let in again. After the switch it only
//! moves forward.

use std::time::{Duration, Instant};

use steward_proto::v1::{
    MoveSourceReply, MoveSourceRequest, MoveSourceStep, MoveTargetReply, MoveTargetRequest, MoveTargetStep,
};
use tonic::Code;

use super::provision::{ensure_cluster, step, StepError};
use super::Ctx;
use crate::state::model::{cluster_state, host_state, move_state, Database, Move, Operation};
use crate::state::{query, Command, Response};

/// Attempts before a move is rolled back (before the switch) or its cleanup given up (after).
const MAX_ATTEMPTS: i64 = 6;
/// Writers are blocked only once the subscriber is at most this far behind.
const CATCH_UP_BYTES: u64 = 2 << 20;
/// How long the blocked writers wait for the target to apply the rest before the move is rolled
/// back and they are let in again.
const BLOCKED_WAIT: Duration = Duration::from_secs(60);
/// How often copy and catch-up progress is polled.
const POLL: Duration = Duration::from_millis(200);

/// Why an attempt stopped.
enum Stop {
    /// Retry later (agent unreachable, host down, ...).
    Retry(String),
    /// This node stopped leading or the operation ended elsewhere: stop quietly.
    Abandon(String),
    /// The move cannot go on: roll it back.
    Rollback(String),
}

impl Stop {
    fn message(self) -> String {
        match self {
            Stop::Retry(m) | Stop::Abandon(m) | Stop::Rollback(m) => m,
        }
    }
}

impl From<StepError> for Stop {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Retry(m) => Stop::Retry(m),
            StepError::Abandon(m) => Stop::Abandon(m),
        }
    }
}

fn read(e: sqlx::Error) -> Stop {
    Stop::Retry(format!("reading state: {e}"))
}

/// The serving primary of a cluster, as the agents are called.
struct Endpoint {
    cluster_id: String,
    epoch: u64,
    host_id: String,
    agent_addr: String,
    pg_host: String,
    port: u16,
}

async fn endpoint(ctx: &Ctx, cluster_id: &str) -> Result<Endpoint, Stop> {
    let pool = ctx.node.store.pool();
    let cluster = query::cluster(pool, cluster_id)
        .await
        .map_err(read)?
        .ok_or_else(|| Stop::Abandon(format!("cluster {cluster_id} vanished")))?;
    let host = query::host(pool, &cluster.primary_host)
        .await
        .map_err(read)?
        .ok_or_else(|| Stop::Abandon(format!("host {} vanished", cluster.primary_host)))?;
    if host.state != host_state::ACTIVE {
        return Err(Stop::Retry(format!("the primary of {cluster_id} ({}) is {}", host.id, host.state)));
    }
    let member = query::members(pool, cluster_id).await.map_err(read)?;
    let port = member.iter().find(|m| m.host_id == host.id).map_or(cluster.port, |m| m.port);
    Ok(Endpoint {
        cluster_id: cluster.id,
        epoch: cluster.epoch as u64,
        host_id: host.id,
        agent_addr: host.agent_addr,
        pg_host: host.pg_host,
        port: u16::try_from(port).unwrap_or(5432),
    })
}

fn agent_error(side: &str, ep: &Endpoint, s: tonic::Status) -> Stop {
    let msg = format!("{side} agent {}: {}", ep.host_id, s.message());
    if s.code() == Code::Aborted {
        Stop::Rollback(s.message().to_string())
    } else {
        Stop::Retry(msg)
    }
}

async fn source(
    ctx: &Ctx,
    ep: &Endpoint,
    mv: &Move,
    step: MoveSourceStep,
    timeout: Duration,
    fill: impl FnOnce(&mut MoveSourceRequest),
) -> Result<MoveSourceReply, Stop> {
    let mut req = MoveSourceRequest {
        cluster_id: ep.cluster_id.clone(),
        epoch: ep.epoch,
        operation_id: mv.operation_id.clone(),
        database: mv.source_pg_name.clone(),
        role: mv.source_role.clone(),
        step: step as i32,
        ..Default::default()
    };
    fill(&mut req);
    let mut agent = ctx.agents.get(&ep.agent_addr).await.map_err(|e| Stop::Retry(e.to_string()))?;
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    agent.move_source(r).await.map(tonic::Response::into_inner).map_err(|s| agent_error("source", ep, s))
}

async fn target(
    ctx: &Ctx,
    ep: &Endpoint,
    mv: &Move,
    db: &Database,
    step: MoveTargetStep,
    timeout: Duration,
    fill: impl FnOnce(&mut MoveTargetRequest),
) -> Result<MoveTargetReply, Stop> {
    let mut req = MoveTargetRequest {
        cluster_id: ep.cluster_id.clone(),
        epoch: ep.epoch,
        operation_id: mv.operation_id.clone(),
        database: mv.target_pg_name.clone(),
        role: mv.target_role.clone(),
        password_scram: steward_agent::pg::scram_verifier(&db.password),
        step: step as i32,
        ..Default::default()
    };
    fill(&mut req);
    let mut agent = ctx.agents.get(&ep.agent_addr).await.map_err(|e| Stop::Retry(e.to_string()))?;
    let mut r = tonic::Request::new(req);
    r.set_timeout(timeout);
    agent.move_target(r).await.map(tonic::Response::into_inner).map_err(|s| agent_error("target", ep, s))
}

/// Drives one move operation until it ends or this node stops leading.
pub async fn run(ctx: &Ctx, op: Operation) {
    let mut attempts = op.attempts;
    loop {
        if !ctx.node.is_leader() {
            return;
        }
        match attempt(ctx, &op, attempts).await {
            Ok(detail) => {
                finish(ctx, &op, true, String::new(), detail).await;
                return;
            }
            Err(Stop::Abandon(why)) => {
                tracing::info!(op = %op.id, %why, "move handed over");
                return;
            }
            Err(Stop::Rollback(why)) => {
                rollback(ctx, &op, why).await;
                return;
            }
            Err(Stop::Retry(error)) => {
                attempts += 1;
                ctx.metrics.agent_calls_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(op = %op.id, attempts, %error, "move step failed");
                let switched = matches!(
                    query::move_of(ctx.node.store.pool(), &op.id).await,
                    Ok(Some(m)) if m.state == move_state::SWITCHED
                );
                if attempts >= MAX_ATTEMPTS && !switched {
                    rollback(ctx, &op, format!("gave up after {attempts} attempts: {error}")).await;
                    return;
                }
                if attempts >= MAX_ATTEMPTS * 2 {
                    // Switched: the database serves from its new cluster; only the source's old copy
                    // is left behind. Say so rather than retry forever.
                    let detail = format!("switched; removing the source's copy failed: {error}");
                    finish(ctx, &op, true, error, detail).await;
                    return;
                }
                super::retry_later(ctx, &op.id, "move", attempts, error).await;
            }
        }
    }
}

async fn finish(ctx: &Ctx, op: &Operation, succeeded: bool, error: String, detail: String) {
    let cmd = Command::FinishMove { operation_id: op.id.clone(), succeeded, error, detail, at: crate::now() };
    for _ in 0..10 {
        match ctx.node.write(cmd.clone()).await {
            Ok(_) => {
                tracing::info!(op = %op.id, database = %op.database_id, succeeded, "move operation ended");
                return;
            }
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "recording the move's end failed; retrying");
                if !ctx.node.is_leader() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Progress in words, written only when it changed.
struct Progress<'a> {
    ctx: &'a Ctx,
    op: &'a Operation,
    attempts: i64,
    last: String,
    at: Instant,
}

impl Progress<'_> {
    async fn say(&mut self, text: String) -> Result<(), Stop> {
        if !self.ctx.node.is_leader() {
            return Err(Stop::Abandon("this node no longer leads".into()));
        }
        // Numbers change all the time: write at most every 2 s unless the step itself changes.
        let same_step = text.split(':').next() == self.last.split(':').next();
        if text == self.last || (same_step && self.at.elapsed() < Duration::from_secs(2)) {
            return Ok(());
        }
        step(self.ctx, self.op, self.attempts, &text).await?;
        self.last = text;
        self.at = Instant::now();
        Ok(())
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Stops quietly when this node no longer leads (another node drives the move now), and with a
/// rollback if an abort was recorded (by an operator or an earlier leader).
async fn check_abort(ctx: &Ctx, op: &Operation) -> Result<Move, Stop> {
    if !ctx.node.is_leader() {
        return Err(Stop::Abandon("this node no longer leads".into()));
    }
    let mv = query::move_of(ctx.node.store.pool(), &op.id)
        .await
        .map_err(read)?
        .ok_or_else(|| Stop::Abandon("move record vanished".into()))?;
    if !mv.abort_reason.is_empty() && mv.state == move_state::COPYING {
        return Err(Stop::Rollback(mv.abort_reason.clone()));
    }
    Ok(mv)
}

async fn attempt(ctx: &Ctx, op: &Operation, attempts: i64) -> Result<String, Stop> {
    let pool = ctx.node.store.pool();
    let mv = check_abort(ctx, op).await?;
    let db = query::database(pool, &mv.database_id)
        .await
        .map_err(read)?
        .ok_or_else(|| Stop::Abandon("database vanished".into()))?;
    let mut progress = Progress { ctx, op, attempts, last: op.step.clone(), at: Instant::now() };
    if mv.state == move_state::SWITCHED {
        return cleanup(ctx, &mv, &mut progress).await;
    }

    // A target cluster made for this move is built first, like a provision's.
    let cluster = query::cluster(pool, &mv.target_cluster_id)
        .await
        .map_err(read)?
        .ok_or_else(|| Stop::Abandon("target cluster vanished".into()))?;
    if cluster.state == cluster_state::CREATING {
        ensure_cluster(ctx, op, attempts, &cluster).await?;
    }
    let src = endpoint(ctx, &mv.source_cluster_id).await?;
    let dst = endpoint(ctx, &mv.target_cluster_id).await?;
    let quick = Duration::from_secs(30);
    let slow = Duration::from_secs(1800);

    progress.say("prepare_source".into()).await?;
    let before = target(ctx, &dst, &mv, &db, MoveTargetStep::MoveTargetStatus, quick, |_| {}).await?;
    let keep_owner = mv.target_role == mv.source_role;
    let prepared = source(ctx, &src, &mv, MoveSourceStep::MoveSourcePrepare, slow, |r| {
        r.move_password_scram = steward_agent::pg::scram_verifier(&mv.move_password);
        r.keep_owner = keep_owner;
        r.reset_slot = !before.subscribed && !before.finished;
    })
    .await?;
    progress.say("prepare_target".into()).await?;
    let prepared_target = target(ctx, &dst, &mv, &db, MoveTargetStep::MoveTargetPrepare, slow, |r| {
        r.schema_sql = prepared.schema_sql.clone();
        r.roles = prepared.roles.clone();
        r.keep_owner = keep_owner;
        r.source_host = src.pg_host.clone();
        r.source_port = u32::from(src.port);
        r.source_database = mv.source_pg_name.clone();
        r.move_password = mv.move_password.clone();
        r.source_slot_exists = prepared.slot_exists;
    })
    .await?;

    let mut pause = Duration::ZERO;
    let mut copied = prepared_target.size_bytes;
    if !prepared_target.finished {
        // Initial copy: every table of the subscription ready.
        loop {
            check_abort(ctx, op).await?;
            let t = target(ctx, &dst, &mv, &db, MoveTargetStep::MoveTargetStatus, quick, |_| {}).await?;
            copied = t.size_bytes;
            if !t.subscribed {
                return Err(Stop::Retry("the target's subscription is gone".into()));
            }
            // Every published table listed by the subscription, and each copied.
            if t.tables_total >= prepared.published_tables && t.tables_ready == t.tables_total {
                break;
            }
            let mut text = format!(
                "initial_copy: {} of {} tables copied, {} of {}",
                t.tables_ready,
                t.tables_total,
                mib(t.size_bytes),
                mib(prepared.size_bytes)
            );
            if !t.error.is_empty() {
                text.push_str(&format!(" ({})", t.error));
            }
            progress.say(text).await?;
            tokio::time::sleep(POLL).await;
        }
        // Catch up until writers can be blocked for a moment only.
        loop {
            check_abort(ctx, op).await?;
            let s = source(ctx, &src, &mv, MoveSourceStep::MoveSourceStatus, quick, |_| {}).await?;
            if !s.slot_exists {
                return Err(Stop::Retry("the source lost the move's replication slot (failover?)".into()));
            }
            let behind = s.current_lsn.saturating_sub(s.confirmed_lsn);
            if behind <= CATCH_UP_BYTES {
                break;
            }
            progress.say(format!("catching_up: {} behind", mib(behind))).await?;
            tokio::time::sleep(POLL).await;
        }
        check_abort(ctx, op).await?;
        // The write block: from here on writers wait until the switch (or a rollback).
        progress.say("write_block".into()).await?;
        let blocked_at = Instant::now();
        let b = source(ctx, &src, &mv, MoveSourceStep::MoveSourceBlock, quick, |_| {}).await?;
        let block_took = blocked_at.elapsed();
        let deadline = Instant::now() + BLOCKED_WAIT;
        let mut confirmed = b.confirmed_lsn;
        while confirmed < b.block_lsn {
            if Instant::now() > deadline {
                return Err(Stop::Rollback(format!(
                    "the target did not apply the last writes within {}s of the write block; writers were let in \
                     again, try the move later",
                    BLOCKED_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let s = source(ctx, &src, &mv, MoveSourceStep::MoveSourceStatus, quick, |_| {}).await?;
            if !s.slot_exists {
                return Err(Stop::Retry("the source lost the move's replication slot (failover?)".into()));
            }
            confirmed = s.confirmed_lsn;
        }
        let applied_after = blocked_at.elapsed();
        check_abort(ctx, op).await?;
        target(ctx, &dst, &mv, &db, MoveTargetStep::MoveTargetFinish, quick, |r| {
            r.sequences = b.sequences.clone();
            r.schema_fingerprint = b.schema_fingerprint.clone();
        })
        .await?;
        pause = blocked_at.elapsed();
        tracing::info!(op = %op.id, sessions_ended = b.sessions_ended, block_ms = block_took.as_millis() as u64,
            applied_ms = applied_after.as_millis() as u64, finished_ms = pause.as_millis() as u64,
            "write block: writers blocked, the rest applied on the target, target finished");
    }

    progress.say("switch".into()).await?;
    let switch = Command::SwitchMove {
        operation_id: op.id.clone(),
        write_pause_ms: i64::try_from(pause.as_millis()).unwrap_or(i64::MAX),
        at: crate::now(),
    };
    match ctx.node.write(switch).await.map_err(|e| Stop::Retry(e.to_string()))? {
        Response::Done => {}
        Response::Conflict { message } => return Err(Stop::Rollback(message)),
        other => return Err(Stop::Abandon(format!("switch: {other:?}"))),
    }
    tracing::info!(op = %op.id, database = %db.id, from = %mv.source_cluster_id, to = %mv.target_cluster_id,
        write_pause_ms = pause.as_millis() as u64, "database switched to its new cluster");
    let mv = query::move_of(pool, &op.id).await.map_err(read)?.ok_or_else(|| Stop::Abandon("move vanished".into()))?;
    let done = cleanup(ctx, &mv, &mut progress).await?;
    Ok(format!("{done}; {} copied", mib(copied)))
}

/// After the switch: the source's copy and the move's objects go.
async fn cleanup(ctx: &Ctx, mv: &Move, progress: &mut Progress<'_>) -> Result<String, Stop> {
    progress.say("cleanup".into()).await?;
    let src = endpoint(ctx, &mv.source_cluster_id).await?;
    source(ctx, &src, mv, MoveSourceStep::MoveSourceDrop, Duration::from_secs(600), |_| {}).await?;
    Ok(format!(
        "moved from {} to {}; writes paused {} ms",
        mv.source_cluster_id, mv.target_cluster_id, mv.write_pause_ms
    ))
}

/// Rolls the move back: recorded first (so a new leader rolls back too), then the target's
/// copy goes and the source's writers are let in again. Letting writers in is retried until it
/// works: a blocked database must not stay blocked.
async fn rollback(ctx: &Ctx, op: &Operation, why: String) {
    tracing::warn!(op = %op.id, database = %op.database_id, %why, "rolling the move back");
    let cmd = Command::AbortMove {
        operation_id: op.id.clone(),
        reason: why.clone(),
        at: crate::now(),
        actor: "controlplane".into(),
    };
    match ctx.node.write(cmd).await {
        Ok(Response::Conflict { message }) => {
            // Switched meanwhile: nothing to roll back; the next attempt cleans up.
            tracing::warn!(op = %op.id, %message, "not rolled back");
            return;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(op = %op.id, error = %e, "recording the rollback failed; a leader will retry it");
            return;
        }
    }
    let mut attempt = 0u32;
    let leftovers = loop {
        if !ctx.node.is_leader() {
            return;
        }
        match undo(ctx, op).await {
            Ok(note) => break note,
            Err(e) => {
                attempt += 1;
                tracing::warn!(op = %op.id, attempt, error = %e, "rollback step failed; retrying");
                let _ = step(ctx, op, i64::from(attempt), "rolling_back").await;
                tokio::time::sleep(Duration::from_secs(2u64 << attempt.min(5))).await;
            }
        }
    };
    let error = if leftovers.is_empty() { why } else { format!("{why} ({leftovers})") };
    finish(ctx, op, false, error, "rolled back: the database stays on its source cluster".into()).await;
}

/// One rollback pass; `Ok` with a note about what was left behind on the target, if anything.
async fn undo(ctx: &Ctx, op: &Operation) -> Result<String, String> {
    let pool = ctx.node.store.pool();
    let mv = query::move_of(pool, &op.id).await.map_err(|e| e.to_string())?.ok_or("move vanished")?;
    let db = query::database(pool, &mv.database_id).await.map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let _ = step(ctx, op, op.attempts, "rolling_back").await;
    // The target first: its subscription stops streaming from the source's slot.
    let mut note = String::new();
    match endpoint(ctx, &mv.target_cluster_id).await {
        Ok(dst) => {
            if let Err(e) =
                target(ctx, &dst, &mv, &db, MoveTargetStep::MoveTargetAbort, Duration::from_secs(120), |_| {}).await
            {
                note = format!("the target's partial copy may be left on {}: {}", dst.host_id, e.message());
            }
        }
        Err(e) => note = format!("the target's partial copy may be left: {}", e.message()),
    }
    let src = endpoint(ctx, &mv.source_cluster_id).await.map_err(Stop::message)?;
    source(ctx, &src, &mv, MoveSourceStep::MoveSourceUnblock, Duration::from_secs(120), |_| {})
        .await
        .map_err(Stop::message)?;
    Ok(note)
}

/// Why a move was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    NotFound(String),
    /// Not allowed now, or the database cannot be moved as it is; the message says what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

/// What a start produced: the operation (None for a check only), where to, and what stops it.
#[derive(Debug, Clone, Default)]
pub struct Started {
    pub operation_id: Option<String>,
    pub target_cluster_id: String,
    pub problems: Vec<String>,
}

/// Starts moving `database_id` to cluster `to` (or to where placement puts it, away from its
/// cluster), after asking the source's agent what would stop the move. With `check_only`, only
/// answers where it would go and what stops it.
pub async fn start(
    ctx: &Ctx,
    database_id: &str,
    to: Option<&str>,
    requested_by: &str,
    check_only: bool,
) -> Result<Started, StartError> {
    use super::plan::{self, Avoid, Planned};
    use crate::state::model::db_state;
    let pool = ctx.node.store.pool();
    let storage = |e: sqlx::Error| StartError::Unavailable(format!("reading state: {e}"));
    let db = query::database(pool, database_id)
        .await
        .map_err(storage)?
        .ok_or_else(|| StartError::NotFound(format!("database {database_id} does not exist")))?;
    if db.state != db_state::ACTIVE && db.state != db_state::DEPRECATED {
        return Err(StartError::Refused(format!(
            "database {} is {}: only a live (active or deprecated) database can be moved",
            db.id, db.state
        )));
    }
    let source_cluster = query::cluster(pool, &db.cluster_id)
        .await
        .map_err(storage)?
        .ok_or_else(|| StartError::Unavailable(format!("cluster {} vanished", db.cluster_id)))?;
    let planned = match to {
        Some(id) => {
            let c = query::cluster(pool, id).await.map_err(storage)?.ok_or_else(|| {
                StartError::NotFound(format!("cluster {id} does not exist (see stewardctl clusters)"))
            })?;
            let refuse = |m: String| Err(StartError::Refused(m));
            if c.id == db.cluster_id {
                return refuse(format!("database {} is on cluster {id} already", db.id));
            }
            if c.state != cluster_state::READY {
                return refuse(format!("cluster {id} is {}: wait until it is ready", c.state));
            }
            if c.availability != db.availability {
                return refuse(format!(
                    "database {} has availability '{}' and cluster {id} is '{}': move it to a cluster of its kind",
                    db.id, db.availability, c.availability
                ));
            }
            if c.pg_major < source_cluster.pg_major {
                return refuse(format!(
                    "cluster {id} runs PostgreSQL {} and the database comes from {}: a move cannot go to an older \
                     major version",
                    c.pg_major, source_cluster.pg_major
                ));
            }
            let primary = query::host(pool, &c.primary_host).await.map_err(storage)?;
            if !primary.as_ref().is_some_and(|h| h.accepts_databases()) {
                return refuse(format!(
                    "the primary of cluster {id} ({}) is down or being drained: pick another cluster",
                    c.primary_host
                ));
            }
            let taken = plan::taken_names(pool, id).await.map_err(storage)?;
            let held = Default::default();
            Planned { cluster_id: c.id, new_cluster: None, new_members: vec![], taken_pg_names: taken, held }
        }
        None => {
            let single_host = if db.availability == "ha" { vec![] } else { vec![source_cluster.primary_host.clone()] };
            let avoid = Avoid { hosts: single_host, clusters: vec![db.cluster_id.clone()] };
            plan::plan_placement(pool, &ctx.placing, &db.availability, &avoid).await.map_err(|e| match e {
                plan::PlanError::NoPlace(p) => {
                    StartError::Refused(format!("no other cluster can take database {}: {p}", db.id))
                }
                plan::PlanError::Storage(s) => storage(s),
            })?
        }
    };
    // Names: the same as on the source when they are free there.
    let taken = &planned.taken_pg_names;
    let target_pg_name = if taken.contains(&db.pg_name) {
        super::placement::pg_name(&db.name, &db.id, taken)
    } else {
        db.pg_name.clone()
    };
    let target_role = if taken.contains(&db.role_name) { target_pg_name.clone() } else { db.role_name.clone() };

    let unavailable = |s: Stop| StartError::Unavailable(s.message());
    let src = endpoint(ctx, &db.cluster_id).await.map_err(unavailable)?;
    let at = crate::now();
    let mv = Move {
        operation_id: uuid::Uuid::new_v4().to_string(),
        database_id: db.id.clone(),
        source_cluster_id: db.cluster_id.clone(),
        source_pg_name: db.pg_name.clone(),
        source_role: db.role_name.clone(),
        target_cluster_id: planned.cluster_id.clone(),
        target_pg_name,
        target_role,
        move_password: plan::new_password(),
        requested_by: requested_by.to_string(),
        state: move_state::COPYING.into(),
        abort_reason: String::new(),
        write_pause_ms: 0,
        created_at: at.clone(),
        finished_at: String::new(),
    };
    let check = source(ctx, &src, &mv, MoveSourceStep::MoveSourceCheck, Duration::from_secs(30), |_| {})
        .await
        .map_err(unavailable)?;
    let mut started =
        Started { operation_id: None, target_cluster_id: planned.cluster_id.clone(), problems: check.problems };
    if check_only {
        return Ok(started);
    }
    if !started.problems.is_empty() {
        return Err(StartError::Refused(format!(
            "database {} cannot be moved yet:\n  - {}",
            db.id,
            started.problems.join("\n  - ")
        )));
    }
    let operation =
        Operation { id: mv.operation_id.clone(), ..Operation::start(crate::state::model::op_kind::MOVE, &db.id, &at) };
    let cmd = Command::StartMove {
        mv: mv.clone(),
        operation,
        new_cluster: planned.new_cluster,
        new_members: planned.new_members,
        actor: requested_by.to_string(),
    };
    match ctx.node.write(cmd).await.map_err(|e| StartError::Unavailable(e.to_string()))? {
        Response::Done => {}
        Response::Conflict { message } => return Err(StartError::Refused(message)),
        Response::NotFound { message } => return Err(StartError::NotFound(message)),
        other => return Err(StartError::Unavailable(format!("unexpected result {other:?}"))),
    }
    tracing::info!(op = %mv.operation_id, database = %db.id, from = %mv.source_cluster_id, to = %mv.target_cluster_id,
        by = requested_by, "move started");
    started.operation_id = Some(mv.operation_id);
    Ok(started)
}

/// Asks to roll back the running move of `database_id`; returns its operation id.
pub async fn abort(ctx: &Ctx, database_id: &str, actor: &str) -> Result<String, StartError> {
    let pool = ctx.node.store.pool();
    let mv = query::running_moves(pool)
        .await
        .map_err(|e| StartError::Unavailable(e.to_string()))?
        .into_iter()
        .find(|m| m.database_id == database_id)
        .ok_or_else(|| StartError::NotFound(format!("database {database_id} has no running move")))?;
    let cmd = Command::AbortMove {
        operation_id: mv.operation_id.clone(),
        reason: format!("aborted by {actor}"),
        at: crate::now(),
        actor: actor.to_string(),
    };
    match ctx.node.write(cmd).await.map_err(|e| StartError::Unavailable(e.to_string()))? {
        Response::Done => Ok(mv.operation_id),
        Response::Conflict { message } => Err(StartError::Refused(message)),
        Response::NotFound { message } => Err(StartError::NotFound(message)),
        other => Err(StartError::Unavailable(format!("unexpected result {other:?}"))),
    }
}
