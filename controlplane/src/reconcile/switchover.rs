//! Planned switchover of an HA cluster: stop the primary gracefully (its WAL reaches the
//! standbys), wait until the target has received everything, record the new primary at a new
//! epoch, promote it and repoint the others; the old primary rejoins as a standby. If the target
//! does not catch up, the old primary is restarted at a new epoch and nothing else changes.

use std::time::{Duration, Instant};

use steward_proto::v1::{AgentStatusRequest, EnsureInstanceRequest, FenceRequest};

use super::failover::{choose, promote_recorded, Candidate, SILENCE};
use super::topology::ensure_request;
use super::Ctx;
use crate::state::model::{cluster_state, member_role, Cluster, Host};
use crate::state::{query, Command, Response};

/// Why a switchover was refused or failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// Outcome of a switchover.
#[derive(Debug, Clone)]
pub struct Switched {
    pub old_primary: String,
    pub new_primary: String,
    pub epoch: u64,
    pub write_pause: Duration,
}

fn failed(e: impl std::fmt::Display) -> SwitchoverError {
    SwitchoverError::Failed(e.to_string())
}

async fn standby_lsn(ctx: &Ctx, hosts: &[Host], host_id: &str, cluster_id: &str) -> Option<Candidate> {
    let h = hosts.iter().find(|h| h.id == host_id)?;
    let mut agent = ctx.agents.get(&h.agent_addr).await.ok()?;
    let mut req = tonic::Request::new(AgentStatusRequest {});
    req.set_timeout(Duration::from_millis(800));
    let s = agent.status(req).await.ok()?.into_inner().instances.into_iter().find(|s| s.cluster_id == cluster_id)?;
    (s.running && s.in_recovery).then(|| Candidate {
        host_id: host_id.to_string(),
        received_lsn: s.received_lsn,
        replayed_lsn: s.replayed_lsn,
    })
}

/// Runs a switchover of `cluster_id` to `target` (or the most caught-up standby).
pub async fn run(ctx: &Ctx, cluster_id: &str, target: Option<&str>) -> Result<Switched, SwitchoverError> {
    if !ctx.claim(cluster_id) {
        return Err(SwitchoverError::Refused(format!(
            "another operation is changing cluster {cluster_id}; retry later"
        )));
    }
    let result = switch(ctx, cluster_id, target).await;
    ctx.release(cluster_id);
    result
}

async fn switch(ctx: &Ctx, cluster_id: &str, target: Option<&str>) -> Result<Switched, SwitchoverError> {
    let pool = ctx.node.store.pool();
    let refused = SwitchoverError::Refused;
    let cluster = query::cluster(pool, cluster_id)
        .await
        .map_err(failed)?
        .ok_or_else(|| refused(format!("cluster {cluster_id} does not exist")))?;
    if cluster.availability != "ha" || cluster.state != cluster_state::READY {
        return Err(refused(format!("cluster {cluster_id} is not a ready HA cluster")));
    }
    let members = query::members(pool, cluster_id).await.map_err(failed)?;
    let hosts = query::hosts(pool).await.map_err(failed)?;
    let primary_ok = ctx.liveness.get(&cluster.primary_host).is_some_and(|s| {
        Instant::now().saturating_duration_since(s.at) <= SILENCE
            && s.instances.iter().any(|i| i.cluster_id == cluster.id && i.running && !i.fenced && !i.in_recovery)
    });
    if !primary_ok {
        return Err(refused("the primary is not healthy: automatic failover handles that case".into()));
    }
    let mut candidates = Vec::new();
    for m in members.iter().filter(|m| m.role == member_role::STANDBY) {
        if target.is_none_or(|t| t == m.host_id) {
            if let Some(c) = standby_lsn(ctx, &hosts, &m.host_id, cluster_id).await {
                candidates.push(c);
            }
        }
    }
    let chosen = choose(&candidates).cloned().ok_or_else(|| {
        refused(match target {
            Some(t) => format!("{t} is not a streaming standby of {cluster_id}"),
            None => format!("{cluster_id} has no streaming standby to switch to"),
        })
    })?;
    let old = hosts.iter().find(|h| h.id == cluster.primary_host).ok_or_else(|| failed("primary host unknown"))?;
    tracing::warn!(cluster = %cluster_id, from = %old.id, to = %chosen.host_id, "switchover starting");

    let started = Instant::now();
    let mut agent = ctx.agents.get(&old.agent_addr).await.map_err(failed)?;
    let mut req = tonic::Request::new(FenceRequest {
        cluster_id: cluster_id.into(),
        epoch: cluster.epoch as u64,
        graceful: true,
    });
    req.set_timeout(Duration::from_secs(60));
    let final_lsn = match agent.fence(req).await {
        Ok(r) => r.into_inner().final_lsn,
        Err(s) => {
            restore(ctx, &cluster).await;
            return Err(failed(format!("stopping the primary on {}: {}", old.id, s.message())));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match standby_lsn(ctx, &hosts, &chosen.host_id, cluster_id).await {
            Some(c) if c.received_lsn >= final_lsn => break,
            _ if Instant::now() > deadline => {
                restore(ctx, &cluster).await;
                return Err(failed(format!(
                    "{} did not receive the primary's last WAL in time; the old primary was restarted",
                    chosen.host_id
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let cmd = Command::Failover {
        cluster_id: cluster_id.into(),
        from_epoch: cluster.epoch,
        new_primary: chosen.host_id.clone(),
        reason: "planned switchover".into(),
        at: crate::now(),
    };
    match ctx.node.write(cmd).await.map_err(failed)? {
        Response::Done => {}
        other => {
            restore(ctx, &cluster).await;
            return Err(failed(format!("recording the switchover: {other:?}")));
        }
    }
    promote_recorded(ctx, cluster_id, true).await.map_err(failed)?;
    let write_pause = started.elapsed();
    tracing::warn!(cluster = %cluster_id, new = %chosen.host_id, pause_ms = write_pause.as_millis() as u64, "switchover done");
    Ok(Switched {
        old_primary: old.id.clone(),
        new_primary: chosen.host_id,
        epoch: cluster.epoch as u64 + 1,
        write_pause,
    })
}

/// Rolls back a switchover that stopped the primary: re-records it as primary at a new epoch
/// (which lifts its fence) and starts it again.
async fn restore(ctx: &Ctx, cluster: &Cluster) {
    let cmd = Command::Failover {
        cluster_id: cluster.id.clone(),
        from_epoch: cluster.epoch,
        new_primary: cluster.primary_host.clone(),
        reason: "switchover rolled back".into(),
        at: crate::now(),
    };
    if let Err(e) = ctx.node.write(cmd).await {
        tracing::error!(cluster = %cluster.id, error = %e, "rolling back the switchover failed: automatic failover takes over");
        return;
    }
    let pool = ctx.node.store.pool();
    let (Ok(Some(c)), Ok(members), Ok(hosts)) =
        (query::cluster(pool, &cluster.id).await, query::members(pool, &cluster.id).await, query::hosts(pool).await)
    else {
        return;
    };
    let Some(m) = members.iter().find(|m| m.host_id == c.primary_host) else { return };
    let Some(req): Option<EnsureInstanceRequest> = ensure_request(&c, &members, &hosts, m, true) else { return };
    let Some(h) = hosts.iter().find(|h| h.id == m.host_id) else { return };
    if let Ok(mut a) = ctx.agents.get(&h.agent_addr).await {
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(60));
        if let Err(s) = a.ensure_instance(r).await {
            tracing::error!(cluster = %cluster.id, error = %s.message(), "restarting the old primary failed");
        }
    }
}
