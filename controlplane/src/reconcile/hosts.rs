//! Marks hosts `down` when their heartbeats stop (a Raft write only on the transition).

use std::time::Instant;

use super::liveness::is_overdue;
use super::Ctx;
use crate::state::model::host_state;
use crate::state::{query, Command};

/// Proposes `down` for every active host whose heartbeat is overdue.
pub async fn mark_overdue(ctx: &Ctx, leader_since: Instant) -> anyhow::Result<()> {
    let now = Instant::now();
    for host in query::hosts(ctx.node.store.pool()).await? {
        if host.state != host_state::ACTIVE {
            continue;
        }
        let last = ctx.liveness.last_seen(&host.id);
        if is_overdue(last, leader_since, now, ctx.down_after) {
            tracing::warn!(host_id = %host.id, down_after_ms = ctx.down_after.as_millis() as u64, "host missed its heartbeats: marking down");
            ctx.node
                .write(Command::SetHostState { host_id: host.id, state: host_state::DOWN.into(), at: crate::now() })
                .await?;
        }
    }
    Ok(())
}
