//! Lifecycle calls on one database: `POST /v1/databases/{id}/deprecate`, `.../reactivate`,
//! `.../transfer`, `DELETE /v1/databases/{id}`; and the admin's `GET /v1/audit`. The
//! transition rules live in `state::lifecycle` and are checked when the change is applied, so a
//! refused change answers 409 with what to do instead, the same on every node.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{caller, Caller};
use super::databases::view;
use super::error::ApiError;
use super::extract::Path;
use super::validate::{self, DeprecateRequest, TransferRequest};
use super::AppState;
use crate::state::lifecycle::Action;
use crate::state::{query, Command, Response};

/// Writes a lifecycle change of a database the caller may see and returns its new view.
async fn change(
    state: &AppState,
    who: &Caller,
    id: &str,
    action: Action,
    reason: String,
    sunset_at: String,
    new_owner: String,
) -> Result<Json<Value>, ApiError> {
    super::databases::visible(state, who, id).await?;
    let pool = state.node.store.pool();
    let not_found = || ApiError::NotFound(format!("database {id} does not exist"));
    who.require_write()?;
    let actor = who.actor();
    let cmd =
        Command::ChangeDatabase { id: id.to_string(), action, reason, sunset_at, new_owner, at: crate::now(), actor };
    match state.node.write(cmd).await? {
        Response::Done => {}
        Response::Conflict { message } => return Err(ApiError::Conflict(message)),
        Response::NotFound { message } => return Err(ApiError::Unprocessable(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let db = query::database(pool, id).await?.ok_or_else(not_found)?;
    Ok(Json(view(pool, &db).await?))
}

/// `POST /v1/databases/{id}/deprecate {reason, sunset_at}`: still fully usable, listed as
/// deprecated with a warning; may be called again to change the reason or date.
pub async fn deprecate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<DeprecateRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    let Json(req) = body?;
    let sunset = validate::deprecation(&req, chrono::Utc::now())?;
    change(&state, &who, &id, Action::Deprecate, req.reason.trim().to_string(), sunset, String::new()).await
}

/// `POST /v1/databases/{id}/reactivate`: a deprecated database becomes active again.
pub async fn reactivate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    change(&state, &who, &id, Action::Reactivate, String::new(), String::new(), String::new()).await
}

/// `POST /v1/databases/{id}/transfer {owner}`: another team owns it from now on (its owner
/// team or the admin may do this; the new team's token sees it, the old one's no longer does).
pub async fn transfer(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    let Json(req) = body?;
    validate::team_name(&req.owner)?;
    change(&state, &who, &id, Action::Transfer, String::new(), String::new(), req.owner).await
}

/// `DELETE /v1/databases/{id}`: only an archived database; the record stays as `deleted`.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    change(&state, &who, &id, Action::Delete, String::new(), String::new(), String::new()).await
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries about this target (a database id, a team name, a cluster...).
    pub target: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// `GET /v1/audit`: every mutation, who, what, when and the outcome; admin only.
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    if !matches!(who, Caller::Admin | Caller::Operator(_)) {
        return Err(ApiError::Forbidden("the audit log is for admin and operator tokens only".into()));
    }
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("bad query: {}", e.body_text())))?;
    state.node.linearizable_read().await?;
    let limit = i64::from(q.limit.unwrap_or(100).clamp(1, 1000));
    let rows = query::audit(state.node.store.pool(), q.target.as_deref(), limit).await?;
    let entries: Vec<Value> = rows
        .into_iter()
        .map(|a| json!({"seq": a.seq, "at": a.at, "actor": a.actor, "action": a.action, "target": a.target, "outcome": a.outcome}))
        .collect();
    Ok(Json(json!({ "entries": entries })))
}
