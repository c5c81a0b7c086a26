//! `POST /v1/join`: a new agent or control-plane node spends a one-time join token for its
//! first certificate. The token (not a bearer token) authenticates the call; the token's use is
//! a Raft write, so it works once across the whole control plane.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use steward_proto::tls::join::{JoinReply, JoinRequest, JoinToken};
use steward_proto::tls::{Identity, Role};

use super::error::ApiError;
use super::AppState;
use crate::state::{query, Command, Response};

pub async fn join(
    State(state): State<AppState>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JoinReply>), ApiError> {
    let Json(req) = body?;
    let token = JoinToken::parse(&req.token).map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let role = Role::parse(&req.role).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    if role == Role::Operator {
        return Err(ApiError::Unprocessable("operators get certificates with `steward-controlplane pki issue`".into()));
    }
    steward_proto::tls::identity::valid_name(&req.name).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    if req.hosts.len() > 32 || req.hosts.iter().any(|h| h.len() > 253) {
        return Err(ApiError::Unprocessable("at most 32 host names of at most 253 characters".into()));
    }
    let fingerprint = state.ca.fingerprint().map_err(ApiError::Internal)?;
    if token.ca_fingerprint != fingerprint {
        return Err(ApiError::Unauthorized("the join token is for another cluster's CA".into()));
    }
    if role == Role::Agent {
        state.node.linearizable_read().await?;
        if let Some(h) = query::host(state.node.store.pool(), &req.name).await? {
            if h.revoked_at.is_some() {
                return Err(ApiError::Forbidden(format!("host {} is revoked: join under a new host id", req.name)));
            }
        }
    }
    // Sign before spending the token: a malformed request must not burn it. The certificate
    // is only handed out once the token is spent.
    let identity = Identity::new(role, req.name.clone());
    let (certificate, ca) = state.ca.sign(&req.csr, identity, req.hosts).map_err(ApiError::Unprocessable)?;
    let cmd =
        Command::UseJoinToken { hash: token.hash(), role: role.to_string(), name: req.name.clone(), at: crate::now() };
    match state.node.write(cmd).await? {
        Response::Done => {}
        Response::Conflict { message } => return Err(ApiError::Unauthorized(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let ca_key = if role == Role::ControlPlane { Some(state.ca.ca_key().map_err(ApiError::Internal)?) } else { None };
    tracing::info!(role = %role, name = %req.name, "issued a certificate for a join");
    Ok((StatusCode::CREATED, Json(JoinReply { ca, certificate, ca_key })))
}
