//! `/healthz` (liveness) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let leader = state.node.leader().map(|(id, _)| id);
    let (last_log_index, last_applied) = {
        let m = state.node.raft.metrics();
        let m = m.borrow();
        (m.last_log_index.unwrap_or(0), m.last_applied.map(|l| l.index).unwrap_or(0))
    };
    Json(json!({
        "status": "ok",
        "node_id": state.node.id,
        "leader_id": leader,
        "last_log_index": last_log_index,
        "last_applied": last_applied,
    }))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = crate::metrics::render(&state.node, &state.metrics, &state.liveness).await;
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see docs/api.md for the REST API".into())
}
