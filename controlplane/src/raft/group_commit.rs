//! Group commit on the leader: proposals that arrive while earlier ones are still being
//! appended are gathered into one log entry ([`Command::Batch`]), so one append (one fsync on
//! every node) and one replication round serve many REST requests. openraft 0.9 appends each
//! `client_write` separately, inside its core task, so without this the log store's fsync and the
//! core's per-entry work cap writes/s regardless of how many clients wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::node::ForwardReply;
use super::Raft;
use crate::state::{Command, Response};

/// Most commands in one entry: bounds the entry size (a few hundred KiB at most) and the apply
/// transaction.
const MAX_BATCH: usize = 256;

/// Entries proposed and not yet answered at once. While it is in flight, new proposals wait and
/// form the next batch. One, because the cost of a write is per entry (an fsync on every node, an
/// AppendEntries to each follower, an apply transaction on every node), not per command: with
/// four in flight a 2,000 writes/s load made 1,070-1,250 entries/s of 1.6-1.9 commands each,
/// with one 530-590 entries/s of 3.4-3.8, and REST p99 at that load fell from 12.6-18.1 ms to
/// 7.7-9.0 ms while closed-loop writes/s rose by a sixth (docs/benchmarks.md, round 7).
/// openraft's core handles entries one at a time anyway, so more in flight bought little overlap.
const MAX_IN_FLIGHT: usize = 1;

/// Proposals waiting in the queue before `propose` pushes back (the REST layer's own limits and
/// timeouts keep it far below this in practice).
const QUEUE: usize = 16_384;

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<ForwardReply>,
}

/// Counts for `/metrics`: `proposals / entries` is the mean number of commands per entry.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// Commands proposed on this node (its own and those forwarded to it).
    pub proposals: AtomicU64,
    /// Log entries they were proposed in.
    pub entries: AtomicU64,
}

/// Handle to the group-commit task of one node; cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Proposal>,
    /// Proposal and entry counts since start.
    pub stats: Arc<GroupCommitStats>,
}

impl GroupCommit {
    /// Starts the task that batches proposals to `raft`.
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(GroupCommitStats::default());
        tokio::spawn(run(raft, rx, stats.clone()));
        Self { tx, stats }
    }

    /// Proposes `cmd` (on this node, which should be the leader) and waits for its answer.
    pub async fn propose(&self, cmd: Command) -> ForwardReply {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Proposal { cmd, reply }).await.is_err() {
            return ForwardReply::Error("the Raft proposal queue is closed (node shutting down)".into());
        }
        rx.await.unwrap_or_else(|_| ForwardReply::Error("the Raft proposal was dropped (node shutting down)".into()))
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Proposal>, stats: Arc<GroupCommitStats>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: whatever arrives meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (raft, stats) = (raft.clone(), stats.clone());
        tokio::spawn(async move {
            stats.proposals.fetch_add(batch.len() as u64, Ordering::Relaxed);
            stats.entries.fetch_add(1, Ordering::Relaxed);
            propose_batch(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn propose_batch(raft: &Raft, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        if let Some(p) = batch.pop() {
            let _ = p.reply.send(reply_of(raft.client_write(p.cmd).await.map(|r| (r.data, r.log_id.index))));
        }
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<ForwardReply>>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let n = commands.len();
    let started = std::time::Instant::now();
    match raft.client_write(Command::Batch { commands }).await {
        Ok(r) => {
            let index = r.log_id.index;
            tracing::debug!(index, commands = n, ms = started.elapsed().as_secs_f64() * 1e3, "batch entry applied");
            match r.data {
                Response::Batch { responses } if responses.len() == n => {
                    for (reply, resp) in replies.into_iter().zip(responses) {
                        let _ = reply.send(ForwardReply::Ok(resp, index));
                    }
                }
                other => {
                    let msg = format!("a batch of {n} commands was answered with {other:?}");
                    tracing::error!(%msg, "group commit");
                    for reply in replies {
                        let _ = reply.send(ForwardReply::Error(msg.clone()));
                    }
                }
            }
        }
        Err(e) => {
            let reply = reply_of(Err(e));
            for r in replies {
                let _ = r.send(reply.clone());
            }
        }
    }
}

fn reply_of(r: Result<(Response, u64), RaftError<u64, ClientWriteError<u64, super::NodeInfo>>>) -> ForwardReply {
    match r {
        Ok((resp, index)) => ForwardReply::Ok(resp, index),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            ForwardReply::NotLeader { leader: f.leader_id }
        }
        Err(e) => ForwardReply::Error(e.to_string()),
    }
}
