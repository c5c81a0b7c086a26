//! Prometheus metrics end to end: one control-plane node and one real agent started with
//! `--metrics-listen`. After a database is created, the agent's plain-HTTP `/metrics` shows the
//! instance running with its cluster label, the host's certificate expiry and answered
//! heartbeats, and refuses anything but `GET /metrics`; the node's `/metrics` (HTTPS) shows it
//! leads, its commit index, certificate expiry, heartbeats, the provision operation by kind and
//! state, the host and the member the agent reported.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use reqwest::Method;
use steward_tests::{free_port, wait_for, Scratch, Stack};

/// One sample of the text format: name, labels as written, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: String,
    value: f64,
}

/// The samples of a scrape (comments and unparsable lines skipped).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            Some(Sample { name: name.into(), labels: labels.into(), value: value.parse().ok()? })
        })
        .collect()
}

/// The value of the first sample of `name` whose labels include every `k="v"` of `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && want.iter().all(|(k, v)| s.labels.split(',').any(|l| l == format!("{k}=\"{v}\""))))
        .map(|s| s.value)
}

/// The value of a label in a series' label text.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|l| l.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_control_plane_export_their_metrics() -> Result<()> {
    let scratch = Scratch::new("steward-metrics-")?;
    let listen = format!("127.0.0.1:{}", free_port());
    let stack = Stack::start_with(scratch.path(), &[], &["--metrics-listen", &listen]).await?;
    let team = stack.team("shop").await?;
    stack.active_database(&team, "orders").await?;

    // The agent: plain HTTP, no token.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let agent_url = format!("http://{listen}/metrics");
    let (agent, cluster) = wait_for("the agent's metrics to show the instance", Duration::from_secs(30), || async {
        let r = http.get(&agent_url).send().await?;
        ensure!(r.status() == 200, "GET /metrics: {}", r.status());
        let text = r.text().await?;
        let samples = parse(&text);
        let running = samples
            .iter()
            .find(|s| s.name == "steward_agent_instance_running" && s.value == 1.0)
            .and_then(|s| label(&s.labels, "cluster").map(str::to_string));
        Ok(running.map(|cluster| (samples, cluster)))
    })
    .await?;
    let host = [("host", "host-a")];
    let instance = [("cluster", cluster.as_str()), ("host", "host-a")];
    ensure!(value(&agent, "steward_agent_up", &[]) == Some(1.0), "steward_agent_up");
    ensure!(value(&agent, "steward_agent_info", &host) == Some(1.0), "no steward_agent_info for host-a");
    let expiry = value(&agent, "steward_agent_tls_cert_expiry_seconds", &host).context("agent cert expiry")?;
    ensure!(expiry > 0.0, "the agent's certificate expires in {expiry} s");
    let beats = value(&agent, "steward_agent_heartbeats_total", &host).context("agent heartbeats")?;
    ensure!(beats > 0.0, "the agent counted {beats} answered heartbeats");
    ensure!(value(&agent, "steward_agent_instances", &host) == Some(1.0), "instances");
    let primary = [("cluster", cluster.as_str()), ("host", "host-a"), ("role", "primary")];
    ensure!(value(&agent, "steward_agent_instance_role", &primary) == Some(1.0), "the instance is not primary");
    ensure!(value(&agent, "steward_agent_instance_fenced", &instance) == Some(0.0), "the instance is fenced");
    let timeline = value(&agent, "steward_agent_instance_timeline", &instance).context("timeline")?;
    ensure!(timeline >= 1.0, "timeline {timeline}");
    ensure!(
        value(&agent, "steward_agent_instance_write_probe_ok", &instance).is_some(),
        "a primary reports its write probe"
    );
    ensure!(
        value(&agent, "steward_agent_instance_replication_lag_bytes", &instance).is_none(),
        "a primary has no replay lag series"
    );
    // nothing but GET /metrics
    for (method, path) in [(Method::GET, "/"), (Method::GET, "/v1/databases"), (Method::POST, "/metrics")] {
        let r = http.request(method.clone(), format!("http://{listen}{path}")).send().await?;
        ensure!(r.status() == 404, "{method} {path}: {}", r.status());
    }

    // The control-plane node: HTTPS, no token either.
    let node = stack.node();
    let cp = wait_for("the node's metrics to show the member", Duration::from_secs(30), || async {
        let (s, v) = stack.rest.send(Method::GET, &node.url("/metrics"), None, None).await?;
        ensure!(s == 200, "GET /metrics: {s}");
        let samples = parse(v.as_str().unwrap_or_default());
        Ok((value(&samples, "steward_member_running", &instance) == Some(1.0)).then_some(samples))
    })
    .await?;
    ensure!(value(&cp, "steward_raft_is_leader", &[]) == Some(1.0), "the only node does not lead");
    ensure!(value(&cp, "steward_raft_leader_id", &[]) == Some(1.0), "leader id");
    ensure!(value(&cp, "steward_raft_term", &[]).is_some_and(|t| t >= 1.0), "raft term");
    ensure!(value(&cp, "steward_raft_voters", &[]) == Some(1.0), "voters");
    let commit = value(&cp, "steward_raft_commit_index", &[]).context("commit index")?;
    let applied = value(&cp, "steward_raft_last_applied", &[]).context("last applied")?;
    ensure!(commit > 0.0 && applied > 0.0, "commit {commit}, applied {applied}");
    let expiry = value(&cp, "steward_tls_cert_expiry_seconds", &[]).context("node cert expiry")?;
    ensure!(expiry > 0.0, "the node's certificate expires in {expiry} s");
    ensure!(value(&cp, "steward_heartbeats_total", &[]).is_some_and(|n| n > 0.0), "no heartbeats counted");
    ensure!(
        value(&cp, "steward_operations_by_kind", &[("kind", "provision"), ("state", "succeeded")]) == Some(1.0),
        "the provision operation is not counted"
    );
    ensure!(value(&cp, "steward_operations", &[("state", "succeeded")]).is_some_and(|n| n >= 1.0), "operations");
    ensure!(value(&cp, "steward_hosts", &[("state", "active")]) == Some(1.0), "active hosts");
    ensure!(
        value(&cp, "steward_host_info", &[("host", "host-a"), ("state", "active"), ("zone", "a")]) == Some(1.0),
        "host info"
    );
    let age = value(&cp, "steward_host_heartbeat_age_seconds", &host).context("heartbeat age")?;
    ensure!((0.0..10.0).contains(&age), "the last heartbeat is {age} s old");
    ensure!(value(&cp, "steward_databases", &[("state", "active")]) == Some(1.0), "active databases");
    ensure!(value(&cp, "steward_member_lag_bytes", &instance) == Some(0.0), "a primary's lag");
    ensure!(value(&cp, "steward_cluster_epoch", &[("cluster", cluster.as_str())]).is_some(), "cluster epoch");
    Ok(())
}
