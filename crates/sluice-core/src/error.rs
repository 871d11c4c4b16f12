//! Stable error codes and the errors that cross crate boundaries.
//!
//! Each [`ErrorCode`] has one HTTP status, one OpenAI error `type` and one stable `code` string.
//! Only `sluice-server` turns them into HTTP responses; everything else just returns them.

use std::time::Duration;

macro_rules! error_codes {
    ($($variant:ident => $status:literal, $kind:literal, $code:literal;)*) => {
        /// The stable error codes of Sluice's API.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            /// The HTTP status this code is answered with.
            pub fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status,)* }
            }
            /// The OpenAI error `type`.
            pub fn kind(self) -> &'static str {
                match self { $(ErrorCode::$variant => $kind,)* }
            }
            /// The stable `code` string.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }
            /// Every code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];
        }
    };
}

error_codes! {
    InvalidJson => 400, "invalid_request_error", "invalid_json";
    InvalidRequest => 400, "invalid_request_error", "invalid_request";
    UpstreamBadRequest => 400, "invalid_request_error", "upstream_bad_request";
    ContextLengthExceeded => 400, "invalid_request_error", "context_length_exceeded";
    ContentPolicy => 400, "invalid_request_error", "content_policy_violation";
    Unauthorized => 401, "authentication_error", "invalid_api_key";
    Forbidden => 403, "permission_error", "forbidden";
    ModelNotAllowed => 403, "permission_error", "model_not_allowed";
    ModelNotFound => 404, "invalid_request_error", "model_not_found";
    NotFound => 404, "invalid_request_error", "not_found";
    MethodNotAllowed => 405, "invalid_request_error", "method_not_allowed";
    RequestTimeout => 408, "invalid_request_error", "request_timeout";
    PayloadTooLarge => 413, "invalid_request_error", "payload_too_large";
    UnsupportedMediaType => 415, "invalid_request_error", "unsupported_media_type";
    UnsupportedParameter => 422, "invalid_request_error", "unsupported_parameter";
    RateLimited => 429, "rate_limit_error", "rate_limit_exceeded";
    UpstreamRateLimited => 429, "rate_limit_error", "upstream_rate_limited";
    InsufficientQuota => 429, "insufficient_quota", "insufficient_quota";
    Internal => 500, "server_error", "internal_error";
    UpstreamError => 502, "upstream_error", "upstream_error";
    UpstreamProtocol => 502, "upstream_error", "upstream_protocol_error";
    UpstreamAuth => 502, "upstream_error", "upstream_auth_failed";
    UpstreamOverloaded => 503, "upstream_error", "upstream_overloaded";
    Unavailable => 503, "server_error", "service_unavailable";
    NoHealthyDeployment => 503, "server_error", "no_healthy_deployment";
    StateUnavailable => 503, "server_error", "shared_state_unavailable";
    UpstreamTimeout => 504, "upstream_error", "upstream_timeout";
    ClientClosed => 499, "client_error", "client_closed_request";
}

impl ErrorCode {
    /// The HTTP status answered on `endpoint` (a record's): on Anthropic's Messages API
    /// (`messages`) an overloaded upstream is Anthropic's own 529 `overloaded_error`, which its
    /// SDKs know to retry; elsewhere [`status`](Self::status).
    pub fn status_on(self, endpoint: &str) -> u16 {
        match self {
            ErrorCode::UpstreamOverloaded if endpoint.starts_with("messages") => 529,
            c => c.status(),
        }
    }
}

/// The longest `Retry-After` Sluice honours, from any provider: an upstream asking for more (or
/// sending milliseconds where seconds are meant) would otherwise take a deployment out of
/// service for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// An error answered to a client: a code, a message that says what happened and what to do, and
/// optionally the request parameter at fault and how long to wait before retrying.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
    /// Extra response headers (`x-ratelimit-*` on a 429).
    pub headers: Vec<(&'static str, String)>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
}

/// What a provider call can fail with. The gateway maps it to an [`Error`] for the client and to
/// an error class for retries and failover.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The upstream answered with an error status.
    #[error("upstream returned HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// The upstream's own error code or type, when it sent one.
        code: Option<String>,
        /// The request field the upstream named as the cause (OpenAI's `param`), when it did.
        param: Option<String>,
        retry_after: Option<Duration>,
    },
    /// No answer (or no next chunk) within the configured time.
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// The connection could not be made or broke.
    #[error("could not reach upstream: {0}")]
    Connect(String),
    /// The upstream answered something that is not the protocol (bad JSON, bad SSE, missing fields).
    #[error("upstream sent an invalid response: {0}")]
    Protocol(String),
    /// The request uses something this provider cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The request is malformed in a way found while translating it for this provider (a tool
    /// message without its `tool_call_id`): nothing was sent.
    #[error("{0}")]
    Invalid(String),
    /// An error the upstream reported inside an answer it gave with status 200 (an SSE error
    /// event, an `error` object in the body): a [`ProviderError::Status`] with the status the
    /// error's code or type stands for, so that it is classed and answered as that status would
    /// be; its message says where it came from rather than claiming a status never sent.
    #[error("upstream answered 200 with an error inside: {}", .0.status_message())]
    Embedded(Box<ProviderError>),
}

impl ProviderError {
    /// The upstream's own message of a [`ProviderError::Status`] (else the error's text).
    fn status_message(&self) -> String {
        match self {
            ProviderError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// The client-facing error for this provider failure. `provider` names the deployment, so
    /// the operator can find it; upstream secrets never appear in messages.
    pub fn to_error(&self, provider: &str) -> Error {
        self.to_error_as(provider, false)
    }

    /// [`to_error`](Self::to_error); `embedded`: the error came inside a 200 answer, so its
    /// message names no status the upstream never sent.
    fn to_error_as(&self, provider: &str, embedded: bool) -> Error {
        match self {
            ProviderError::Status {
                status,
                message,
                code,
                param,
                retry_after,
            } => {
                let code = match *status {
                    400 | 422 if is_context_length(code.as_deref(), message) => {
                        ErrorCode::ContextLengthExceeded
                    }
                    400 if is_content_policy(code.as_deref(), message) => ErrorCode::ContentPolicy,
                    400 => ErrorCode::UpstreamBadRequest,
                    401 | 403 => ErrorCode::UpstreamAuth,
                    413 => ErrorCode::PayloadTooLarge,
                    422 => ErrorCode::UnsupportedParameter,
                    429 => ErrorCode::UpstreamRateLimited,
                    408 | 504 => ErrorCode::UpstreamTimeout,
                    // Anthropic's `overloaded_error`, OpenAI's "engine is overloaded".
                    503 | 529 => ErrorCode::UpstreamOverloaded,
                    _ => ErrorCode::UpstreamError,
                };
                let how = if embedded {
                    "in an error inside a 200 answer".to_string()
                } else {
                    format!("HTTP {status}")
                };
                let msg = match (code, *status) {
                    (ErrorCode::UpstreamAuth, _) => format!(
                        "provider `{provider}` rejected Sluice's credentials ({how}); check the provider's api_key"
                    ),
                    // Also what an upstream answers with another status when its body says the
                    // account is out of credit (OpenAI's 429 `insufficient_quota`): no number.
                    (_, 402) => format!(
                        "provider `{provider}` says its account is out of credit or quota: {message}"
                    ),
                    _ if embedded => {
                        format!(
                            "provider `{provider}` answered 200 with an error inside: {message}"
                        )
                    }
                    _ => format!("provider `{provider}` returned {how}: {message}"),
                };
                // The upstream's `param` names the offending field of a request it refused.
                let param = match code {
                    ErrorCode::UpstreamBadRequest
                    | ErrorCode::UnsupportedParameter
                    | ErrorCode::ContextLengthExceeded
                    | ErrorCode::ContentPolicy => param.clone(),
                    _ => None,
                };
                Error {
                    code,
                    message: msg,
                    param,
                    retry_after: *retry_after,
                    headers: Vec::new(),
                }
            }
            ProviderError::Timeout(m) => Error::new(
                ErrorCode::UpstreamTimeout,
                format!("provider `{provider}` timed out: {m}"),
            ),
            ProviderError::Connect(m) => Error::new(
                ErrorCode::UpstreamError,
                format!("could not reach provider `{provider}`: {m}"),
            ),
            ProviderError::Protocol(m) => Error::new(
                ErrorCode::UpstreamProtocol,
                format!("provider `{provider}` sent an invalid response: {m}"),
            ),
            ProviderError::Unsupported(m) => Error::new(ErrorCode::UnsupportedParameter, m.clone()),
            ProviderError::Invalid(m) => Error::new(ErrorCode::InvalidRequest, m.clone()),
            ProviderError::Embedded(inner) => inner.to_error_as(provider, true),
        }
    }
}

/// What kind of failure a provider call was, for retries, fallbacks and circuit breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// 429: the deployment is at its limit; another may not be.
    RateLimited,
    /// The prompt does not fit the model: only a larger-context model helps.
    ContextWindowExceeded,
    /// The provider's content filter refused it: only another model or provider helps.
    ContentPolicy,
    /// 5xx, unreachable, a broken answer, or a deployment that rejects Sluice's credentials
    /// (401, 403) or does not know its model (404).
    ServerError,
    /// No answer in time.
    Timeout,
    /// The request itself is wrong: retrying cannot help.
    ClientError,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::ContextWindowExceeded => "context_window_exceeded",
            ErrorClass::ContentPolicy => "content_policy",
            ErrorClass::ServerError => "server_error",
            ErrorClass::Timeout => "timeout",
            ErrorClass::ClientError => "client_error",
        }
    }

    /// Whether trying again (the same deployment later, or another deployment of the same
    /// model) can succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorClass::RateLimited | ErrorClass::ServerError | ErrorClass::Timeout
        )
    }

    /// Whether the failure says the deployment is unhealthy (counts against its breaker).
    pub fn is_deployment_fault(self) -> bool {
        matches!(self, ErrorClass::ServerError | ErrorClass::Timeout)
    }
}

impl ProviderError {
    /// The failure's class.
    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Status {
                status,
                message,
                code,
                ..
            } => match *status {
                429 => ErrorClass::RateLimited,
                400 | 422 if is_context_length(code.as_deref(), message) => {
                    ErrorClass::ContextWindowExceeded
                }
                400 if is_content_policy(code.as_deref(), message) => ErrorClass::ContentPolicy,
                408 | 504 => ErrorClass::Timeout,
                // Sluice's credentials or the deployment's model name are wrong, or its account
                // has run out of credit (402): a fault of this deployment, not of the request, so
                // another deployment may serve it.
                401..=404 => ErrorClass::ServerError,
                s if s >= 500 => ErrorClass::ServerError,
                _ => ErrorClass::ClientError,
            },
            ProviderError::Timeout(_) => ErrorClass::Timeout,
            ProviderError::Connect(_) | ProviderError::Protocol(_) => ErrorClass::ServerError,
            ProviderError::Unsupported(_) | ProviderError::Invalid(_) => ErrorClass::ClientError,
            ProviderError::Embedded(inner) => inner.class(),
        }
    }

    /// The HTTP status the error stands for (sent, or the one an error inside a 200 answer
    /// stands for), when it is an upstream's error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Status { status, .. } => Some(*status),
            ProviderError::Embedded(inner) => inner.status(),
            _ => None,
        }
    }

    /// The upstream's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            ProviderError::Embedded(inner) => inner.retry_after(),
            _ => None,
        }
    }
}

fn is_content_policy(code: Option<&str>, message: &str) -> bool {
    matches!(
        code,
        Some("content_policy_violation" | "content_filter" | "content_filtered" | "invalid_prompt")
    ) || message.contains("content management policy")
        || message.contains("usage policy")
        || message.contains("content_policy")
        || message.contains("content filter")
}

/// Whether an upstream's 400 (or 422) says the prompt and completion do not fit the model's
/// context, in the words the common servers use: OpenAI, vLLM and Mistral ("maximum context
/// length"), Anthropic ("prompt is too long", "exceed context limit"), llama.cpp
/// (`exceed_context_size_error`), TGI ("`inputs` tokens + `max_new_tokens` must be <= …") and
/// Gemini ("exceeds the maximum number of tokens allowed").
fn is_context_length(code: Option<&str>, message: &str) -> bool {
    if matches!(
        code,
        Some("context_length_exceeded" | "exceed_context_size_error")
    ) {
        return true;
    }
    let m = message.to_ascii_lowercase();
    [
        "context length",
        "context_length_exceeded",
        "context window",
        "context limit",
        "context size",
        "prompt is too long",
        "exceeds the maximum number of tokens",
    ]
    .iter()
    .any(|p| m.contains(p))
        || (m.contains("max_new_tokens") && m.contains("must be"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {}", c.as_str());
        }
    }

    /// The field an upstream names as the cause of a refused request reaches the client; a
    /// server fault's does not.
    #[test]
    fn an_upstream_param_is_passed_on_for_refused_requests() {
        let e = |status| ProviderError::Status {
            status,
            message: "Invalid 'messages[0].content': string too long.".into(),
            code: Some("string_above_max_length".into()),
            param: Some("messages[0].content".into()),
            retry_after: None,
        };
        assert_eq!(
            e(400).to_error("p").param.as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            e(422).to_error("p").param.as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(e(500).to_error("p").param, None);
        assert_eq!(e(401).to_error("p").param, None);
    }

    #[test]
    fn upstream_statuses_map_to_client_codes() {
        let e = |s| ProviderError::Status {
            status: s,
            message: "m".into(),
            code: None,
            param: None,
            retry_after: None,
        };
        assert_eq!(e(400).to_error("p").code, ErrorCode::UpstreamBadRequest);
        assert_eq!(e(401).to_error("p").code, ErrorCode::UpstreamAuth);
        assert_eq!(e(429).to_error("p").code.status(), 429);
        assert_eq!(e(500).to_error("p").code.status(), 502);
        assert_eq!(e(503).to_error("p").code, ErrorCode::UpstreamOverloaded);
        assert_eq!(e(529).to_error("p").code, ErrorCode::UpstreamOverloaded);
        assert_eq!(e(529).to_error("p").code.status(), 503);
        assert!(e(401).to_error("p").message.contains("api_key"));
    }

    #[test]
    fn a_deployment_that_rejects_its_credentials_or_model_is_at_fault() {
        let e = |s| ProviderError::Status {
            status: s,
            message: "m".into(),
            code: None,
            param: None,
            retry_after: None,
        };
        for s in [401, 403, 404, 500, 502, 503] {
            assert_eq!(e(s).class(), ErrorClass::ServerError, "{s}");
            assert!(e(s).class().is_deployment_fault(), "{s}");
        }
        for s in [400, 413, 422] {
            assert_eq!(e(s).class(), ErrorClass::ClientError, "{s}");
        }
        assert_eq!(e(429).class(), ErrorClass::RateLimited);
        // An account out of credit: another deployment may still serve. Its message claims no
        // status (the upstream may have answered 429 or 400 and said so in its body).
        assert_eq!(e(402).class(), ErrorClass::ServerError);
        let out = e(402).to_error("openai");
        assert_eq!(out.code, ErrorCode::UpstreamError);
        assert!(
            out.message
                .starts_with("provider `openai` says its account is out of credit or quota")
                && !out.message.contains("402"),
            "{}",
            out.message
        );
    }

    #[test]
    fn context_overflows_are_recognised_in_each_servers_words() {
        let e = |status, message: &str, code: Option<&str>| ProviderError::Status {
            status,
            message: message.into(),
            code: code.map(str::to_string),
            param: None,
            retry_after: None,
        };
        let overflows = [
            // OpenAI
            e(
                400,
                "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
                Some("context_length_exceeded"),
            ),
            // vLLM
            e(
                400,
                "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
                Some("BadRequestError"),
            ),
            // Anthropic, both wordings
            e(
                400,
                "prompt is too long: 210000 tokens > 200000 maximum",
                Some("invalid_request_error"),
            ),
            e(
                400,
                "input length and `max_tokens` exceed context limit: 199759 + 8192 > 200000, decrease input length or `max_tokens` and try again",
                Some("invalid_request_error"),
            ),
            // llama.cpp
            e(
                400,
                "the request exceeds the available context size, try increasing it",
                Some("exceed_context_size_error"),
            ),
            // TGI answers 422
            e(
                422,
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
                Some("validation"),
            ),
            // Gemini
            e(
                400,
                "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                Some("INVALID_ARGUMENT"),
            ),
        ];
        for o in &overflows {
            assert_eq!(o.class(), ErrorClass::ContextWindowExceeded, "{o}");
            assert_eq!(
                o.to_error("p").code,
                ErrorCode::ContextLengthExceeded,
                "{o}"
            );
        }
        let other = e(
            400,
            "temperature must be at most 2",
            Some("invalid_request_error"),
        );
        assert_eq!(other.class(), ErrorClass::ClientError);
        let validation = e(422, "unknown field `foo`", Some("validation"));
        assert_eq!(validation.class(), ErrorClass::ClientError);
        assert_eq!(
            validation.to_error("p").code,
            ErrorCode::UnsupportedParameter
        );
    }
}
