//! The one place where failures become HTTP status codes.
//!
//! A client mistake is a 4xx with nothing written; a 5xx is only ever the
//! system's own failure (a store or the broker unreachable past the retry
//! budget, or a write no replica confirmed). Every error body is
//! `{"error": "<reason>"}`.

use axum::http::header::RETRY_AFTER;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::redis_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input, or a refused business operation (not enough stock, credit).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// Not now: the resource is busy (an order under checkout); retrying later may succeed.
    #[error("{0}")]
    Conflict(String),
    /// A dependency (store, broker, another service) is unreachable.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(StoreError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            // Not acknowledged: it may have happened; the retry with the same key is safe.
            ApiError::Store(StoreError::NotDurable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            // Nothing was written; room comes back as keys expire (or an operator adds memory).
            ApiError::Store(StoreError::Full(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // The outcome is unknown or the system is busy: say when to try again
            // (with the same Idempotency-Key, so nothing can apply twice). A full store
            // frees memory only as keys expire: a retry within the second would meet it full.
            let after = match self {
                ApiError::Store(StoreError::Full(_)) => "10",
                _ => "1",
            };
            return (status, [(RETRY_AFTER, after)], body).into_response();
        }
        (status, body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_4xx_and_outages_5xx() {
        assert_eq!(ApiError::BadRequest("x".into()).status(), 400);
        assert_eq!(ApiError::NotFound("x".into()).status(), 404);
        assert_eq!(ApiError::Conflict("x".into()).status(), 409);
        assert_eq!(
            ApiError::Store(StoreError::Unavailable("x".into())).status(),
            503
        );
        assert_eq!(
            ApiError::Store(StoreError::NotDurable("x".into())).status(),
            503
        );
        assert_eq!(ApiError::Store(StoreError::Full("x".into())).status(), 503);
        assert_eq!(ApiError::Store(StoreError::corrupt("k", "x")).status(), 500);
    }

    #[test]
    fn a_write_no_replica_confirmed_is_a_503_with_retry_after() {
        let response = ApiError::Store(StoreError::NotDurable("x".into())).into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn a_full_store_asks_for_a_later_retry() {
        let response = ApiError::Store(StoreError::Full("x".into())).into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[RETRY_AFTER], "10");
    }

    #[test]
    fn unavailable_says_when_to_retry() {
        let response = ApiError::Unavailable("x".into()).into_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
