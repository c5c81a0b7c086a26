//! Host drains: an operator marks a host draining (it takes no new databases); this loop moves
//! every live database with an instance on it to a cluster elsewhere, one move at a time per
//! host, through the same move operation an operator starts by hand.

use super::Ctx;
use crate::state::model::db_state;
use crate::state::query;

/// Starts the next move for every draining host that has none running. What stops a host's
/// drain (no other cluster fits, a table that cannot be replicated) is kept for operators to see
/// and logged when it changes.
pub async fn check(ctx: &Ctx) -> Result<(), String> {
    let pool = ctx.node.store.pool();
    let hosts = query::hosts(pool).await.map_err(|e| e.to_string())?;
    let draining: Vec<_> = hosts.into_iter().filter(|h| h.draining).collect();
    if draining.is_empty() {
        return Ok(());
    }
    let running = query::running_moves(pool).await.map_err(|e| e.to_string())?;
    for host in draining {
        let dbs = query::live_databases_on_host(pool, &host.id).await.map_err(|e| e.to_string())?;
        if dbs.iter().any(|d| running.iter().any(|m| m.database_id == d.id)) {
            continue;
        }
        let Some(db) = dbs.iter().find(|d| d.state == db_state::ACTIVE || d.state == db_state::DEPRECATED) else {
            ctx.set_drain_note(&host.id, if dbs.is_empty() { "drained" } else { "waiting for operations to end" });
            continue;
        };
        match super::moves::start(ctx, &db.id, None, "drain", false).await {
            Ok(s) => {
                let note = format!("moving database {} to {}", db.id, s.target_cluster_id);
                tracing::info!(host = %host.id, database = %db.id, to = %s.target_cluster_id, "drain: move started");
                ctx.set_drain_note(&host.id, &note);
            }
            Err(e) => {
                let note = format!("stuck: database {}: {e}", db.id);
                if ctx.set_drain_note(&host.id, &note) {
                    tracing::warn!(host = %host.id, database = %db.id, error = %e, "drain cannot move a database");
                }
            }
        }
    }
    Ok(())
}
