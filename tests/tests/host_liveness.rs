//! Host liveness: a host that stops heartbeating is marked `down` (a state change, replicated),
//! and marked `active` again when it comes back; operators see it through `stewardctl`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use steward_tests::sim::spawn_host;
use steward_tests::{admin_token, bin, wait_for, wait_leader, Node, Rest, Scratch};

fn stewardctl(node: &Node, token_file: &std::path::Path, args: &[&str]) -> Result<Value> {
    let out = std::process::Command::new(bin("stewardctl"))
        .arg("--tls-dir")
        .arg(steward_tests::tls::operator_dir())
        .args(["--server", &node.grpc, "--token-file", &token_file.display().to_string(), "--output", "json"])
        .args(args)
        .output()
        .context("running stewardctl")?;
    ensure!(out.status.success(), "stewardctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("stewardctl output is not JSON")
}

fn host_state(hosts: &Value, id: &str) -> Option<String> {
    hosts.as_array()?.iter().find(|h| h["id"] == id).and_then(|h| h["state"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_host_goes_down_and_comes_back() -> Result<()> {
    let scratch = Scratch::new("steward-liveness-")?;
    let (token_file, _admin) = admin_token(scratch.path())?;
    let mut node = Node::new(scratch.path(), 1, &token_file, &["--host-down-after-ms", "1500"]);
    let m = node.member();
    node.args.extend(["--initial-member".to_string(), m]);
    node.start()?;
    let rest = Rest::default();
    wait_leader(&rest, &[&node], Duration::from_secs(30)).await?;

    let host = spawn_host(vec![node.grpc.clone()], "sim-host-1", Duration::from_secs(60));
    wait_for("the host to be active", Duration::from_secs(15), || async {
        Ok((host_state(&stewardctl(&node, &token_file, &["hosts"])?, "sim-host-1").as_deref() == Some("active"))
            .then_some(()))
    })
    .await?;
    let status = stewardctl(&node, &token_file, &["raft", "status"])?;
    ensure!(status["leader_id"] == 1 && status["members"].as_array().map(Vec::len) == Some(1), "raft status: {status}");

    host.abort();
    wait_for("the silent host to be marked down", Duration::from_secs(15), || async {
        Ok((host_state(&stewardctl(&node, &token_file, &["hosts"])?, "sim-host-1").as_deref() == Some("down"))
            .then_some(()))
    })
    .await?;
    let (_, metrics) = rest.send(reqwest::Method::GET, &node.url("/metrics"), None, None).await?;
    ensure!(metrics.as_str().unwrap_or("").contains("steward_hosts{state=\"down\"} 1"), "metrics: {metrics}");

    let host = spawn_host(vec![node.grpc.clone()], "sim-host-1", Duration::from_secs(60));
    wait_for("the host to come back", Duration::from_secs(15), || async {
        Ok((host_state(&stewardctl(&node, &token_file, &["hosts"])?, "sim-host-1").as_deref() == Some("active"))
            .then_some(()))
    })
    .await?;
    host.abort();
    Ok(())
}
