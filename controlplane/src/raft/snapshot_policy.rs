//! When a node builds a snapshot. openraft's own policy counts log entries, but an entry's size
//! depends on how many writes group commit put into it: at 2,000 writes/s in small batches,
//! 10,000 entries came every ~10 s, and each snapshot copied and wrote the whole state (50 MiB at
//! 60,000 teams) on every node. Here a snapshot also waits until the log written since the last
//! one is at least half the size of that snapshot, so the disk never writes more snapshot than
//! twice the log, whatever the batch sizes. A cap on entries still bounds the log.
//!
//! Nodes also take turns ([`turn_wait`]): every node applies the same entries, so without turns
//! all of them would find a snapshot due in the same half second and copy and write the whole
//! state at once. One node at a time leaves a quorum of nodes that are not busy with a snapshot,
//! so commits stay fast; on a shared disk it also divides the burst by the number of nodes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Raft;

/// How often the policy looks at the log.
const EVERY: Duration = Duration::from_millis(500);

/// Length of each node's turn to start a snapshot: longer than a snapshot takes to build (about a
/// second for 60 MiB), so a snapshot ends before the next node's turn begins.
pub const TURN: Duration = Duration::from_secs(4);

/// A snapshot is built at the latest after this many times `snapshot_logs` entries, however
/// small they are: it bounds the log, and the replay after a host reboot.
pub const MAX_ENTRIES_FACTOR: u64 = 10;

/// Bytes of log entries appended on this node since start (the log store counts them).
#[derive(Debug, Default)]
pub struct LogBytes(AtomicU64);

impl LogBytes {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the policy knows at one look.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Entries applied since the last snapshot.
    pub entries: u64,
    /// Bytes of log appended since the last snapshot.
    pub log_bytes: u64,
    /// Size of the last snapshot (0 when there is none).
    pub snapshot_bytes: u64,
}

/// Whether to build a snapshot now, with `snapshot_logs` the configured minimum of entries.
pub fn due(p: Progress, snapshot_logs: u64) -> bool {
    p.entries >= snapshot_logs
        && (p.log_bytes.saturating_mul(2) >= p.snapshot_bytes
            || p.entries >= snapshot_logs.saturating_mul(MAX_ENTRIES_FACTOR))
}

/// How long to wait, at `now_ms` (Unix time), for the start of the turn of the node at
/// `position` among `nodes` members: turns of `turn_ms` follow each other in the order of the
/// node ids, on the wall clock all nodes share (NTP keeps them within milliseconds). Zero at
/// the start of the turn or in its first tenth (a policy tick late), and for a single node.
pub fn turn_wait(now_ms: u64, position: u64, nodes: u64, turn_ms: u64) -> u64 {
    if nodes <= 1 {
        return 0;
    }
    let turn_ms = turn_ms.max(1);
    let cycle = nodes * turn_ms;
    let start = (position % nodes) * turn_ms;
    let into = now_ms % cycle;
    if into >= start && into - start <= turn_ms / 10 {
        return 0;
    }
    (start + cycle - into) % cycle
}

/// This node's position among the members (voters and learners, by id) and their number.
fn position(m: &openraft::RaftMetrics<super::NodeId, super::NodeInfo>) -> (u64, u64) {
    let ids: Vec<super::NodeId> = m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
    let at = ids.iter().position(|id| *id == m.id).unwrap_or(0);
    (at as u64, ids.len() as u64)
}

/// Runs the policy for `raft` until the node stops: `snapshot_file` is the local snapshot.
pub fn start(raft: Raft, snapshot_logs: u64, bytes: Arc<LogBytes>, snapshot_file: PathBuf) {
    tokio::spawn(async move {
        // (snapshot index, log bytes counted when this node first saw it)
        let mut last: Option<(Option<u64>, u64)> = None;
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let m = raft.metrics().borrow().clone();
            if m.running_state.is_err() {
                return;
            }
            let snapshot = m.snapshot.map(|l| l.index);
            let since_bytes = match last {
                Some((s, b)) if s == snapshot => b,
                _ => {
                    last = Some((snapshot, bytes.total()));
                    bytes.total()
                }
            };
            let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
            let snapshot_bytes = tokio::fs::metadata(&snapshot_file).await.map(|md| md.len()).unwrap_or(0);
            let p = Progress {
                entries: applied.saturating_sub(snapshot.unwrap_or(0)),
                log_bytes: bytes.total().saturating_sub(since_bytes),
                snapshot_bytes,
            };
            if due(p, snapshot_logs) {
                let (at, nodes) = position(&m);
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                let wait = turn_wait(now_ms, at, nodes, TURN.as_millis() as u64);
                tracing::debug!(
                    entries = p.entries,
                    log_bytes = p.log_bytes,
                    snapshot_bytes,
                    wait_ms = wait,
                    "snapshot due"
                );
                tokio::time::sleep(Duration::from_millis(wait)).await;
                if raft.trigger().snapshot().await.is_err() {
                    return;
                }
                // Give the build time to finish before looking again.
                let mut rx = raft.metrics();
                let _ = tokio::time::timeout(
                    Duration::from_secs(60),
                    rx.wait_for(|m| m.snapshot.map(|l| l.index) != snapshot || m.running_state.is_err()),
                )
                .await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_waits_for_enough_entries_and_log_bytes() {
        let p = |entries, log_bytes, snapshot_bytes| Progress { entries, log_bytes, snapshot_bytes };
        // Not enough entries, whatever the bytes.
        assert!(!due(p(99, 1 << 30, 0), 100));
        // The first snapshot: nothing to compare with.
        assert!(due(p(100, 10, 0), 100));
        // Small entries against a large state: wait until the log is half the snapshot...
        assert!(!due(p(5_000, 20 << 20, 50 << 20), 1_000));
        assert!(due(p(5_000, 25 << 20, 50 << 20), 1_000));
        // ...or until the cap on entries.
        assert!(!due(p(999, 1, 50 << 20), 100));
        assert!(due(p(1_000, 1, 50 << 20), 100));
    }

    #[test]
    fn nodes_take_turns_in_the_order_of_their_ids() {
        // Three nodes, turns of 4 s: a 12 s cycle; node 1's turn is 4-8 s into it.
        assert_eq!(turn_wait(12_000, 1, 3, 4_000), 4_000);
        assert_eq!(turn_wait(13_000, 1, 3, 4_000), 3_000);
        assert_eq!(turn_wait(16_000, 1, 3, 4_000), 0);
        // A tick late is still the turn; later in it, the node waits for its next one.
        assert_eq!(turn_wait(16_300, 1, 3, 4_000), 0);
        assert_eq!(turn_wait(17_000, 1, 3, 4_000), 11_000);
        // The last node's turn ends where the first node's begins.
        assert_eq!(turn_wait(23_000, 2, 3, 4_000), 9_000);
        assert_eq!(turn_wait(23_000, 0, 3, 4_000), 1_000);
        // Whatever the time, the turns of different nodes never start within one turn of each
        // other, and nobody waits longer than a cycle.
        for now in (0..30_000).step_by(250) {
            let starts: Vec<u64> = (0..3).map(|at| now + turn_wait(now, at, 3, 4_000)).collect();
            for (i, a) in starts.iter().enumerate() {
                assert!(*a - now <= 12_000);
                for b in &starts[i + 1..] {
                    assert!(a.abs_diff(*b) >= 3_600, "{now}: {starts:?}");
                }
            }
        }
        // A single node never waits.
        assert_eq!(turn_wait(5_123, 0, 1, 4_000), 0);
    }
}
