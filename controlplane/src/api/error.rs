//! The product API's error type and its one mapping to HTTP status codes and the
//! `{"error": {"code", "message"}}` body (DESIGN.md).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::raft::node::RaftApiError;

/// Every way a REST call can fail, with a message that tells the caller what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request body is larger than the API accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unprocessable(String),
    /// Over the per-token request rate; retry after the given seconds.
    #[error("too many requests: retry in {0} s")]
    TooManyRequests(u64),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let retry = if let ApiError::TooManyRequests(s) = &self { Some(*s) } else { None };
        if status.is_server_error() {
            tracing::warn!(%code, error = %self, "request failed");
        }
        let mut resp =
            (status, axum::Json(json!({"error": {"code": code, "message": self.to_string()}}))).into_response();
        if let Some(secs) = retry {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<RaftApiError> for ApiError {
    fn from(e: RaftApiError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<crate::reconcile::plan::PlanError> for ApiError {
    fn from(e: crate::reconcile::plan::PlanError) -> Self {
        match e {
            crate::reconcile::plan::PlanError::NoPlace(p) => ApiError::Unavailable(p.to_string()),
            crate::reconcile::plan::PlanError::Storage(s) => ApiError::from(s),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(format!("reading state: {e}"))
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection::*;
        match r {
            JsonDataError(e) => ApiError::Unprocessable(format!("invalid request body: {}", e.body_text())),
            JsonSyntaxError(e) => ApiError::BadRequest(format!("malformed JSON: {}", e.body_text())),
            MissingJsonContentType(_) => {
                ApiError::BadRequest("send the body as JSON with 'Content-Type: application/json'".into())
            }
            // A body over the limit (`DefaultBodyLimit` in `api::router`) is not the caller's
            // syntax error: say so with 413, as the contract documents.
            other if other.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!("{}: send at most 64 KiB", other.body_text()))
            }
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}
