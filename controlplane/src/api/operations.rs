//! `GET /v1/operations/{id}`: progress of an asynchronous job, visible to the owner of the
//! database it concerns (others get 404) and to the admin.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};

use super::auth::{caller, Caller};
use super::error::ApiError;
use super::extract::Path;
use super::AppState;
use crate::state::model::Operation;
use crate::state::query;

/// JSON view of an operation.
pub fn view(op: &Operation) -> Value {
    json!({
        "id": op.id,
        "kind": op.kind,
        "database_id": op.database_id,
        "state": op.state,
        "step": op.step,
        "attempts": op.attempts,
        "error": if op.error.is_empty() { Value::Null } else { Value::String(op.error.clone()) },
        "created_at": op.created_at,
        "updated_at": op.updated_at,
        "detail": if op.detail.is_empty() { Value::Null } else { Value::String(op.detail.clone()) },
    })
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    state.node.linearizable_read().await?;
    let pool = state.node.store.pool();
    let not_found = || ApiError::NotFound(format!("operation {id} does not exist"));
    let op = query::operation(pool, &id).await?.ok_or_else(not_found)?;
    if let Caller::Team(team) = &who {
        let db = query::database(pool, &op.database_id).await?.ok_or_else(not_found)?;
        if &db.owner != team {
            return Err(not_found());
        }
    }
    Ok(Json(view(&op)))
}
