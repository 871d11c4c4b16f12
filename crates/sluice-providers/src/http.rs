//! HTTP plumbing shared by the HTTP providers: one pooled client per provider, timeouts, upstream
//! error bodies, and SSE streams with an idle timeout.

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use sluice_core::ProviderError;

/// Timeouts of one provider, from its configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to the upstream.
    pub connect: Duration,
    /// A whole non-streamed call; for streams, the wait for the response headers.
    pub request: Duration,
    /// The longest silence allowed between two events of a stream.
    pub stream_idle: Duration,
}

/// Connection settings common to every HTTP provider.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Seconds to wait for a connection.
    #[serde(default = "default_connect")]
    pub connect_secs: f64,
    /// Seconds a whole non-streamed call may take (for streams: until the response starts).
    #[serde(default = "default_request")]
    pub request_secs: f64,
    /// Seconds of silence after which a stream is abandoned.
    #[serde(default = "default_idle")]
    pub stream_idle_secs: f64,
}

fn default_connect() -> f64 {
    10.0
}
fn default_request() -> f64 {
    600.0
}
fn default_idle() -> f64 {
    120.0
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_secs: default_connect(),
            request_secs: default_request(),
            stream_idle_secs: default_idle(),
        }
    }
}

impl HttpSettings {
    pub fn timeouts(&self) -> Result<Timeouts, String> {
        let d = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ))
            }
        };
        Ok(Timeouts {
            connect: d("timeouts.connect_secs", self.connect_secs)?,
            request: d("timeouts.request_secs", self.request_secs)?,
            stream_idle: d("timeouts.stream_idle_secs", self.stream_idle_secs)?,
        })
    }
}

/// Builds the pooled client of one provider. The client does not retry on its own: the
/// gateway's router retries and fails over with backoff and records every attempt, and a client
/// ready to retry would copy every request's headers in case it had to (hyper still resends a
/// request that a pooled connection closed under before it was written).
pub fn client(timeouts: &Timeouts) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .connect_timeout(timeouts.connect)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

/// Sends a request and waits for the response headers within `limit`. A non-success status
/// becomes [`ProviderError::Status`] with the upstream's message.
pub async fn send(
    req: reqwest::RequestBuilder,
    limit: Duration,
) -> Result<reqwest::Response, ProviderError> {
    let resp = match tokio::time::timeout(limit, req.send()).await {
        Err(_) => {
            return Err(ProviderError::Timeout(format!(
                "no response within {:.1}s",
                limit.as_secs_f64()
            )));
        }
        Ok(Err(e)) => return Err(map_reqwest(e)),
        Ok(Ok(r)) => r,
    };
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(status_error(resp).await)
    }
}

/// Reads a whole JSON body within what is left of `limit` and parses it.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    limit: Duration,
) -> Result<T, ProviderError> {
    let bytes = match tokio::time::timeout(limit, resp.bytes()).await {
        Err(_) => {
            return Err(ProviderError::Timeout(format!(
                "response body not complete within {:.1}s",
                limit.as_secs_f64()
            )));
        }
        Ok(Err(e)) => return Err(map_reqwest(e)),
        Ok(Ok(b)) => b,
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        ProviderError::Protocol(format!(
            "response body is not the expected JSON ({e}): {}",
            snippet(&bytes)
        ))
    })
}

pub fn map_reqwest(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout(e.to_string())
    } else if e.is_decode() || e.is_body() {
        ProviderError::Connect(format!("response body broke off: {e}"))
    } else {
        ProviderError::Connect(error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Turns an error response into [`ProviderError::Status`], reading the message from the body in
/// any of the shapes providers use (`{"error": {"message", "code"|"type"}}`, `{"error": "…"}`,
/// `{"message": "…"}`, Anthropic's `{"type": "error", "error": {…}}`, Gemini's `{"error":
/// {"status"}}`).
pub async fn status_error(resp: reqwest::Response) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64);
    let body = resp.bytes().await.unwrap_or_default();
    let (message, code) = error_message(&body);
    ProviderError::Status {
        status,
        message,
        code,
        retry_after,
    }
}

/// The message and code of an upstream error body.
pub fn error_message(body: &[u8]) -> (String, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = snippet(body);
        return (
            if text.is_empty() {
                "(empty body)".into()
            } else {
                text
            },
            None,
        );
    };
    let err = v.get("error").unwrap_or(&v);
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .or_else(|| err.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| snippet(body));
    let code = ["code", "type", "status"]
        .iter()
        .find_map(|k| err.get(*k))
        .and_then(|c| match c {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    (message, code)
}

/// At most 200 characters of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The SSE events of a streamed response, each within `idle` of the previous one. The stream ends
/// after its first error.
pub fn sse_events(
    resp: reqwest::Response,
    idle: Duration,
) -> impl Stream<Item = Result<Event, ProviderError>> + Send + 'static {
    let events = Box::pin(resp.bytes_stream().eventsource());
    futures::stream::unfold(Some(events), move |state| async move {
        let mut events = state?;
        match tokio::time::timeout(idle, events.next()).await {
            Err(_) => Some((
                Err(ProviderError::Timeout(format!(
                    "stream was silent for {:.1}s",
                    idle.as_secs_f64()
                ))),
                None,
            )),
            Ok(None) => None,
            Ok(Some(Ok(ev))) => Some((Ok(ev), Some(events))),
            Ok(Some(Err(e))) => Some((
                Err(match e {
                    eventsource_stream::EventStreamError::Transport(e) => map_reqwest(e),
                    other => ProviderError::Protocol(format!("malformed event stream: {other}")),
                }),
                None,
            )),
        }
    })
}
