//! `POST /v1/teams` (admin): creates a team and returns its token, shown only this once.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::auth::{caller, new_token, new_token_id, require_admin, token_hash};
use super::error::ApiError;
use super::validate::{team_name, NewTeam};
use super::AppState;
use crate::state::{Command, Response};

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewTeam>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller(&state, &headers).await?;
    require_admin(&who)?;
    let Json(req) = body?;
    team_name(&req.name)?;
    let token = new_token("stw");
    let cmd = Command::CreateTeam {
        name: req.name.clone(),
        contact: req.contact.clone(),
        token_hash: token_hash(&token),
        at: crate::now(),
        actor: who.actor(),
        token_id: Some(new_token_id()),
    };
    match state.node.write(cmd).await? {
        Response::Done => {
            Ok((StatusCode::CREATED, Json(json!({"name": req.name, "contact": req.contact, "token": token}))))
        }
        Response::Conflict { message } => Err(ApiError::Conflict(message)),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}
