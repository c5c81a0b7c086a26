//! Registration and heartbeats towards the control plane. The agent tries the configured
//! control-plane nodes in turn and follows the leader hint a follower returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::control_plane_client::ControlPlaneClient;
use steward_proto::v1::{HeartbeatRequest, HostFacts, RegisterRequest};
use tonic::transport::Channel;

use crate::host::Host;

/// Metadata key with the leader's address on a follower's UNAVAILABLE reply.
const LEADER_HINT: &str = "x-steward-leader";

/// Current facts of this host.
pub async fn facts(host: &Host) -> HostFacts {
    let res = crate::facts::host_resources(&host.cfg.data_path).ok();
    let host_id = host.state.lock().await.host_id.clone();
    HostFacts {
        host_id,
        hostname: crate::facts::hostname(),
        agent_addr: host.cfg.advertise.clone(),
        zone: host.cfg.zone.clone(),
        cores: res.as_ref().map(|r| r.cores).unwrap_or(0),
        memory_bytes: res.as_ref().map(|r| r.memory_bytes).unwrap_or(0),
        disk_free_bytes: res.as_ref().map(|r| r.disk_free_bytes).unwrap_or(0),
        disk_total_bytes: res.as_ref().map(|r| r.disk_total_bytes).unwrap_or(0),
        data_path: host.cfg.data_path.display().to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        pg_major: host.pg_major,
        pg_host: host.cfg.pg_host.clone(),
        pg_port: u32::from(host.cfg.pg_port),
        memory_budget_bytes: host.memory_budget(),
    }
}

/// A request that gives up after 2 s: a stuck node must not hold heartbeats back.
fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(2));
    r
}

fn client(host: &Host, addr: &str) -> Option<ControlPlaneClient<Channel>> {
    let ch = steward_proto::tls::transport::channel(addr, host.cp_tls.clone(), Duration::from_millis(500)).ok()?;
    Some(ControlPlaneClient::new(ch))
}

/// Runs registration and heartbeats until the task is dropped. A heartbeat goes out every
/// interval the control plane asks for, and at once when the monitor saw a change.
pub async fn run(host: Arc<Host>) {
    let nodes = host.cfg.control_plane.clone();
    let mut target = nodes.first().cloned().unwrap_or_default();
    let mut next = 0usize;
    let mut registered = false;
    let mut interval = Duration::from_millis(1000);
    let mut failures = 0u32;
    let mut cached: Option<(String, ControlPlaneClient<Channel>)> = None;
    let counters = crate::metrics::heartbeat_counters(&host.state.lock().await.host_id);
    loop {
        let c = match &cached {
            Some((t, c)) if *t == target => Some(c.clone()),
            _ => client(&host, &target),
        };
        let Some(mut c) = c else {
            tracing::error!(control_plane = %target, "invalid control-plane address");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        };
        cached = Some((target.clone(), c.clone()));
        let f = facts(&host).await;
        let sent = Instant::now();
        let result = if registered {
            let instances = host.statuses().await;
            match c.heartbeat(timed(HeartbeatRequest { facts: Some(f), instances })).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if !r.known {
                        tracing::warn!("control plane does not know this host: registering again");
                        registered = false;
                    }
                    let mut rt = host.runtime.lock().await;
                    for g in &r.leases {
                        rt.entry(g.cluster_id.clone())
                            .or_default()
                            .lease
                            .granted(sent, Duration::from_millis(u64::from(g.lease_ms)));
                    }
                    Ok(r.heartbeat_interval_ms)
                }
                Err(e) => Err(e),
            }
        } else {
            c.register(timed(RegisterRequest { facts: Some(f) })).await.map(|r| {
                let r = r.into_inner();
                tracing::info!(host_id = %r.host_id, control_plane = %target, "registered with the control plane");
                registered = true;
                r.heartbeat_interval_ms
            })
        };
        match result {
            Ok(ms) => {
                counters.answered();
                failures = 0;
                interval = Duration::from_millis(u64::from(ms.max(50)));
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = host.wake.notified() => {}
                }
            }
            Err(status) => {
                counters.failed();
                failures += 1;
                cached = None;
                let hint = status.metadata().get(LEADER_HINT).and_then(|v| v.to_str().ok()).map(str::to_string);
                match hint {
                    Some(leader) if leader != target => target = leader,
                    _ => {
                        next = (next + 1) % nodes.len().max(1);
                        target = nodes.get(next).cloned().unwrap_or_default();
                    }
                }
                if failures % 20 == 1 {
                    tracing::warn!(error = %status.message(), next = %target, "control plane call failed; retrying");
                }
                tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
            }
        }
    }
}
