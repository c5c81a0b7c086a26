//! Prometheus text exposition for the control plane: Raft progress, state counts and counters.
//!
//! Counts come from the node's local replica of the state, so every node exports them; what
//! agents report in heartbeats (running, lag, archiving, heartbeat ages, leases) only the leader
//! receives, so only the leader's series carry it. `docs/grafana-dashboard.json` charts these
//! names; a test below fails when it names one that is not exported here or by the agents.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::raft::node::RaftNode;
use crate::raft::{LogId, NodeId};
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
    /// gRPC connections accepted (TLS handshake done): peers, agents and stewardctl keep theirs
    /// open, so a rate that keeps climbing means some client reconnects per call.
    pub grpc_connections: AtomicU64,
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
    let gc = &node.proposals.stats;
    let _ = writeln!(
        out,
        "# HELP steward_raft_proposals_total Commands proposed on this node (group commit; its own and forwarded ones).\n\
         # TYPE steward_raft_proposals_total counter\nsteward_raft_proposals_total {}\n\
         # HELP steward_raft_proposal_entries_total Log entries those commands were proposed in (the ratio is the mean batch).\n\
         # TYPE steward_raft_proposal_entries_total counter\nsteward_raft_proposal_entries_total {}",
        gc.proposals.load(Ordering::Relaxed),
        gc.entries.load(Ordering::Relaxed),
    );
    raft_progress(&mut out, node.id, &rm);
    let expiry = steward_agent::metrics::seconds_until(node.tls.not_after(), SystemTime::now());
    let _ = writeln!(
        out,
        "# HELP steward_tls_cert_expiry_seconds Seconds until this node's TLS certificate expires (renewed after two thirds of its life).\n\
         # TYPE steward_tls_cert_expiry_seconds gauge\nsteward_tls_cert_expiry_seconds {expiry}"
    );
    let counters = [
        ("steward_heartbeats_total", "Agent heartbeats received.", &m.heartbeats),
        ("steward_registrations_total", "Agent registrations received.", &m.registrations),
        ("steward_databases_created_total", "Databases accepted for creation.", &m.databases_created),
        ("steward_agent_calls_failed_total", "Commands to agents that failed.", &m.agent_calls_failed),
        ("steward_failovers_total", "Failovers and switchovers this node carried out as leader.", &m.failovers),
        (
            "steward_grpc_connections_total",
            "gRPC connections accepted (mutual TLS handshake completed) from peers, agents and stewardctl.",
            &m.grpc_connections,
        ),
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
    operations_by_kind(&mut out, pool).await;
    host_metrics(&mut out, pool, liveness).await;
    cluster_metrics(&mut out, pool, liveness).await;
    out
}

/// Highest log index that a majority of `voters` has stored: the leader's commit index
/// (openraft 0.9 does not export it).
fn quorum_index(voters: &[NodeId], matched: &BTreeMap<NodeId, Option<LogId>>) -> u64 {
    let mut indexes: Vec<u64> =
        voters.iter().map(|v| matched.get(v).copied().flatten().map(|l| l.index).unwrap_or(0)).collect();
    indexes.sort_unstable_by(|a, b| b.cmp(a));
    indexes.get(voters.len() / 2).copied().unwrap_or(0)
}

/// Membership size, and on the leader the commit index and what each node has stored.
fn raft_progress(out: &mut String, me: NodeId, rm: &openraft::RaftMetrics<NodeId, crate::raft::NodeInfo>) {
    let voters: Vec<NodeId> = rm.membership_config.membership().voter_ids().collect();
    let learners = rm.membership_config.membership().learner_ids().count();
    let _ = writeln!(
        out,
        "# HELP steward_raft_voters Voting members of the Raft group (as this node knows it).\n\
         # TYPE steward_raft_voters gauge\nsteward_raft_voters {}\n\
         # HELP steward_raft_learners Non-voting members (nodes being added).\n\
         # TYPE steward_raft_learners gauge\nsteward_raft_learners {learners}",
        voters.len()
    );
    let _ = writeln!(
        out,
        "# HELP steward_raft_commit_index Highest log index a majority of voters stored (exported by the leader).\n\
         # TYPE steward_raft_commit_index gauge\n\
         # HELP steward_raft_matched_index Last log index each member stored, as the leader knows it.\n\
         # TYPE steward_raft_matched_index gauge\n\
         # HELP steward_raft_quorum_ack_age_ms Milliseconds since a quorum last acknowledged the leader.\n\
         # TYPE steward_raft_quorum_ack_age_ms gauge"
    );
    let Some(matched) = rm.replication.as_ref().filter(|_| rm.current_leader == Some(me)) else { return };
    let _ = writeln!(out, "steward_raft_commit_index {}", quorum_index(&voters, matched));
    for (peer, log) in matched {
        let _ = writeln!(
            out,
            "steward_raft_matched_index{{peer=\"{peer}\"}} {}",
            log.as_ref().map(|l| l.index).unwrap_or(0)
        );
    }
    if let Some(ms) = rm.millis_since_quorum_ack {
        let _ = writeln!(out, "steward_raft_quorum_ack_age_ms {ms}");
    }
}

/// Operations counted by kind (provision, restore, backup, move, ...) and state.
async fn operations_by_kind(out: &mut String, pool: &sqlx::SqlitePool) {
    let _ = writeln!(
        out,
        "# HELP steward_operations_by_kind Operations by kind and state (local replica).\n\
         # TYPE steward_operations_by_kind gauge"
    );
    let rows: Result<Vec<(String, String, i64)>, _> =
        sqlx::query_as("SELECT kind, state, COUNT(*) FROM operations GROUP BY kind, state ORDER BY kind, state")
            .fetch_all(pool)
            .await;
    for (kind, state, n) in rows.unwrap_or_default() {
        let _ =
            writeln!(out, "steward_operations_by_kind{{kind=\"{}\",state=\"{}\"}} {n}", label(&kind), label(&state));
    }
}

/// A label value escaped for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Each host's state as operators see it, and on the leader the age of its last heartbeat.
async fn host_metrics(out: &mut String, pool: &sqlx::SqlitePool, liveness: &Liveness) {
    let _ = writeln!(
        out,
        "# HELP steward_host_info Each host's state (active, down, draining, revoked), zone and agent version (value 1).\n\
         # TYPE steward_host_info gauge\n\
         # HELP steward_host_heartbeat_age_seconds Seconds since the host's last heartbeat reached this leader.\n\
         # TYPE steward_host_heartbeat_age_seconds gauge"
    );
    let Ok(hosts) = query::hosts(pool).await else { return };
    for h in &hosts {
        let _ = writeln!(
            out,
            "steward_host_info{{host=\"{}\",state=\"{}\",zone=\"{}\",agent_version=\"{}\"}} 1",
            label(&h.id),
            label(h.shown_state()),
            label(&h.zone),
            label(&h.agent_version)
        );
    }
    for h in &hosts {
        if let Some(seen) = liveness.get(&h.id) {
            let _ = writeln!(
                out,
                "steward_host_heartbeat_age_seconds{{host=\"{}\"}} {:.3}",
                label(&h.id),
                seen.at.elapsed().as_secs_f64()
            );
        }
    }
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
        "# HELP steward_cluster_lease_remaining_ms Milliseconds left on the lease this leader granted the cluster's primary.\n\
         # TYPE steward_cluster_lease_remaining_ms gauge"
    );
    let now = std::time::Instant::now();
    for c in &clusters {
        if let Some(until) = liveness.lease_until(&c.id) {
            let _ = writeln!(
                out,
                "steward_cluster_lease_remaining_ms{{cluster=\"{}\"}} {}",
                c.id,
                until.saturating_duration_since(now).as_millis()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP steward_member_info Recorded role of each member (value 1).\n# TYPE steward_member_info gauge\n\
         # HELP steward_member_running 1 when the member's PostgreSQL runs (per its agent).\n# TYPE steward_member_running gauge\n\
         # HELP steward_member_lag_bytes Replay lag behind the primary's WAL position.\n# TYPE steward_member_lag_bytes gauge"
    );
    for c in &clusters {
        let observed = |host: &str| liveness.instance(host, &c.id).1;
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn log_id(index: u64) -> Option<LogId> {
        Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index))
    }

    #[test]
    fn commit_index_is_what_a_majority_stored() {
        let matched: BTreeMap<NodeId, Option<LogId>> =
            [(1, log_id(10)), (2, log_id(7)), (3, None), (4, log_id(9))].into_iter().collect();
        assert_eq!(quorum_index(&[1], &matched), 10);
        assert_eq!(quorum_index(&[1, 2, 3], &matched), 7);
        assert_eq!(quorum_index(&[1, 2, 4], &matched), 9);
        // four voters need three: 10, 9 and 7 are at 7 or beyond
        assert_eq!(quorum_index(&[1, 2, 3, 4], &matched), 7);
        // a learner's progress (5 is not in `matched`) does not count
        assert_eq!(quorum_index(&[1, 5, 3], &matched), 0);
        assert_eq!(quorum_index(&[], &matched), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// Every metric name exported: the control plane's (the literals and `# TYPE` lines of the
    /// render code above the tests) and the agents' (the families their renderer announces,
    /// which it does even without instances).
    fn exported() -> BTreeSet<String> {
        let source = include_str!("metrics.rs");
        let code = source.split("#[cfg(test)]").next().unwrap_or_default();
        let mut names = BTreeSet::new();
        let name_at = |s: &str| -> String {
            s.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect()
        };
        for (i, _) in code.match_indices("steward_") {
            let before = &code[..i];
            if before.ends_with('"') || before.ends_with("# TYPE ") {
                names.insert(name_at(&code[i..]));
            }
        }
        let agent = steward_agent::metrics::render(&Default::default(), 0);
        names.extend(agent.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(name_at));
        names
    }

    /// Metric names a PromQL expression refers to.
    fn referenced(expr: &str) -> Vec<String> {
        expr.match_indices("steward_")
            .filter(|(i, _)| !expr[..*i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
            .map(|(i, _)| expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
            .collect()
    }

    fn panels(v: &Value) -> Vec<&Value> {
        let mut all = Vec::new();
        for p in v["panels"].as_array().into_iter().flatten() {
            all.push(p);
            all.extend(panels(p));
        }
        all
    }

    #[test]
    fn grafana_dashboard_charts_only_exported_metrics() {
        let exported = exported();
        for must in ["steward_raft_term", "steward_tls_cert_expiry_seconds", "steward_operations_by_kind"] {
            assert!(exported.contains(must), "{must} not found in {exported:?}");
        }
        assert!(exported.contains("steward_agent_instance_running"), "{exported:?}");
        let text = include_str!("../../docs/grafana-dashboard.json");
        let doc: Value = serde_json::from_str(text).expect("docs/grafana-dashboard.json is valid JSON");
        assert!(doc["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
        assert_eq!(doc["__inputs"][0]["name"], "DS_PROMETHEUS");
        assert_eq!(doc["__inputs"][0]["pluginId"], "prometheus");
        let all = panels(&doc);
        let mut ids = BTreeSet::new();
        let mut charted = BTreeSet::new();
        let mut exprs: Vec<(String, String)> = Vec::new();
        for p in &all {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            assert!(!title.is_empty(), "a panel without a title: {p}");
            assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id in {title}");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let targets = p["targets"].as_array().filter(|t| !t.is_empty()).expect("a panel with targets");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
                exprs.push((title.clone(), t["expr"].as_str().expect("a target expr").to_string()));
            }
        }
        for a in doc["annotations"]["list"].as_array().into_iter().flatten() {
            if let Some(e) = a["expr"].as_str() {
                exprs.push(("annotation".into(), e.to_string()));
            }
        }
        for (title, expr) in exprs {
            let names = referenced(&expr);
            assert!(!names.is_empty(), "{title}: {expr} names no steward metric");
            for n in names {
                assert!(exported.contains(&n), "panel {title:?} charts {n}, which nothing exports ({expr})");
                charted.insert(n);
            }
        }
        // what the dashboard is for
        for must in [
            "steward_raft_is_leader",
            "steward_raft_term",
            "steward_raft_last_applied",
            "steward_heartbeats_total",
            "steward_hosts",
            "steward_operations_by_kind",
            "steward_member_lag_bytes",
            "steward_archive_last_success_age_seconds",
            "steward_tls_cert_expiry_seconds",
            "steward_agent_tls_cert_expiry_seconds",
            "steward_failovers_total",
        ] {
            assert!(charted.contains(must), "the dashboard has no panel for {must}");
        }
    }
}
