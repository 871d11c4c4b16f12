//! The only place errors become HTTP responses: OpenAI's error shape on the OpenAI routes,
//! Anthropic's on `/v1/messages`. 5xx answers hide internals (the log keeps them); 429 carries
//! `Retry-After`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_core::error::{Error, ErrorCode};
use sluice_types::anthropic::ErrorResponse;
use sluice_types::openai::{ErrorBody, ErrorDetail};

/// Which API's error shape to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    pub flavor: Flavor,
}

impl ApiError {
    pub fn openai(error: Error) -> Self {
        ApiError {
            error,
            flavor: Flavor::OpenAi,
        }
    }

    pub fn anthropic(error: Error) -> Self {
        ApiError {
            error,
            flavor: Flavor::Anthropic,
        }
    }
}

/// The message a client sees: internal errors are replaced by a pointer to the log.
pub fn public_message(e: &Error) -> String {
    if e.code == ErrorCode::Internal {
        "internal error in Sluice; the server log has the details (look up the x-sluice-request-id)"
            .into()
    } else {
        e.message.clone()
    }
}

/// The OpenAI error body for an error.
pub fn openai_body(e: &Error) -> ErrorBody {
    ErrorBody {
        error: ErrorDetail {
            message: public_message(e),
            kind: e.code.kind().to_string(),
            param: e.param.clone(),
            code: Some(e.code.as_str().to_string()),
        },
    }
}

/// The Anthropic error body for an error.
pub fn anthropic_body(e: &Error) -> ErrorResponse {
    ErrorResponse::for_status(anthropic_status(e.code), public_message(e))
}

/// The HTTP status an Anthropic client gets for a code: an overloaded upstream is Anthropic's
/// own 529 `overloaded_error`, which its SDKs know to retry.
pub fn anthropic_status(code: ErrorCode) -> u16 {
    code.status_on("messages")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.flavor {
            Flavor::OpenAi => self.error.code.status(),
            Flavor::Anthropic => anthropic_status(self.error.code),
        };
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        if self.error.code == ErrorCode::Internal {
            tracing::error!(error = %self.error.message, "internal error");
        }
        let mut resp = match self.flavor {
            Flavor::OpenAi => (status, Json(openai_body(&self.error))).into_response(),
            Flavor::Anthropic => (status, Json(anthropic_body(&self.error))).into_response(),
        };
        for (name, value) in &self.error.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.headers_mut().insert(*name, v);
            }
        }
        if let Some(d) = self.error.retry_after {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        } else if status == StatusCode::TOO_MANY_REQUESTS
            && !resp.headers().contains_key("x-should-retry")
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_upstream_is_anthropics_529_for_anthropic_clients() {
        let e = Error::new(ErrorCode::UpstreamOverloaded, "busy");
        let r = ApiError::anthropic(e.clone()).into_response();
        assert_eq!(r.status().as_u16(), 529);
        assert_eq!(anthropic_body(&e).error.kind, "overloaded_error");
        let r = ApiError::openai(e).into_response();
        assert_eq!(r.status().as_u16(), 503);
    }
}
