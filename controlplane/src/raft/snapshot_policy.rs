//! When a node builds a snapshot. openraft's own policy counts log entries, but an entry's size
//! depends on how many writes group commit put into it: at 2,000 writes/s in small batches,
//! 10,000 entries came every ~10 s, and each snapshot copied and wrote the whole state (50 MiB at
//! 60,000 teams) on every node. Here a snapshot also waits until the log written since the last
//! one is at least half the size of that snapshot, so the disk never writes more snapshot than
//! twice the log, whatever the batch sizes. A cap on entries still bounds the log.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Raft;

/// How often the policy looks at the log.
const EVERY: Duration = Duration::from_millis(500);

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
                tracing::debug!(entries = p.entries, log_bytes = p.log_bytes, snapshot_bytes, "snapshot due");
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
}
