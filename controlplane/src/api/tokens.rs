//! `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/{id}` (admin): API tokens with a
//! scope (`admin`, `operator`, `team`), shown once at creation, listed without their secret,
//! and revoked at once on every node.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{caller, new_token, new_token_id, require_admin, token_hash};
use super::error::ApiError;
use super::AppState;
use crate::state::model::{token_scope, Token};
use crate::state::{query, Command, Response};

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub scope: String,
    #[serde(default)]
    pub team: Option<String>,
    pub name: String,
}

/// A token as listed: never its secret.
pub fn view(t: &Token) -> Value {
    json!({"id": t.id, "scope": t.scope, "team": t.team, "name": t.name, "created_at": t.created_at, "revoked_at": t.revoked_at})
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let who = caller(&state, &headers).await?;
    require_admin(&who)?;
    let Json(req) = body?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(
            "name must be 1-64 printable characters saying what the token is for".into(),
        ));
    }
    let team = match (req.scope.as_str(), req.team) {
        (token_scope::TEAM, Some(t)) => Some(t),
        (token_scope::TEAM, None) => {
            return Err(ApiError::Unprocessable("a team token needs 'team': the team it acts for".into()))
        }
        (token_scope::ADMIN | token_scope::OPERATOR, None) => None,
        (token_scope::ADMIN | token_scope::OPERATOR, Some(_)) => {
            return Err(ApiError::Unprocessable("only team tokens name a team".into()))
        }
        (other, _) => {
            return Err(ApiError::Unprocessable(format!("scope '{other}' is not one of admin, operator, team")))
        }
    };
    let prefix = match req.scope.as_str() {
        token_scope::ADMIN => "adm",
        token_scope::OPERATOR => "opr",
        _ => "stw",
    };
    let secret = new_token(prefix);
    let token = Token {
        id: new_token_id(),
        hash: token_hash(&secret),
        scope: req.scope.clone(),
        team,
        name: name.to_string(),
        created_at: crate::now(),
        revoked_at: None,
    };
    match state.node.write(Command::CreateToken { token: token.clone(), actor: who.actor() }).await? {
        Response::Done => {
            let mut v = view(&token);
            v["token"] = json!(secret);
            Ok((StatusCode::CREATED, Json(v)))
        }
        Response::NotFound { message } => Err(ApiError::Unprocessable(message)),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    require_admin(&who)?;
    state.node.linearizable_read().await?;
    let tokens = query::tokens(state.node.store.pool()).await?;
    Ok(Json(json!({"tokens": tokens.iter().map(view).collect::<Vec<_>>()})))
}

pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    require_admin(&who)?;
    let cmd = Command::RevokeToken { id: id.clone(), at: crate::now(), actor: who.actor() };
    match state.node.write(cmd).await? {
        Response::Done => {}
        Response::NotFound { message } => return Err(ApiError::NotFound(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let t = query::token(state.node.store.pool(), &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("token {id} does not exist")))?;
    Ok(Json(view(&t)))
}
