//! Brings members back to following the current primary once it serves: failed members (former
//! primaries) whose host heartbeats again rejoin as standbys (the agent rewinds or re-clones and
//! follows the new timeline), and standbys still at an older epoch — a promotion whose leader
//! died before it repointed them — are repointed. Without the latter, a new primary with
//! synchronous replication would wait for a standby that still follows the dead primary, and no
//! commit would finish.

use std::time::{Duration, Instant};

use super::failover::SILENCE;
use super::topology::ensure_request;
use super::Ctx;
use crate::state::model::{cluster_state, member_role, Cluster, Host, Member};
use crate::state::{query, Command};

/// Rejoins every failed member whose host is back and repoints stale standbys.
pub async fn check(ctx: &Ctx) -> anyhow::Result<()> {
    let pool = ctx.node.store.pool();
    let clusters = query::ha_clusters_in_state(pool, cluster_state::READY).await?;
    // Read once per pass, not per cluster: thousands of clusters share a few hundred hosts.
    let hosts = if clusters.is_empty() { Vec::new() } else { query::hosts(pool).await? };
    for cluster in clusters {
        // The primary must be serving at the current epoch before anyone follows it.
        let primary_ok = ctx
            .liveness
            .instance(&cluster.primary_host, &cluster.id)
            .1
            .is_some_and(|i| i.running && !i.in_recovery && i.epoch == cluster.epoch as u64);
        if !primary_ok {
            continue;
        }
        let members = query::members(pool, &cluster.id).await?;
        let fresh = |host_id: &str| {
            ctx.liveness.get(host_id).filter(|s| Instant::now().saturating_duration_since(s.at) <= SILENCE)
        };
        // A switchover repoints its standbys itself.
        if !ctx.is_busy(&cluster.id) {
            for m in members.iter().filter(|m| m.role == member_role::STANDBY) {
                let stale = fresh(&m.host_id).is_some_and(|s| {
                    s.instances.iter().any(|i| i.cluster_id == cluster.id && i.epoch < cluster.epoch as u64)
                });
                if stale {
                    tracing::warn!(cluster = %cluster.id, host = %m.host_id, epoch = cluster.epoch,
                        "standby still follows an older primary: repointing it");
                    if let Err(e) = follow(ctx, &cluster, &members, &hosts, m).await {
                        tracing::warn!(cluster = %cluster.id, host = %m.host_id, error = %e, "repointing failed; will retry");
                    }
                }
            }
        }
        let Some(failed) = members.iter().find(|m| m.role == member_role::FAILED) else { continue };
        if fresh(&failed.host_id).is_none() {
            continue;
        }
        tracing::info!(cluster = %cluster.id, host = %failed.host_id, "rejoining former primary as standby");
        match follow(ctx, &cluster, &members, &hosts, failed).await {
            Ok(()) => {
                ctx.node
                    .write(Command::SetMember {
                        cluster_id: cluster.id.clone(),
                        host_id: failed.host_id.clone(),
                        role: member_role::STANDBY.into(),
                        state: cluster_state::READY.into(),
                        at: crate::now(),
                    })
                    .await?;
                tracing::info!(cluster = %cluster.id, host = %failed.host_id, "former primary rejoined as standby");
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster.id, host = %failed.host_id, error = %e, "rejoin failed; will retry")
            }
        }
    }
    Ok(())
}

/// Makes `member` a standby of the cluster's current primary at its current epoch.
async fn follow(
    ctx: &Ctx,
    cluster: &Cluster,
    members: &[Member],
    hosts: &[Host],
    member: &Member,
) -> anyhow::Result<()> {
    let mut req = ensure_request(cluster, members, hosts, member, true)
        .ok_or_else(|| anyhow::anyhow!("member {} has no host", member.host_id))?;
    req.role = member_role::STANDBY.into();
    let h = hosts.iter().find(|h| h.id == member.host_id).ok_or_else(|| anyhow::anyhow!("host vanished"))?;
    let mut agent = ctx.agents.get(&h.agent_addr).await?;
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(300));
    agent.ensure_instance(r).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(())
}
