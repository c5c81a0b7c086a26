//! Keeps the TLS layer's list of revoked identities in step with the replicated state, so a
//! revoked host's certificate is refused at the handshake on every node within a second.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use steward_proto::tls::{Identity, Role};

use crate::raft::node::RaftNode;
use crate::state::query;

/// Reloads the revoked hosts from the local replica every second.
pub async fn follow(node: Arc<RaftNode>) {
    let mut last: Option<HashSet<Identity>> = None;
    loop {
        match query::revoked_hosts(node.store.pool()).await {
            Ok(ids) => {
                let set: HashSet<Identity> = ids.into_iter().map(|h| Identity::new(Role::Agent, h)).collect();
                if last.as_ref() != Some(&set) {
                    if !set.is_empty() {
                        tracing::info!(revoked = set.len(), "refusing revoked host certificates");
                    }
                    node.tls.set_revoked(set.clone());
                    last = Some(set);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading revoked hosts"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
