//! The product REST API (axum): teams, databases, operations, health and metrics. Every node
//! serves it; writes are forwarded to the Raft leader and reads are linearizable.

pub mod auth;
pub mod databases;
pub mod error;
pub mod extract;
pub mod join;
pub mod lifecycle;
pub mod limits;
pub mod openapi;
pub mod operations;
pub mod serve;
pub mod system;
pub mod teams;
pub mod tokens;
pub mod validate;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use crate::metrics::Metrics;
use crate::raft::node::RaftNode;

/// Shared state of the REST handlers.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<RaftNode>,
    /// SHA-256 (hex) of the admin token.
    pub admin_token_hash: Arc<String>,
    pub metrics: Arc<Metrics>,
    /// What agents last reported (for replication metrics; filled on the leader).
    pub liveness: Arc<crate::reconcile::liveness::Liveness>,
    /// Signs certificates for joining hosts and nodes.
    pub ca: Arc<crate::pki::CertAuthority>,
    /// Rate limit and request deadline.
    pub limits: Arc<limits::Limits>,
    /// Agent clients, for calls that act on a database's primary at once (credential rotation).
    pub ctx: Arc<crate::reconcile::Ctx>,
}

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The `/v1`, `/healthz` and `/metrics` routes. Every route here must be described in
/// `openapi.json` (the `api::openapi` tests read this function's `.route(...)` calls and fail
/// on any difference), so add or change both together.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi::get))
        .route("/v1/teams", post(teams::create))
        .route("/v1/databases", post(databases::create).get(databases::list))
        .route("/v1/databases/:id", get(databases::get).delete(lifecycle::delete))
        .route("/v1/databases/:id/restore", post(databases::restore))
        .route("/v1/databases/:id/archive", post(databases::archive))
        .route("/v1/databases/:id/deprecate", post(lifecycle::deprecate))
        .route("/v1/databases/:id/reactivate", post(lifecycle::reactivate))
        .route("/v1/databases/:id/transfer", post(lifecycle::transfer))
        .route("/v1/databases/:id/credentials/rotate", post(databases::rotate_credentials))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/:id", axum::routing::delete(tokens::revoke))
        .route("/v1/join", post(join::join))
        .route("/v1/audit", get(lifecycle::audit))
        .route("/v1/operations/:id", get(operations::get))
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics))
        .fallback(system::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(state.limits.clone(), limits::enforce))
        .with_state(state)
}
