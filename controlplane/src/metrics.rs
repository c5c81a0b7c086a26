//! Prometheus text exposition for the control plane: Raft progress, state counts and counters.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::raft::node::RaftNode;
use crate::reconcile::liveness::Liveness;
use crate::state::query;

/// Counters updated by the request paths.
#[derive(Debug, Default)]
pub struct Metrics {
    pub heartbeats: AtomicU64,
    pub registrations: AtomicU64,
    pub databases_created: AtomicU64,
    pub agent_calls_failed: AtomicU64,
    pub failovers: AtomicU64,
}

/// Renders every metric as Prometheus text.
pub async fn render(node: &RaftNode, m: &Metrics, liveness: &Liveness) -> String {
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
        ("steward_failovers_total", "Failovers and switchovers this node carried out as leader.", &m.failovers),
    ];
    for (name, help, c) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.load(Ordering::Relaxed));
    }
    let pool = node.store.pool();
    for (table, metric) in [
        ("databases", "steward_databases"),
        ("hosts", "steward_hosts"),
        ("operations", "steward_operations"),
        ("backups", "steward_backups"),
        ("moves", "steward_moves"),
    ] {
        let _ = writeln!(out, "# HELP {metric} Count by state (local replica).\n# TYPE {metric} gauge");
        if let Ok(rows) = query::count_by_state(pool, table).await {
            for (state, n) in rows {
                let _ = writeln!(out, "{metric}{{state=\"{state}\"}} {n}");
            }
        }
    }
    cluster_metrics(&mut out, pool, liveness).await;
    out
}

/// Per-cluster epoch and per-member role, state and replication lag. Observed values (running,
/// lag) come from agents' heartbeats, which only the leader receives.
async fn cluster_metrics(out: &mut String, pool: &sqlx::SqlitePool, liveness: &Liveness) {
    let Ok(clusters) = query::clusters(pool).await else { return };
    let _ = writeln!(
        out,
        "# HELP steward_cluster_epoch Promotion epoch of each cluster.\n# TYPE steward_cluster_epoch gauge"
    );
    for c in &clusters {
        let _ = writeln!(out, "steward_cluster_epoch{{cluster=\"{}\"}} {}", c.id, c.epoch);
    }
    let _ = writeln!(
        out,
        "# HELP steward_member_info Recorded role of each member (value 1).\n# TYPE steward_member_info gauge\n\
         # HELP steward_member_running 1 when the member's PostgreSQL runs (per its agent).\n# TYPE steward_member_running gauge\n\
         # HELP steward_member_lag_bytes Replay lag behind the primary's WAL position.\n# TYPE steward_member_lag_bytes gauge"
    );
    for c in &clusters {
        let observed =
            |host: &str| liveness.get(host).and_then(|s| s.instances.into_iter().find(|i| i.cluster_id == c.id));
        let primary_lsn = observed(&c.primary_host).map(|i| i.received_lsn).unwrap_or(0);
        let Ok(members) = query::members(pool, &c.id).await else { continue };
        for m in members {
            let o = observed(&m.host_id).unwrap_or_default();
            let labels = format!("cluster=\"{}\",host=\"{}\"", c.id, m.host_id);
            let lag = if m.host_id == c.primary_host { 0 } else { primary_lsn.saturating_sub(o.replayed_lsn) };
            let _ = writeln!(out, "steward_member_info{{{labels},role=\"{}\",state=\"{}\"}} 1", m.role, m.state);
            let _ = writeln!(out, "steward_member_running{{{labels}}} {}", u8::from(o.running));
            let _ = writeln!(out, "steward_member_lag_bytes{{{labels}}} {lag}");
        }
    }
    archive_metrics(out, &clusters, liveness);
}

/// WAL archiving on each cluster's primary, as its agent last reported it.
fn archive_metrics(out: &mut String, clusters: &[crate::state::model::Cluster], liveness: &Liveness) {
    let _ = writeln!(
        out,
        "# HELP steward_archive_queue_files WAL files waiting in the primary's archive queue (alert when it grows).\n\
         # TYPE steward_archive_queue_files gauge\n\
         # HELP steward_archive_failures_total Failed archive_command calls on the primary since its statistics reset.\n\
         # TYPE steward_archive_failures_total counter\n\
         # HELP steward_archive_last_success_age_seconds Seconds since the primary last archived a WAL file (-1: never).\n\
         # TYPE steward_archive_last_success_age_seconds gauge\n\
         # HELP steward_backup_last_success_age_seconds Seconds since the cluster's newest complete backup finished (-1: none).\n\
         # TYPE steward_backup_last_success_age_seconds gauge\n\
         # HELP steward_repository_bytes Bytes the cluster's backups and WAL take in the backup repository.\n\
         # TYPE steward_repository_bytes gauge"
    );
    let now = chrono::Utc::now().timestamp();
    for c in clusters {
        let Some(o) = liveness
            .get(&c.primary_host)
            .and_then(|s| s.instances.into_iter().find(|i| i.cluster_id == c.id && i.archiving))
        else {
            continue;
        };
        let labels = format!("cluster=\"{}\",host=\"{}\"", c.id, c.primary_host);
        let age = if o.archive_last_success_unix > 0 { (now - o.archive_last_success_unix).max(0) } else { -1 };
        let _ = writeln!(out, "steward_archive_queue_files{{{labels}}} {}", o.archive_queue);
        let _ = writeln!(out, "steward_archive_failures_total{{{labels}}} {}", o.archive_failures);
        let _ = writeln!(out, "steward_archive_last_success_age_seconds{{{labels}}} {age}");
        let backup_age = if o.backup_last_success_unix > 0 { (now - o.backup_last_success_unix).max(0) } else { -1 };
        let _ = writeln!(out, "steward_backup_last_success_age_seconds{{{labels}}} {backup_age}");
        let _ = writeln!(out, "steward_repository_bytes{{{labels}}} {}", o.repository_bytes);
    }
}
