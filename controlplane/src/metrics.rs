//! Prometheus text exposition for the control plane: Raft progress, state counts and counters.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::raft::node::RaftNode;
use crate::state::query;

/// Counters updated by the request paths.
#[derive(Debug, Default)]
pub struct Metrics {
    pub heartbeats: AtomicU64,
    pub registrations: AtomicU64,
    pub databases_created: AtomicU64,
    pub agent_calls_failed: AtomicU64,
}

/// Renders every metric as Prometheus text.
pub async fn render(node: &RaftNode, m: &Metrics) -> String {
    let mut out = String::new();
    let rm = node.raft.metrics().borrow().clone();
    let is_leader = u8::from(rm.current_leader == Some(node.id));
    let gauges: [(&str, &str, u64); 7] = [
        ("steward_raft_term", "Current Raft term.", rm.current_term),
        ("steward_raft_is_leader", "1 when this node is the Raft leader.", u64::from(is_leader)),
        ("steward_raft_leader_id", "Id of the known leader (0 if none).", rm.current_leader.unwrap_or(0)),
        ("steward_raft_last_log_index", "Index of the last log entry.", rm.last_log_index.unwrap_or(0)),
        (
            "steward_raft_last_applied",
            "Index of the last applied entry.",
            rm.last_applied.map(|l| l.index).unwrap_or(0),
        ),
        (
            "steward_raft_snapshot_index",
            "Index covered by the latest snapshot.",
            rm.snapshot.map(|l| l.index).unwrap_or(0),
        ),
        (
            "steward_raft_snapshots_installed",
            "Snapshots received from a leader since start.",
            node.stats.snapshots_installed.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let counters = [
        ("steward_heartbeats_total", "Agent heartbeats received.", &m.heartbeats),
        ("steward_registrations_total", "Agent registrations received.", &m.registrations),
        ("steward_databases_created_total", "Databases accepted for creation.", &m.databases_created),
        ("steward_agent_calls_failed_total", "Commands to agents that failed.", &m.agent_calls_failed),
    ];
    for (name, help, c) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.load(Ordering::Relaxed));
    }
    let pool = node.store.pool();
    for (table, metric) in
        [("databases", "steward_databases"), ("hosts", "steward_hosts"), ("operations", "steward_operations")]
    {
        let _ = writeln!(out, "# HELP {metric} Count by state (local replica).\n# TYPE {metric} gauge");
        if let Ok(rows) = query::count_by_state(pool, table).await {
            for (state, n) in rows {
                let _ = writeln!(out, "{metric}{{state=\"{state}\"}} {n}");
            }
        }
    }
    out
}
