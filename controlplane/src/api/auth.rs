//! Who is calling, from the bearer token: the admin (platform team), an operator (reads the
//! whole fleet, steers it over gRPC) or a product team (its own databases). Tokens are compared
//! by SHA-256 hash; plaintext tokens are never stored, and a revoked token stops working on
//! every node as soon as its revocation is applied there.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::state::query;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Admin,
    Operator(String),
    Team(String),
}

impl Caller {
    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match self {
            Caller::Admin => "admin".to_string(),
            Caller::Operator(name) => format!("operator:{name}"),
            Caller::Team(t) => format!("team:{t}"),
        }
    }

    /// Refuses operators' tokens, which are read-only on the REST API.
    pub fn require_write(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator(_) => Err(ApiError::Forbidden(
                "operator tokens are read-only on the REST API: use a team's token, or stewardctl".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn from_token(t: crate::state::model::Token) -> Caller {
    use crate::state::model::token_scope;
    match t.scope.as_str() {
        token_scope::ADMIN => Caller::Admin,
        token_scope::OPERATOR => Caller::Operator(t.name),
        _ => Caller::Team(t.team.unwrap_or_default()),
    }
}

/// A new token's id: a UUIDv7 (time-ordered, 32 hex digits). Ids name tokens, they grant
/// nothing, so they need not be unpredictable; time-ordered ids land at the right edge of the
/// `tokens` primary-key index, where random ones each dirtied a random page of it at apply, on
/// every node (a fifth of a team create's apply cost).
pub fn new_token_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
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
    if let Some(t) = query::token_by_hash(pool, &hash).await? {
        return Ok(from_token(t));
    }
    state.node.linearizable_read().await?;
    match query::token_by_hash(pool, &hash).await? {
        Some(t) => Ok(from_token(t)),
        None => Err(ApiError::Unauthorized("unknown or revoked token".into())),
    }
}

/// Requires the admin token.
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        _ => Err(ApiError::Forbidden("this call needs an admin token".into())),
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
    fn token_ids_are_distinct_and_in_creation_order() {
        let ids: Vec<String> = (0..1000).map(|_| new_token_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())));
        // Strictly increasing within the process (UUIDv7's counter orders ids of one millisecond).
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
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
