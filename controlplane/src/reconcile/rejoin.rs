//! Brings failed members (former primaries) back as standbys of the current primary once their
//! host heartbeats again: the agent rewinds (or re-clones) and follows the new timeline.

use std::time::{Duration, Instant};

use super::failover::SILENCE;
use super::topology::ensure_request;
use super::Ctx;
use crate::state::model::{cluster_state, member_role};
use crate::state::{query, Command};

/// Rejoins every failed member whose host is back.
pub async fn check(ctx: &Ctx) -> anyhow::Result<()> {
    let pool = ctx.node.store.pool();
    for cluster in query::clusters(pool).await? {
        if cluster.availability != "ha" || cluster.state != cluster_state::READY {
            continue;
        }
        let members = query::members(pool, &cluster.id).await?;
        let Some(failed) = members.iter().find(|m| m.role == member_role::FAILED) else { continue };
        let fresh = ctx
            .liveness
            .get(&failed.host_id)
            .is_some_and(|s| Instant::now().saturating_duration_since(s.at) <= SILENCE);
        // The primary must be serving at the current epoch before anyone follows it.
        let primary_ok = ctx.liveness.get(&cluster.primary_host).is_some_and(|s| {
            s.instances
                .iter()
                .any(|i| i.cluster_id == cluster.id && i.running && !i.in_recovery && i.epoch == cluster.epoch as u64)
        });
        if !fresh || !primary_ok {
            continue;
        }
        let hosts = query::hosts(pool).await?;
        let Some(mut req) = ensure_request(&cluster, &members, &hosts, failed, true) else { continue };
        req.role = member_role::STANDBY.into();
        let Some(h) = hosts.iter().find(|h| h.id == failed.host_id) else { continue };
        let mut agent = ctx.agents.get(&h.agent_addr).await?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(300));
        tracing::info!(cluster = %cluster.id, host = %failed.host_id, "rejoining former primary as standby");
        match agent.ensure_instance(r).await {
            Ok(_) => {
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
            Err(s) => {
                tracing::warn!(cluster = %cluster.id, host = %failed.host_id, error = %s.message(), "rejoin failed; will retry")
            }
        }
    }
    Ok(())
}
