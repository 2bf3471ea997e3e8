//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! The `code` is convoy's protocol code (docs/protocol.md) wherever the refusal comes from the
//! shared validation or the engine, so a client sees the same code over HTTP as over the
//! socket; the HTTP status is decided by that code ([`status_for`]), never by a message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::protocol::{short_message, ProtocolError};

/// A refused HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
}

/// The HTTP status of a protocol error code.
pub fn status_for(code: &str) -> StatusCode {
    match code {
        "queue_full" => StatusCode::TOO_MANY_REQUESTS,
        "shutting_down" | "too_many_connections" => StatusCode::SERVICE_UNAVAILABLE,
        "engine_error" => StatusCode::INTERNAL_SERVER_ERROR,
        "body_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "not_found" | "model_not_found" | "unknown_template" => StatusCode::NOT_FOUND,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "invalid_api_key" | "missing_api_key" => StatusCode::UNAUTHORIZED,
        "request_timeout" => StatusCode::REQUEST_TIMEOUT,
        // Everything about the request itself: malformed, wrong types, out of range, too long.
        _ => StatusCode::BAD_REQUEST,
    }
}

/// OpenAI's `type` for a status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

impl ApiError {
    /// An error whose status follows from its code.
    /// The message is cut as the socket's are ([`short_message`]): an error never carries a
    /// request's bulk back.
    pub fn new(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: status_for(code),
            code,
            message: short_message(message.into()),
            param: None,
        }
    }

    /// The same error about field `param`.
    pub fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": error_type(self.status),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> ApiError {
        ApiError::new(e.code, e.message)
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut r = (status, value.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses() {
        for (code, status) in [
            ("invalid_json", 400),
            ("invalid_type", 400),
            ("invalid_parameter", 400),
            ("prompt_too_long", 400),
            ("queue_full", 429),
            ("shutting_down", 503),
            ("body_too_large", 413),
            ("not_found", 404),
            ("invalid_api_key", 401),
            ("engine_error", 500),
        ] {
            assert_eq!(status_for(code).as_u16(), status, "{code}");
        }
        let e = ApiError::new("invalid_parameter", "n must be 1").param("n");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "n must be 1", "type": "invalid_request_error", "param": "n", "code": "invalid_parameter"}})
        );
    }
}
