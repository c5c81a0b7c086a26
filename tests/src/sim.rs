//! A simulated agent speaking the real gRPC protocol (register + heartbeats, following the
//! leader), for tests that need hosts but not PostgreSQL; and an operator client.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use steward_proto::v1::control_plane_client::ControlPlaneClient;
use steward_proto::v1::operator_client::OperatorClient;
use steward_proto::v1::{HeartbeatRequest, HostFacts, RegisterRequest};
use tonic::transport::Channel;

fn channel(addr: &str) -> Result<Channel> {
    crate::tls::operator_channel(addr)
}

/// Facts of a fake host with plenty of capacity.
pub fn facts(host_id: &str) -> HostFacts {
    HostFacts {
        host_id: host_id.into(),
        hostname: host_id.into(),
        agent_addr: "127.0.0.1:9".into(),
        zone: "sim".into(),
        cores: 4,
        memory_bytes: 8 << 30,
        disk_free_bytes: 100 << 30,
        disk_total_bytes: 200 << 30,
        data_path: "/nonexistent".into(),
        agent_version: "sim".into(),
        pg_major: 15,
        pg_host: "127.0.0.1".into(),
        pg_port: 5432,
        memory_budget_bytes: 4 << 30,
    }
}

/// Registers `host_id` and heartbeats every 300 ms until the returned task is aborted (it is
/// aborted on drop of the handle by the caller, and ends by itself after `lifetime`).
pub fn spawn_host(nodes: Vec<String>, host_id: &str, lifetime: Duration) -> tokio::task::JoinHandle<()> {
    let host_id = host_id.to_string();
    tokio::spawn(async move {
        let end = Instant::now() + lifetime;
        heartbeat_loop(&nodes, &host_id, Duration::from_millis(300), end, |_, _| {}).await;
    })
}

/// A simulated agent with an agent certificate for `host_id`: registers, then heartbeats every
/// `every` until `end`, following the leader hint (or the next node) after a failure.
/// `on_beat(sent, latency)` is called for each answered heartbeat.
pub async fn heartbeat_loop(
    nodes: &[String],
    host_id: &str,
    every: Duration,
    end: Instant,
    mut on_beat: impl FnMut(Instant, Duration),
) {
    let f = facts(host_id);
    let material = match crate::tls::host_material(host_id) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("simulated host {host_id}: no certificate: {e:#}");
            return;
        }
    };
    let Some(first) = nodes.first() else { return };
    let mut target = first.clone();
    let mut i = 0usize;
    let mut registered = false;
    let mut client: Option<ControlPlaneClient<Channel>> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        if client.is_none() {
            match crate::tls::channel_with(&target, &material) {
                Ok(ch) => client = Some(ControlPlaneClient::new(ch)),
                Err(_) => return,
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let sent = Instant::now();
        let r = if registered {
            let mut req = tonic::Request::new(HeartbeatRequest { facts: Some(f.clone()), instances: vec![] });
            req.set_timeout(Duration::from_secs(5));
            c.heartbeat(req).await.map(|r| r.into_inner().known)
        } else {
            let mut req = tonic::Request::new(RegisterRequest { facts: Some(f.clone()) });
            req.set_timeout(Duration::from_secs(5));
            c.register(req).await.map(|_| true)
        };
        match r {
            Ok(known) => {
                if registered {
                    on_beat(sent, sent.elapsed());
                }
                registered = known;
            }
            Err(s) => {
                client = None;
                match s.metadata().get("x-steward-leader").and_then(|v| v.to_str().ok()) {
                    Some(l) => target = l.to_string(),
                    None => {
                        i = (i + 1) % nodes.len();
                        target = nodes[i].clone();
                    }
                }
            }
        }
    }
}

/// Operator gRPC client for `addr` with the admin token attached to each request by [`op_req`].
pub fn operator(addr: &str) -> Result<OperatorClient<Channel>> {
    Ok(OperatorClient::new(channel(addr).context("operator channel")?))
}

/// Wraps a message with the admin token.
pub fn op_req<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r.set_timeout(Duration::from_secs(30));
    r
}
