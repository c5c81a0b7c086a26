//! Extractors whose rejections use the API's own error shape: axum's answer plain text, which
//! breaks the `{"error": {"code", "message"}}` contract (openapi.json) clients rely on.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Path parameters, like `axum::extract::Path`, but a segment that cannot be decoded (say
/// `%FF`, not UTF-8) answers 400 `bad_request` as JSON.
pub struct Path<T>(pub T);

#[axum::async_trait]
impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            // A route whose handler asks for parameters it does not have: our bug, not the caller's.
            Err(e) if e.status().is_server_error() => Err(ApiError::Internal(e.body_text())),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}
