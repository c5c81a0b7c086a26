//! The agent's watch over its instances, several times a second: observe (running, role, LSNs,
//! a write probe that must commit to local disk in time), then enforce (fence a primary whose
//! lease ran out or whose postmaster died; restart crashed standbys and single instances; keep
//! peer leases fresh).

use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::agent_client::AgentClient;
use steward_proto::v1::PeerLeaseRequest;

use crate::host::Host;
use crate::state::ClusterRecord;

/// How often instances are observed.
pub const INTERVAL: Duration = Duration::from_millis(200);
/// A write probe slower than this counts as a failure (a stuck disk).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Bound on observing one instance (status queries and the probe).
pub const OBSERVE_TIMEOUT: Duration = Duration::from_millis(2000);

/// Observes every instance and updates the shared runtime status.
pub async fn observe_all(host: &Host) {
    let records = host.state.lock().await.clusters.clone();
    for (id, rec) in records {
        let began = Instant::now();
        let status = match tokio::time::timeout(OBSERVE_TIMEOUT, observe(host, &id, &rec)).await {
            Ok(s) => s,
            Err(_) => steward_proto::v1::InstanceStatus {
                cluster_id: id.clone(),
                epoch: rec.epoch,
                port: u32::from(rec.port),
                running: true,
                role: rec.role.clone(),
                error: format!("PostgreSQL did not answer within {} ms", OBSERVE_TIMEOUT.as_millis()),
                ..Default::default()
            },
        };
        let mut rt = host.runtime.lock().await;
        let e = rt.entry(id).or_default();
        e.observed_at = Some(began);
        let changed = e.status.running != status.running || e.status.probe_ok != status.probe_ok;
        e.status = status;
        drop(rt);
        if changed {
            host.wake.notify_one();
        }
    }
}

async fn observe(host: &Host, id: &str, rec: &ClusterRecord) -> steward_proto::v1::InstanceStatus {
    let mut s = steward_proto::v1::InstanceStatus {
        cluster_id: id.into(),
        epoch: rec.epoch,
        port: u32::from(rec.port),
        ..Default::default()
    };
    let inst = match host.instance(id, rec).await {
        Ok(i) => i,
        Err(e) => {
            s.error = e.to_string();
            return s;
        }
    };
    s.running = inst.is_running().await;
    if !s.running {
        s.role = "stopped".into();
        return s;
    }
    match inst.replication_status().await {
        Ok(r) => {
            s.in_recovery = r.in_recovery;
            s.timeline = r.timeline;
            s.received_lsn = r.received_lsn;
            s.replayed_lsn = r.replayed_lsn;
            s.role = if r.in_recovery { "standby".into() } else { "primary".into() };
        }
        Err(e) => s.error = e.to_string(),
    }
    if s.role == "primary" {
        match inst.write_probe(PROBE_TIMEOUT).await {
            Ok(_) => s.probe_ok = true,
            Err(e) => s.error = format!("write probe: {e}"),
        }
        refresh_archiver(host, id, &inst).await;
    } else if let Some(r) = host.runtime.lock().await.get_mut(id) {
        r.archiver = None; // only a primary archives
    }
    s
}

/// How often a primary's archiver state is read: alerting needs seconds, not every tick, and
/// each read costs a connection.
const ARCHIVER_EVERY: Duration = Duration::from_secs(5);

/// Reads the archiver's state of a primary that archives, unless it was read recently; kept in
/// the runtime and merged into heartbeats by `Host::statuses`. Best effort: archiving stats
/// never fail an observation.
async fn refresh_archiver(host: &Host, id: &str, inst: &crate::pg::Instance) {
    if inst.spec().archive.is_none() {
        return;
    }
    let due =
        host.runtime.lock().await.get(id).and_then(|r| r.archiver).is_none_or(|(at, _)| at.elapsed() >= ARCHIVER_EVERY);
    if !due {
        return;
    }
    if let Ok(a) = inst.archiver_status().await {
        if let Some(r) = host.runtime.lock().await.get_mut(id) {
            r.archiver = Some((Instant::now(), a));
        }
    }
}

/// Runs observation and enforcement forever, as two loops: a hung PostgreSQL can stall an
/// observation, but never the lease check that fences it.
pub async fn run(host: Arc<Host>) {
    let observer = {
        let host = host.clone();
        async move {
            let mut tick = tokio::time::interval(INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                observe_all(&host).await;
            }
        }
    };
    let enforcer = async move {
        let mut tick = tokio::time::interval(INTERVAL / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            enforce(&host).await;
        }
    };
    tokio::join!(observer, enforcer);
}

async fn enforce(host: &Arc<Host>) {
    let now = Instant::now();
    // While a command changes instances (initdb, clone, start, promote), "not running" is
    // expected: only lease expiry is acted on then. Records first, then the lock: a command
    // admits its record while holding the lock, so a record seen here was either admitted by
    // a command still busy now, or by one that finished (and then `stale` below applies).
    let records = host.state.lock().await.clusters.clone();
    let busy = host.ops.try_lock().is_err();
    for (id, rec) in records {
        let (running, lease, start_peers, stale) = {
            let mut rt = host.runtime.lock().await;
            let e = rt.entry(id.clone()).or_default();
            // An observation that began before the last command finished may predate a start.
            let stale = e.applied_at.is_some_and(|a| e.observed_at.is_none_or(|o| o < a));
            if e.status.running
                && !e.was_running
                && e.lease.boot_grace_until.is_none()
                && now < host.started + lease_of(&rec)
            {
                // Already running when this agent started: keep it for one lease period while
                // the first heartbeats fetch a lease.
                e.lease.boot_grace_until = Some(host.started + lease_of(&rec));
            }
            if e.status.running {
                e.was_running = true;
            }
            // Only a primary that just proved it can commit asks its peers to vouch for it: a hung
            // one must lose its lease.
            let healthy = e.status.running
                && e.status.probe_ok
                && e.observed_at.is_some_and(|t| t.elapsed() < 2 * INTERVAL + PROBE_TIMEOUT);
            let start_peers = healthy && !rec.peer_agents.is_empty() && !e.peer_refresh;
            if start_peers {
                e.peer_refresh = true;
            }
            (e.status.running, e.lease, start_peers, stale)
        };
        let busy = busy || stale;
        if rec.fenced {
            if running {
                host.fence(&id, "fenced member found running").await;
            }
            continue;
        }
        if rec.is_primary() && rec.lease_ms > 0 {
            if running && !lease.valid(now) {
                host.fence(&id, "lease expired: no grant from the control plane and not every standby acknowledged")
                    .await;
            } else if !running && !busy {
                // Died, or was down when the agent started: never restart an HA primary on our
                // own; the control plane fails over and this member rejoins as a standby.
                host.fence(&id, "PostgreSQL is not running").await;
            } else if start_peers {
                tokio::spawn(refresh_peer_lease(host.clone(), id.clone(), rec.clone()));
                continue;
            }
        } else if !running && !busy {
            restart(host, &id, &rec).await;
        }
        if start_peers {
            if let Some(e) = host.runtime.lock().await.get_mut(&id) {
                e.peer_refresh = false;
            }
        }
    }
}

fn lease_of(rec: &ClusterRecord) -> Duration {
    Duration::from_millis(u64::from(rec.lease_ms))
}

async fn restart(host: &Arc<Host>, id: &str, rec: &ClusterRecord) {
    let now = Instant::now();
    let due = host.runtime.lock().await.get(id).and_then(|r| r.next_restart).is_none_or(|t| now >= t);
    if !due {
        return;
    }
    let Ok(_ops) = host.ops.try_lock() else {
        return; // a command is changing instances right now
    };
    tracing::warn!(cluster = %id, role = %rec.role, "PostgreSQL is not running: starting it");
    let result = host.apply_locked(id, rec).await;
    let mut rt = host.runtime.lock().await;
    let e = rt.entry(id.to_string()).or_default();
    match result {
        Ok(_) => {
            e.restart_failures = 0;
            e.next_restart = None;
        }
        Err(err) => {
            e.restart_failures += 1;
            let wait = restart_backoff(e.restart_failures);
            e.next_restart = Some(Instant::now() + wait);
            tracing::error!(cluster = %id, error = %err, retry_in_ms = wait.as_millis() as u64, "restarting PostgreSQL failed");
        }
    }
}

/// Wait before the next restart after `failures` failed ones: 0.5 s doubling up to 30 s.
pub fn restart_backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.saturating_sub(1).min(6))).min(Duration::from_secs(30))
}

/// Asks every standby's agent to acknowledge this primary; all must agree for the peer lease.
async fn refresh_peer_lease(host: Arc<Host>, id: String, rec: ClusterRecord) {
    let sent = Instant::now();
    let mut all = true;
    for peer in &rec.peer_agents {
        let granted = async {
            let ch = host.peers.get(peer).ok()?;
            let mut req = tonic::Request::new(PeerLeaseRequest {
                cluster_id: id.clone(),
                epoch: rec.epoch,
                lease_ms: rec.lease_ms,
            });
            req.set_timeout(Duration::from_millis(300));
            AgentClient::new(ch).peer_lease(req).await.ok().map(|r| r.into_inner().granted)
        }
        .await
        .unwrap_or(false);
        all &= granted;
    }
    let mut rt = host.runtime.lock().await;
    let e = rt.entry(id).or_default();
    if all {
        e.lease.peers_acknowledged(sent, lease_of(&rec));
    }
    e.peer_refresh = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_grows_and_caps() {
        assert_eq!(restart_backoff(1), Duration::from_millis(500));
        assert_eq!(restart_backoff(2), Duration::from_secs(1));
        assert_eq!(restart_backoff(20), Duration::from_secs(30));
    }
}
