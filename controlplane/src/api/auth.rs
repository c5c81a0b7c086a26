//! Who is calling: the admin (platform team) or a product team, from the bearer token. Tokens
//! are compared by SHA-256 hash; plaintext tokens are never stored.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::state::query;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Admin,
    Team(String),
}

/// Hex SHA-256 of a token, the form in which tokens are stored and compared.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (256 bits, URL-safe).
pub fn new_token(prefix: &str) -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    format!("{prefix}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing 'Authorization: Bearer <token>' header".into()))?;
    let value =
        value.to_str().map_err(|_| ApiError::Unauthorized("the Authorization header is not valid text".into()))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::Unauthorized("the Authorization header must be 'Bearer <token>'".into()))
}

/// Authenticates the request. Team tokens are looked up in the local replica: a token created a
/// moment ago on another node may need a linearizable read, which we do when the local lookup misses.
pub async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let hash = token_hash(bearer(headers)?);
    if constant_time_eq(hash.as_bytes(), state.admin_token_hash.as_bytes()) {
        return Ok(Caller::Admin);
    }
    let pool = state.node.store.pool();
    if let Some(team) = query::team_by_token_hash(pool, &hash).await? {
        return Ok(Caller::Team(team.name));
    }
    state.node.linearizable_read().await?;
    match query::team_by_token_hash(pool, &hash).await? {
        Some(team) => Ok(Caller::Team(team.name)),
        None => Err(ApiError::Unauthorized("unknown or revoked token".into())),
    }
}

/// Requires the admin token.
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Team(_) => Err(ApiError::Forbidden("this call needs the admin token".into())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = new_token("stw");
        let b = new_token("stw");
        assert_ne!(a, b);
        assert!(a.starts_with("stw_"));
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_eq!(token_hash("x").len(), 64);
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert!(matches!(bearer(&h), Err(ApiError::Unauthorized(_))));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&h), Err(ApiError::Unauthorized(_))));
        h.insert("authorization", "Bearer tok".parse().unwrap());
        assert_eq!(bearer(&h).unwrap(), "tok");
    }
}
