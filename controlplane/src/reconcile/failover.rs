//! Failover of HA clusters, on the leader. A primary has failed when its host stops
//! heartbeating, or its agent reports PostgreSQL stopped, fenced or failing its write probe.
//! Nobody is promoted while the old primary may still hold its lease, unless its agent itself
//! reported it fenced. The standby with the highest received LSN is promoted at a new epoch
//! (recorded in Raft first), and the other members are repointed to it.

use std::time::{Duration, Instant};

use steward_proto::v1::{AgentStatusRequest, InstanceStatus, PromoteRequest};

use super::topology::{ensure_request, sync_names};
use super::Ctx;
use crate::state::model::{cluster_state, member_role, Cluster};
use crate::state::{query, Command, Response};

/// A primary silent for this long is considered failed (its lease still has to run out).
pub const SILENCE: Duration = Duration::from_millis(1000);
/// Extra wait past the lease, for clock-rate differences between hosts.
pub const LEASE_MARGIN: Duration = Duration::from_millis(300);

/// What a standby reported, for choosing whom to promote.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub host_id: String,
    pub received_lsn: u64,
    pub replayed_lsn: u64,
}

/// The standby to promote: highest received LSN, then replayed LSN, then host id.
pub fn choose(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().max_by(|a, b| {
        a.received_lsn
            .cmp(&b.received_lsn)
            .then(a.replayed_lsn.cmp(&b.replayed_lsn))
            .then_with(|| b.host_id.cmp(&a.host_id))
    })
}

/// Why the primary is considered failed, or `None` while it is healthy.
pub fn primary_failure(
    last_seen: Option<Instant>,
    status: Option<&InstanceStatus>,
    epoch: u64,
    now: Instant,
) -> Option<String> {
    let Some(seen) = last_seen else { return Some("no heartbeat from its host since this node leads".into()) };
    if now.saturating_duration_since(seen) > SILENCE {
        return Some(format!("host silent for {} ms", now.saturating_duration_since(seen).as_millis()));
    }
    let Some(s) = status else { return Some("its agent does not report the instance".into()) };
    if s.fenced {
        return Some("its agent fenced it".into());
    }
    if !s.running {
        return Some("PostgreSQL is not running".into());
    }
    if s.epoch == epoch && s.role == "primary" && !s.probe_ok {
        return Some(format!("write probe failing: {}", s.error));
    }
    None
}

/// Whether promoting someone else is safe: the old primary was reported fenced (stopped and
/// staying stopped), or every lease it may hold has run out.
pub fn safe_to_promote(fenced_reported: bool, lease_until: Option<Instant>, now: Instant) -> bool {
    fenced_reported || lease_until.is_none_or(|u| now > u + LEASE_MARGIN)
}

/// Checks every ready HA cluster and fails over those whose primary failed.
pub async fn check(ctx: &Ctx, leader_since: Instant) -> anyhow::Result<()> {
    let pool = ctx.node.store.pool();
    for cluster in query::ha_clusters_in_state(pool, cluster_state::READY).await? {
        if ctx.is_busy(&cluster.id) {
            continue;
        }
        let (last, status) = ctx.liveness.instance(&cluster.primary_host, &cluster.id);
        let now = Instant::now();
        let fresh = last.is_some_and(|l| now.saturating_duration_since(l) <= SILENCE);
        if fresh
            && status
                .as_ref()
                .is_some_and(|s| s.running && !s.fenced && (s.in_recovery || s.epoch < cluster.epoch as u64))
        {
            // A promotion was recorded but not carried out (e.g. the previous leader died
            // mid-way): finish it.
            tracing::warn!(cluster = %cluster.id, primary = %cluster.primary_host, "recorded primary is not serving yet: resuming promotion");
            if let Err(e) = promote_recorded(ctx, &cluster.id, false).await {
                tracing::warn!(cluster = %cluster.id, error = %e, "resuming promotion failed; will retry");
            }
            continue;
        }
        let Some(reason) = primary_failure(last, status.as_ref(), cluster.epoch as u64, now) else { continue };
        let fenced = fresh && status.as_ref().is_some_and(|s| s.fenced);
        // A new leader does not know what its predecessor granted: assume a full lease from
        // when it took over.
        let lease_until = ctx
            .liveness
            .lease_until(&cluster.id)
            .max(Some(leader_since + Duration::from_millis(u64::from(super::topology::DEFAULT_LEASE_MS))));
        if !safe_to_promote(fenced, lease_until, now) {
            tracing::debug!(cluster = %cluster.id, %reason, "primary failed; waiting for its lease to run out");
            continue;
        }
        if let Err(e) = fail_over(ctx, &cluster, &reason).await {
            tracing::warn!(cluster = %cluster.id, error = %e, "failover attempt failed; will retry");
        }
    }
    Ok(())
}

async fn fail_over(ctx: &Ctx, cluster: &Cluster, reason: &str) -> anyhow::Result<()> {
    let pool = ctx.node.store.pool();
    let members = query::members(pool, &cluster.id).await?;
    let hosts = query::hosts(pool).await?;
    let mut candidates = Vec::new();
    for m in members.iter().filter(|m| m.role == member_role::STANDBY) {
        let Some(h) = hosts.iter().find(|h| h.id == m.host_id) else { continue };
        let mut agent = ctx.agents.get(&h.agent_addr).await?;
        let mut req = tonic::Request::new(AgentStatusRequest {});
        req.set_timeout(Duration::from_millis(800));
        match agent.status(req).await {
            Ok(r) => {
                if let Some(s) = r.into_inner().instances.into_iter().find(|s| s.cluster_id == cluster.id) {
                    if s.running && s.in_recovery {
                        candidates.push(Candidate {
                            host_id: m.host_id.clone(),
                            received_lsn: s.received_lsn,
                            replayed_lsn: s.replayed_lsn,
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster.id, host = %m.host_id, error = %e.message(), "standby unreachable")
            }
        }
    }
    let Some(chosen) = choose(&candidates).cloned() else {
        anyhow::bail!("primary failed ({reason}) but no standby is reachable and streaming");
    };
    tracing::warn!(cluster = %cluster.id, old = %cluster.primary_host, new = %chosen.host_id, lsn = chosen.received_lsn, %reason, "failing over");
    let cmd = Command::Failover {
        cluster_id: cluster.id.clone(),
        from_epoch: cluster.epoch,
        new_primary: chosen.host_id.clone(),
        reason: reason.to_string(),
        at: crate::now(),
    };
    match ctx.node.write(cmd).await? {
        Response::Done => {}
        other => anyhow::bail!("recording the failover: {other:?}"),
    }
    promote_recorded(ctx, &cluster.id, false).await
}

/// Carries out the promotion recorded in the state (also after a leader change mid-way):
/// promote the recorded primary at the recorded epoch, then repoint the standbys.
/// `old_fenced`: the caller itself fenced the old primary (switchover).
pub async fn promote_recorded(ctx: &Ctx, cluster_id: &str, old_fenced: bool) -> anyhow::Result<()> {
    let pool = ctx.node.store.pool();
    let cluster = query::cluster(pool, cluster_id).await?.ok_or_else(|| anyhow::anyhow!("cluster vanished"))?;
    let members = query::members(pool, cluster_id).await?;
    let hosts = query::hosts(pool).await?;
    let primary_host =
        hosts.iter().find(|h| h.id == cluster.primary_host).ok_or_else(|| anyhow::anyhow!("primary host unknown"))?;
    let others: Vec<&str> =
        members.iter().filter(|m| m.host_id != cluster.primary_host).map(|m| m.host_id.as_str()).collect();
    let now = Instant::now();
    let old_primary_fenced = old_fenced
        || members.iter().filter(|m| m.role == member_role::FAILED).all(|m| {
            ctx.liveness.get(&m.host_id).is_some_and(|s| {
                now.saturating_duration_since(s.at) <= SILENCE
                    && s.instances.iter().any(|i| i.cluster_id == cluster.id && i.fenced && !i.running)
            })
        });
    let mut agent = ctx.agents.get(&primary_host.agent_addr).await?;
    let mut req = tonic::Request::new(PromoteRequest {
        cluster_id: cluster.id.clone(),
        epoch: cluster.epoch as u64,
        synchronous_standby_names: sync_names(&others),
        slots: others.iter().map(|h| steward_agent::host::slot_for(h)).collect(),
        old_primary_fenced,
    });
    req.set_timeout(Duration::from_secs(60));
    agent.promote(req).await.map_err(|s| anyhow::anyhow!("promoting {}: {}", cluster.primary_host, s.message()))?;
    tracing::warn!(cluster = %cluster.id, primary = %cluster.primary_host, epoch = cluster.epoch, "promoted");
    ctx.metrics.failovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Repoint the remaining standbys (failed members rejoin separately, when they come back).
    for m in members.iter().filter(|m| m.role == member_role::STANDBY) {
        let Some(req) = ensure_request(&cluster, &members, &hosts, m, true) else { continue };
        let Some(h) = hosts.iter().find(|h| h.id == m.host_id) else { continue };
        let mut a = ctx.agents.get(&h.agent_addr).await?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(120));
        if let Err(s) = a.ensure_instance(r).await {
            tracing::warn!(cluster = %cluster.id, standby = %m.host_id, error = %s.message(), "repointing standby failed; the rejoin loop retries");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_received_lsn_wins() {
        let c = vec![
            Candidate { host_id: "a".into(), received_lsn: 10, replayed_lsn: 9 },
            Candidate { host_id: "b".into(), received_lsn: 12, replayed_lsn: 5 },
            Candidate { host_id: "c".into(), received_lsn: 12, replayed_lsn: 7 },
        ];
        assert_eq!(choose(&c).map(|c| c.host_id.as_str()), Some("c"));
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn failure_reasons() {
        let now = Instant::now();
        let ok =
            InstanceStatus { running: true, role: "primary".into(), probe_ok: true, epoch: 2, ..Default::default() };
        assert_eq!(primary_failure(Some(now), Some(&ok), 2, now), None);
        assert!(primary_failure(None, Some(&ok), 2, now).is_some());
        assert!(primary_failure(Some(now), Some(&ok), 2, now + Duration::from_secs(2)).unwrap().contains("silent"));
        let dead = InstanceStatus { running: false, ..ok.clone() };
        assert!(primary_failure(Some(now), Some(&dead), 2, now).unwrap().contains("not running"));
        let stuck = InstanceStatus { probe_ok: false, error: "timeout".into(), ..ok.clone() };
        assert!(primary_failure(Some(now), Some(&stuck), 2, now).unwrap().contains("probe"));
        let fenced = InstanceStatus { fenced: true, ..ok };
        assert!(primary_failure(Some(now), Some(&fenced), 2, now).unwrap().contains("fenced"));
    }

    #[test]
    fn promotion_waits_for_the_lease_unless_fenced() {
        let now = Instant::now();
        let until = Some(now + Duration::from_secs(1));
        assert!(!safe_to_promote(false, until, now));
        assert!(safe_to_promote(true, until, now));
        assert!(safe_to_promote(false, until, now + Duration::from_secs(2)));
    }
}
