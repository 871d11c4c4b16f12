//! HTTP plumbing shared by the HTTP providers: one pooled client per provider (hyper over rustls,
//! proxies from the environment), timeouts, upstream error bodies, and SSE streams with an idle
//! timeout.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::uri::Scheme;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyDataStream, BodyExt, Full};

pub use crate::sse::Event;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_platform_verifier::BuilderVerifierExt;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::error::MAX_RETRY_AFTER;
use tokio::net::TcpStream;
use tower_service::Service;

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
    /// Seconds a whole non-streamed call may take (for streams: until the response starts, and
    /// again until its first bytes).
    #[serde(default = "default_request")]
    pub request_secs: f64,
    /// Seconds of silence after which a stream is abandoned, once its first bytes came.
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
                Duration::try_from_secs_f64(v)
                    .map_err(|_| format!("{name} is too large ({v} seconds)"))
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

/// The pooled HTTP client of one provider: HTTP/1.1 (one connection per request in flight) over
/// rustls, with the
/// platform's certificate verifier, `TCP_NODELAY`, a connect timeout, and idle connections kept
/// for 90 s.
///
/// Outbound proxies come from the environment, as curl reads them: `HTTPS_PROXY`, `HTTP_PROXY`,
/// `ALL_PROXY` (each also lower-case) and `NO_PROXY`. An `https://` upstream is reached through a
/// `CONNECT` tunnel, a plain `http://` one by sending the request to the proxy in absolute form;
/// credentials in the proxy URL are sent as `Proxy-Authorization: Basic`.
///
/// The client does not retry on its own: the gateway's router retries and fails over with backoff
/// and records every attempt. (hyper still resends a request that a pooled connection closed
/// under before any of it was written.)
///
/// Each connection runtime (see [`sluice_core::shard`]) has a pool of its own, made at its first
/// request: a connection is then read and written by the thread whose requests use it.
#[derive(Clone)]
pub struct Client {
    pools: Arc<[std::sync::OnceLock<Upstream>]>,
    https: HttpsConnector<Connector>,
    proxies: Arc<Matcher>,
}

/// One connection pool.
type Upstream = Pool<HttpsConnector<Connector>, Full<Bytes>>;

/// Pools: one for each connection thread there may be, and one for every other thread.
const POOLS: usize = sluice_core::shard::MAX + 1;

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("proxies", &self.proxies)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client whose proxies come from the environment.
    pub fn new(timeouts: &Timeouts) -> Result<Client, String> {
        Client::with_proxies(timeouts, Matcher::from_env())
    }

    /// A client with the given proxy rules.
    pub fn with_proxies(timeouts: &Timeouts, proxies: Matcher) -> Result<Client, String> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeouts.connect));
        let proxies = Arc::new(proxies);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_platform_verifier())
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_no_client_auth();
        // HTTP/1.1 only: the pool opens one HTTP/2 connection per host and never a second, so
        // past the server's stream limit (often 100) requests would queue behind long streams.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Connector {
                tcp,
                proxies: proxies.clone(),
            });
        Ok(Client {
            pools: (0..POOLS).map(|_| std::sync::OnceLock::new()).collect(),
            https,
            proxies,
        })
    }

    /// The calling thread's connection pool.
    fn pool(&self) -> &Upstream {
        self.pools[sluice_core::shard::current() % self.pools.len()].get_or_init(|| {
            Pool::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(self.https.clone())
        })
    }

    /// Sends a request and waits for the response headers within `limit`. A non-success status
    /// becomes [`ProviderError::Status`] with the upstream's message.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
        limit: Duration,
    ) -> Result<Response<Incoming>, ProviderError> {
        if req.uri().scheme() == Some(&Scheme::HTTP)
            && let Some(proxy) = self.proxies.intercept(req.uri())
            && let Some(auth) = proxy.basic_auth()
        {
            // Sent to the proxy in absolute form: the proxy reads its credentials from the
            // request itself (for `https://`, the CONNECT carries them).
            req.headers_mut()
                .insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        let started = tokio::time::Instant::now();
        let resp = match tokio::time::timeout(limit, self.pool().request(req)).await {
            Err(_) => {
                return Err(ProviderError::Timeout(format!(
                    "no response within {:.1}s",
                    limit.as_secs_f64()
                )));
            }
            Ok(Err(e)) => return Err(request_error(&e)),
            Ok(Ok(r)) => r,
        };
        if resp.status().is_success() {
            Ok(resp)
        } else {
            // The error body is read within what is left of the limit, like any other body.
            let left = limit.saturating_sub(started.elapsed());
            Err(status_error(resp, left).await)
        }
    }

    /// Sends a request and reads its JSON answer, all within `limit`.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<Full<Bytes>>,
        limit: Duration,
    ) -> Result<T, ProviderError> {
        let started = tokio::time::Instant::now();
        let resp = self.send(req, limit).await?;
        json_body(resp, limit.saturating_sub(started.elapsed())).await
    }
}

/// A request with a JSON body and the given headers (plus `content-type`).
pub fn post_json<T: serde::Serialize + ?Sized>(
    uri: &Uri,
    headers: &HeaderMap,
    body: &T,
) -> Result<Request<Full<Bytes>>, ProviderError> {
    let body = serde_json::to_vec(body)
        .map_err(|e| ProviderError::Protocol(format!("cannot encode the request body: {e}")))?;
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(req)
}

/// A GET request with the given headers.
pub fn get(uri: &Uri, headers: &HeaderMap) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

/// Asks for an event stream.
pub fn accept_event_stream(req: &mut Request<Full<Bytes>>) {
    req.headers_mut().insert(
        header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
}

/// Parses an upstream URL.
pub fn parse_uri(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!("`{url}` is not an http:// or https:// URL")),
    }
}

/// Percent-encodes what may not appear in a URL path segment as is (controls, space, non-ASCII,
/// `"#%<>?\^`{|}` and `/`), for names put into a path: deployment and model names.
pub fn path_segment(s: &str) -> std::borrow::Cow<'_, str> {
    escape_path(s, false)
}

/// Like [`path_segment`], but keeps `/`: for a name that is a path of its own (Gemini's
/// `models/NAME`, `tunedModels/NAME`).
pub fn path(s: &str) -> std::borrow::Cow<'_, str> {
    escape_path(s, true)
}

fn escape_path(s: &str, keep_slash: bool) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| {
        (keep_slash && b == b'/')
            || b.is_ascii_graphic()
                && !matches!(
                    b,
                    b'"' | b'#'
                        | b'%'
                        | b'<'
                        | b'>'
                        | b'?'
                        | b'\\'
                        | b'^'
                        | b'`'
                        | b'{'
                        | b'|'
                        | b'}'
                        | b'/'
                )
    };
    if s.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Reads a whole JSON body within what is left of `limit` and parses it.
pub async fn json_body<T: serde::de::DeserializeOwned>(
    resp: Response<Incoming>,
    limit: Duration,
) -> Result<T, ProviderError> {
    let bytes = match tokio::time::timeout(limit, resp.into_body().collect()).await {
        Err(_) => {
            return Err(ProviderError::Timeout(format!(
                "response body not complete within {:.1}s",
                limit.as_secs_f64()
            )));
        }
        Ok(Err(e)) => return Err(body_error(&e)),
        Ok(Ok(b)) => b.to_bytes(),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        // An error in a 200 body (OpenRouter reports errors during generation so): classed by
        // its code, not taken for a broken upstream.
        if serde_json::from_slice::<serde_json::Value>(&bytes)
            .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
        {
            return stream_error(&bytes);
        }
        ProviderError::Protocol(format!(
            "response body is not the expected JSON ({e}): {}",
            snippet(&bytes)
        ))
    })
}

/// A failed request: a timeout when any cause in the chain is one (the connect timeout), else a
/// connection error with the whole chain of causes.
fn request_error(e: &(dyn StdError + 'static)) -> ProviderError {
    let mut src: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(inner) = src {
        if let Some(io) = inner.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ProviderError::Timeout(error_chain(e));
        }
        src = inner.source();
    }
    ProviderError::Connect(error_chain(e))
}

/// A response body that broke off.
fn body_error(e: &hyper::Error) -> ProviderError {
    ProviderError::Connect(format!("response body broke off: {}", error_chain(e)))
}

fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let next = inner.to_string();
        // Some errors repeat their source in their own message.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        src = inner.source();
    }
    s
}

/// Connects to an upstream, directly or through the proxy the environment names for it.
#[derive(Clone)]
pub struct Connector {
    tcp: HttpConnector,
    proxies: Arc<Matcher>,
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(proxy) = self.proxies.intercept(&dst) else {
            let connecting = self.tcp.call(dst);
            return Box::pin(async move {
                Ok(Conn {
                    io: connecting.await?,
                    proxied: false,
                })
            });
        };
        let proxy_uri = proxy.uri().clone();
        if proxy_uri.scheme() != Some(&Scheme::HTTP) {
            return Box::pin(async move {
                Err(format!(
                    "proxy `{proxy_uri}`: only http:// proxies are supported (check HTTPS_PROXY, \
                     HTTP_PROXY and ALL_PROXY)"
                )
                .into())
            });
        }
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let mut tunnel = Tunnel::new(proxy_uri, self.tcp.clone());
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let connecting = tunnel.call(dst);
            Box::pin(async move {
                Ok(Conn {
                    io: connecting.await?,
                    proxied: false,
                })
            })
        } else {
            let connecting = self.tcp.call(proxy_uri);
            Box::pin(async move {
                Ok(Conn {
                    io: connecting.await?,
                    proxied: true,
                })
            })
        }
    }
}

/// A TCP connection to an upstream or to a proxy. `proxied` makes hyper write requests in
/// absolute form, as a plain-HTTP proxy expects.
pub struct Conn {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// The longest error body read from an upstream: enough for any provider's error message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Turns an error response into [`ProviderError::Status`], reading the message from the body in
/// any of the shapes providers use (`{"error": {"message", "code"|"type"}}`, `{"error": "…"}`,
/// `{"message": "…"}`, Anthropic's `{"type": "error", "error": {…}}`, Gemini's `{"error":
/// {"status"}}`). The body is read for at most `limit` and 64 KiB: an upstream that sends an
/// error status and then stalls does not hold the request past its time.
pub async fn status_error(resp: Response<Incoming>, limit: Duration) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = header_retry_after(resp.headers(), chrono::Utc::now());
    // Up to 64 KiB of it: a longer body (one echoing a long input) keeps its start, whose
    // snippet still says what happened; a broken or too slow one, nothing (the status alone).
    let body = match tokio::time::timeout(limit, error_body_start(resp.into_body())).await {
        Ok(Some(b)) => b,
        _ => Bytes::new(),
    };
    let (mut message, code) = error_message(&body);
    let classed = account_status(status, code.as_deref(), &message, &body);
    if classed != status {
        // What the upstream answered, for the logs and the client: the status is the class.
        message.push_str(&format!(" (answered HTTP {status})"));
    }
    ProviderError::Status {
        status: classed,
        retry_after: retry_after.or_else(|| retry_delay(&body)),
        message,
        code,
        param: error_param(&body),
    }
}

/// An error status that says less than its body: a key the upstream does not know (Gemini
/// answers 400 `API_KEY_INVALID`) is a 401, and an account out of credit (OpenAI's 429
/// `insufficient_quota`, Anthropic's 400 "credit balance is too low", `billing_error`) a 402 —
/// faults of the deployment, which another deployment may not share, not of the request nor a
/// rate that clears in a second.
fn account_status(status: u16, code: Option<&str>, message: &str, body: &[u8]) -> u16 {
    if matches!(code, Some("insufficient_quota" | "billing_error"))
        || message.contains("credit balance is too low")
    {
        return 402;
    }
    if status == 400
        && (message.contains("API key not valid") || memchr_find(body, b"\"API_KEY_INVALID\""))
    {
        return 401;
    }
    status
}

/// The first [`MAX_ERROR_BODY`] bytes of a body; `None` when it breaks.
async fn error_body_start(mut body: Incoming) -> Option<Bytes> {
    let mut out = Vec::new();
    while out.len() < MAX_ERROR_BODY {
        match body.frame().await {
            None => break,
            Some(Err(_)) => return None,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = MAX_ERROR_BODY - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
    Some(Bytes::from(out))
}

/// An error body's JSON, looking inside a list around it (Gemini's OpenAI-compatible API answers
/// `[{"error": …}]`).
fn error_json(body: &[u8]) -> Option<serde_json::Value> {
    match serde_json::from_slice::<serde_json::Value>(body).ok()? {
        serde_json::Value::Array(mut items) if !items.is_empty() => Some(items.swap_remove(0)),
        v => Some(v),
    }
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Gemini's wait before a retry, which it sends in the body rather than a `Retry-After` header:
/// `error.details[]` with `"@type": "type.googleapis.com/google.rpc.RetryInfo"` and a
/// `retryDelay` such as `"36s"` or `"1.5s"` (capped as a header's is).
fn retry_delay(body: &[u8]) -> Option<Duration> {
    let v = error_json(body)?;
    v.get("error")?
        .get("details")?
        .as_array()?
        .iter()
        .filter_map(|d| d.get("retryDelay")?.as_str()?.strip_suffix('s'))
        .find_map(|secs| parse_retry_after(secs, chrono::Utc::now()))
}

/// How long an error answer asks to wait: OpenAI's `retry-after-ms` (milliseconds, the more
/// precise) when it is sent and valid, else `Retry-After` ([`parse_retry_after`]).
pub fn header_retry_after(
    headers: &HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| capped_wait(ms / 1000.0))
        .or_else(|| {
            headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now))
        })
}

/// A wait of `secs` seconds, at most [`MAX_RETRY_AFTER`].
fn capped_wait(secs: f64) -> Duration {
    Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64()))
}

/// A `Retry-After` value: delay seconds (a decimal fraction is accepted) or an HTTP date, capped
/// at [`MAX_RETRY_AFTER`]. A date in the past means no wait; anything else is ignored.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    let secs = match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => s,
        Ok(_) => return None,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            let ms = (at.with_timezone(&chrono::Utc) - now).num_milliseconds();
            ms.max(0) as f64 / 1000.0
        }
    };
    Some(capped_wait(secs))
}

/// The message and code of an upstream error body.
pub fn error_message(body: &[u8]) -> (String, Option<String>) {
    let Some(v) = error_json(body) else {
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
    // The first of `code`, `type` and `status` that is a string (OpenAI sends `"code": null`
    // beside its type; llama.cpp a numeric `code` beside a telling `type`), else a numeric code.
    let field = |k: &str| err.get(k);
    let code = ["code", "type", "status"]
        .iter()
        .find_map(|k| field(k).and_then(|c| c.as_str()).map(str::to_string))
        .or_else(|| {
            ["code", "status"]
                .iter()
                .find_map(|k| field(k).and_then(|c| c.as_number()).map(|n| n.to_string()))
        });
    (message, code)
}

/// The request field an upstream error body names as the cause (`error.param`, OpenAI's shape),
/// kept to 256 bytes.
pub fn error_param(body: &[u8]) -> Option<String> {
    let v = error_json(body)?;
    let param = v.get("error")?.get("param")?.as_str()?;
    if param.is_empty() {
        return None;
    }
    let mut end = param.len().min(256);
    while !param.is_char_boundary(end) {
        end -= 1;
    }
    Some(param[..end].to_string())
}

/// The HTTP status an error reported inside a stream stands for, from its code or type (the
/// stream itself answered 200): so that it is classed as the same error answered as a status
/// would be (a rate limit, a prompt too long for the model, a bad request, an overloaded or
/// failing server).
pub fn stream_error_status(code: Option<&str>) -> u16 {
    match code.unwrap_or_default() {
        "rate_limit_exceeded"
        | "rate_limit_error"
        | "tokens"
        | "requests"
        | "RESOURCE_EXHAUSTED" => 429,
        "context_length_exceeded"
        | "invalid_request_error"
        | "invalid_request"
        | "INVALID_ARGUMENT"
        | "exceed_context_size_error" => 400,
        "overloaded_error" => 529,
        "insufficient_quota" | "billing_error" => 402,
        "authentication_error" | "invalid_api_key" => 401,
        "permission_error" => 403,
        _ => 502,
    }
}

/// The error an upstream reported inside a stream that answered 200 (an SSE event's JSON): its
/// message, code and the HTTP status it stands for, so that it is classed as the same error
/// answered as a status would be. The status comes from a known code or type
/// ([`stream_error_status`]), else from a numeric `code` or `status` that is an HTTP error status
/// (vLLM's `"code": 400`, OpenRouter's `429`), else from TGI's `error_type` (`validation` is a
/// 422, `overloaded` a 503); otherwise it is a 502.
pub fn stream_error(data: &[u8]) -> ProviderError {
    let (message, code) = error_message(data);
    let mut status = stream_error_status(code.as_deref());
    if status == 502
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
    {
        let err = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
        let numeric = ["code", "status"]
            .iter()
            .filter_map(|k| err.get(k).and_then(serde_json::Value::as_u64))
            .find(|n| (400..=599).contains(n))
            .and_then(|n| u16::try_from(n).ok());
        let tgi = match v.get("error_type").and_then(serde_json::Value::as_str) {
            Some("validation") => Some(422),
            Some("overloaded") => Some(503),
            _ => None,
        };
        if let Some(s) = numeric.or(tgi) {
            status = s;
        }
    }
    ProviderError::Embedded(Box::new(ProviderError::Status {
        status,
        message,
        code,
        param: error_param(data),
        retry_after: None,
    }))
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

/// The SSE events of a streamed response. Its first bytes may take up to `first` (a reasoning
/// model can think for minutes before it streams anything, and some servers send nothing
/// meanwhile); after them the body may be silent for at most `idle`: any bytes count, so an
/// upstream's keep-alive comments keep a slow stream open. The stream ends after its first
/// error.
pub fn sse_events(
    resp: Response<Incoming>,
    first: Duration,
    idle: Duration,
) -> impl Stream<Item = Result<Event, ProviderError>> + Send + 'static {
    struct State {
        body: BodyDataStream<Incoming>,
        decoder: crate::sse::Decoder,
        ready: std::collections::VecDeque<Event>,
        ended: bool,
        started: bool,
    }
    let state = State {
        body: BodyDataStream::new(resp.into_body()),
        decoder: crate::sse::Decoder::new(),
        ready: std::collections::VecDeque::new(),
        ended: false,
        started: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            let limit = if st.started { idle } else { first.max(idle) };
            let next = tokio::time::timeout(limit, st.body.next()).await;
            st.started = true;
            match next {
                Err(_) => {
                    st.ended = true;
                    let err = ProviderError::Timeout(format!(
                        "stream was silent for {:.1}s",
                        limit.as_secs_f64()
                    ));
                    return Some((Err(err), st));
                }
                Ok(None) => {
                    st.ended = true;
                    st.ready.extend(st.decoder.finish());
                }
                Ok(Some(Err(e))) => {
                    st.ended = true;
                    return Some((Err(body_error(&e)), st));
                }
                Ok(Some(Ok(bytes))) => {
                    if st.decoder.feed(&bytes, &mut st.ready).is_err() {
                        st.ended = true;
                        st.ready.clear();
                        let err = ProviderError::Protocol(format!(
                            "malformed event stream: a line longer than {} MiB",
                            crate::sse::MAX_LINE / (1024 * 1024)
                        ));
                        return Some((Err(err), st));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A timeout too large for a duration is a configuration error (it panicked at load).
    #[test]
    fn a_timeout_too_large_is_refused() {
        let e = HttpSettings {
            request_secs: 1e20,
            ..HttpSettings::default()
        }
        .timeouts()
        .expect_err("refused");
        assert!(e.contains("too large"), "{e}");
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn error_param_is_read_from_openai_error_bodies() {
        let body = br#"{"error":{"message":"bad","type":"invalid_request_error","param":"tools[0].function.name","code":"invalid_value"}}"#;
        assert_eq!(error_param(body).as_deref(), Some("tools[0].function.name"));
        assert_eq!(
            error_param(br#"{"error":{"message":"x","param":null}}"#),
            None
        );
        assert_eq!(
            error_param(br#"{"error":{"message":"x","param":""}}"#),
            None
        );
        assert_eq!(error_param(b"not json"), None);
        // Cut to 256 bytes at a character boundary (byte 256 falls inside an `é` here).
        let long = format!(r#"{{"error":{{"param":"a{}"}}}}"#, "é".repeat(200));
        let p = error_param(long.as_bytes()).unwrap();
        assert_eq!(p.len(), 255, "{p}");
        assert!(
            p.starts_with('a') && p[1..].chars().all(|c| c == 'é'),
            "{p}"
        );
    }
    use tokio::sync::mpsc;

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(5),
            stream_idle: Duration::from_secs(5),
        }
    }

    /// Reads one request head (and the body its content-length announces) from `sock`.
    async fn read_request(sock: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = sock.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed inside a body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                return String::from_utf8_lossy(&buf[..end + 4 + len]).to_string();
            }
            let n = sock.read(&mut chunk).await.unwrap();
            if n == 0 {
                return String::from_utf8_lossy(&buf).to_string();
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A server that answers every connection's first request with `response` and reports the
    /// request it read.
    pub(crate) async fn server(
        response: &'static str,
    ) -> (String, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let req = read_request(&mut sock).await;
                    let _ = tx.send(req);
                    sock.write_all(response.as_bytes()).await.unwrap();
                    sock.shutdown().await.ok();
                });
            }
        });
        (format!("127.0.0.1:{}", addr.port()), rx)
    }

    /// A client with no proxies.
    fn direct() -> Client {
        Client::with_proxies(&timeouts(), Matcher::builder().build()).unwrap()
    }

    /// GETs `url` with `client`, waiting at most `limit` for the answer's head.
    async fn fetch(
        client: &Client,
        url: &str,
        limit: Duration,
    ) -> Result<Response<Incoming>, ProviderError> {
        let uri = parse_uri(url).unwrap();
        client.send(get(&uri, &HeaderMap::new()), limit).await
    }

    const OK_JSON: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                           content-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}";

    #[derive(Deserialize)]
    struct Ok_ {
        ok: bool,
    }

    #[tokio::test]
    async fn posts_json_and_reads_the_answer() {
        let (addr, mut seen) = server(OK_JSON).await;
        let client = direct();
        let mut headers = HeaderMap::new();
        headers.insert("x-extra", HeaderValue::from_static("1"));
        let uri = parse_uri(&format!("http://{addr}/v1/chat/completions")).unwrap();
        let req = post_json(&uri, &headers, &serde_json::json!({"model": "m"})).unwrap();
        let resp = client.send(req, Duration::from_secs(5)).await.unwrap();
        let body: Ok_ = json_body(resp, Duration::from_secs(5)).await.unwrap();
        assert!(body.ok);
        let req = seen.recv().await.unwrap();
        assert!(
            req.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{req}"
        );
        let lower = req.to_ascii_lowercase();
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{req}"
        );
        assert!(lower.contains("\r\nx-extra: 1\r\n"), "{req}");
        assert!(lower.contains(&format!("\r\nhost: {addr}\r\n")), "{req}");
        assert!(req.ends_with("\r\n\r\n{\"model\":\"m\"}"), "{req}");
    }

    #[tokio::test]
    async fn a_plain_http_upstream_is_reached_through_the_proxy_in_absolute_form() {
        let (proxy, mut seen) = server(OK_JSON).await;
        let proxies = Matcher::builder()
            .http(format!("http://alice:s3cret@{proxy}"))
            .build();
        let client = Client::with_proxies(&timeouts(), proxies).unwrap();
        let resp = fetch(
            &client,
            "http://upstream.invalid:8000/v1/models",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let body: Ok_ = json_body(resp, Duration::from_secs(5)).await.unwrap();
        assert!(body.ok);
        let req = seen.recv().await.unwrap();
        assert!(
            req.starts_with("GET http://upstream.invalid:8000/v1/models HTTP/1.1\r\n"),
            "{req}"
        );
        // base64("alice:s3cret")
        assert!(
            req.to_ascii_lowercase()
                .contains("\r\nproxy-authorization: basic ywxpy2u6cznjcmv0\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn an_https_upstream_is_reached_through_a_connect_tunnel() {
        // The proxy accepts the tunnel and then reads what the client sends through it: the
        // start of a TLS handshake with the upstream.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let (tx, mut seen) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let connect = read_request(&mut sock).await;
            sock.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let mut hello = vec![0u8; 5];
            sock.read_exact(&mut hello).await.unwrap();
            tx.send((connect, hello)).unwrap();
        });
        let proxies = Matcher::builder()
            .https(format!("http://bob:pw@{proxy}"))
            .build();
        let client = Client::with_proxies(&timeouts(), proxies).unwrap();
        let err = fetch(
            &client,
            "https://api.example.invalid/v1/models",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProviderError::Connect(_)), "{err:?}");
        let (connect, hello) = seen.recv().await.unwrap();
        assert!(
            connect.starts_with("CONNECT api.example.invalid:443 HTTP/1.1\r\n"),
            "{connect}"
        );
        // base64("bob:pw")
        assert!(
            connect.contains("\r\nProxy-Authorization: Basic Ym9iOnB3\r\n"),
            "{connect}"
        );
        // A TLS record of type handshake (22), version 3.x.
        assert_eq!(hello[0], 22, "{hello:?}");
        assert_eq!(hello[1], 3, "{hello:?}");
    }

    #[tokio::test]
    async fn no_proxy_hosts_are_reached_directly() {
        let (addr, mut seen) = server(OK_JSON).await;
        let proxies = Matcher::builder()
            .all("http://127.0.0.1:9")
            .no("127.0.0.1")
            .build();
        let client = Client::with_proxies(&timeouts(), proxies).unwrap();
        fetch(
            &client,
            &format!("http://{addr}/v1/models"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let req = seen.recv().await.unwrap();
        assert!(req.starts_with("GET /v1/models HTTP/1.1\r\n"), "{req}");
    }

    #[tokio::test]
    async fn a_proxy_that_is_not_http_is_refused_with_the_reason() {
        let proxies = Matcher::builder().all("https://127.0.0.1:9").build();
        let client = Client::with_proxies(&timeouts(), proxies).unwrap();
        let err = fetch(
            &client,
            "http://upstream.invalid/v1/models",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        match err {
            ProviderError::Connect(m) => {
                assert!(m.contains("only http:// proxies are supported"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client = direct();
        let err = fetch(
            &client,
            &format!("http://127.0.0.1:{port}/v1/models"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        match err {
            ProviderError::Connect(m) => assert!(m.to_lowercase().contains("refused"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_error_status_carries_the_message_and_retry_after() {
        let (addr, _seen) = server(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 54\r\n\
             connection: close\r\n\r\n{\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit\"}} ",
        )
        .await;
        let client = direct();
        let err = fetch(
            &client,
            &format!("http://{addr}/v1/models"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        match err {
            ProviderError::Status {
                status,
                message,
                code,
                retry_after,
                ..
            } => {
                assert_eq!(status, 429);
                assert_eq!(message, "slow down");
                assert_eq!(code.as_deref(), Some("rate_limit"));
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Bodies that say more than their status: a key the upstream does not know, an account
    /// out of credit, Gemini's retry delay, a usage-policy refusal.
    #[tokio::test]
    async fn an_error_body_can_tell_more_than_its_status() {
        use sluice_core::error::ErrorClass;
        let cases: [(&str, &str, u16, ErrorClass, Option<u64>); 5] = [
            (
                "400 Bad Request",
                r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#,
                401,
                ErrorClass::ServerError,
                None,
            ),
            (
                "429 Too Many Requests",
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                402,
                ErrorClass::ServerError,
                None,
            ),
            (
                "400 Bad Request",
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API."}}"#,
                402,
                ErrorClass::ServerError,
                None,
            ),
            (
                "429 Too Many Requests",
                r#"{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"36s"}]}}"#,
                429,
                ErrorClass::RateLimited,
                Some(36),
            ),
            (
                "400 Bad Request",
                r#"{"error":{"message":"Invalid prompt: your prompt was flagged as potentially violating our usage policy.","type":"invalid_request_error","code":"invalid_prompt"}}"#,
                400,
                ErrorClass::ContentPolicy,
                None,
            ),
        ];
        for (status_line, body, status, class, wait) in cases {
            let err = error_for(status_line, body).await;
            assert_eq!(err.class(), class, "{body}: {err:?}");
            assert_eq!(err.retry_after(), wait.map(Duration::from_secs), "{body}");
            match err {
                ProviderError::Status {
                    status: got,
                    message,
                    ..
                } => {
                    assert_eq!(got, status, "{body}");
                    // A status classed from the body says what was answered.
                    let answered = &status_line[..3];
                    assert_eq!(
                        message.ends_with(&format!(" (answered HTTP {answered})")),
                        answered != got.to_string(),
                        "{message}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_body_cut_short_is_reported_as_broken_off() {
        let (addr, _seen) = server(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\
             connection: close\r\n\r\n{\"ok\":",
        )
        .await;
        let client = direct();
        let resp = fetch(
            &client,
            &format!("http://{addr}/v1/models"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        match json_body::<Ok_>(resp, Duration::from_secs(5)).await {
            Err(ProviderError::Connect(m)) => assert!(m.contains("broke off"), "{m}"),
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a truncated body parsed"),
        }
    }

    #[tokio::test]
    async fn a_stream_that_opens_with_a_byte_order_mark_is_read() {
        let (addr, _seen) = server(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n\
             \u{feff}data: {\"id\":\"x\"}\n\ndata: caf\u{e9}\n\n",
        )
        .await;
        let client = direct();
        let events = events_from(&client, &addr, 5000, 5000).await;
        let data: Vec<String> = events.into_iter().map(|e| e.unwrap().data).collect();
        assert_eq!(data, ["{\"id\":\"x\"}", "caf\u{e9}"]);
    }

    /// The events of the stream at `addr`, read with these limits (milliseconds).
    async fn events_from(
        client: &Client,
        addr: &str,
        first_ms: u64,
        idle_ms: u64,
    ) -> Vec<Result<Event, ProviderError>> {
        let resp = fetch(client, &format!("http://{addr}/s"), Duration::from_secs(5))
            .await
            .unwrap();
        let ms = Duration::from_millis;
        sse_events(resp, ms(first_ms), ms(idle_ms)).collect().await
    }

    /// A server that answers with an event-stream head, then writes `parts` `gap` apart.
    async fn trickling(parts: Vec<&'static [u8]>, gap: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_request(&mut sock).await;
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            sock.write_all(head.as_bytes()).await.unwrap();
            for p in parts {
                tokio::time::sleep(gap).await;
                if sock.write_all(p).await.is_err() {
                    return;
                }
            }
            sock.shutdown().await.ok();
        });
        format!("127.0.0.1:{}", addr.port())
    }

    #[tokio::test]
    async fn keep_alive_comments_hold_a_slow_stream_open_and_silence_ends_it() {
        // Six comments 100 ms apart, then the event: 700 ms in all, each gap under the 300 ms idle.
        let mut parts: Vec<&'static [u8]> = vec![b": keep-alive\n\n"; 6];
        parts.push(b"data: late\n\n");
        let addr = trickling(parts, Duration::from_millis(100)).await;
        let client = direct();
        let events = events_from(&client, &addr, 300, 300).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].as_ref().unwrap().data, "late");

        // The same event after a silence longer than the idle limit.
        let addr = trickling(vec![b"data: too late\n\n"], Duration::from_millis(600)).await;
        let events = events_from(&client, &addr, 300, 300).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            matches!(events[0], Err(ProviderError::Timeout(_))),
            "{events:?}"
        );

        // The first bytes have the longer first limit (a model thinking before it streams: the
        // idle limit ended such streams); later silences the idle one.
        let parts: Vec<&'static [u8]> = vec![b"data: thought\n\n", b"data: later\n\n"];
        let addr = trickling(parts, Duration::from_millis(600)).await;
        let events = events_from(&client, &addr, 2000, 300).await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].as_ref().unwrap().data, "thought");
        assert!(
            matches!(events[1], Err(ProviderError::Timeout(_))),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn an_invalid_byte_mid_stream_is_replaced_and_the_stream_goes_on() {
        let parts: Vec<&'static [u8]> = vec![b"data: a\xFFb\n\n", b"data: [DONE]\n\n"];
        let addr = trickling(parts, Duration::from_millis(10)).await;
        let client = direct();
        let events = events_from(&client, &addr, 500, 500).await;
        let data: Vec<String> = events.into_iter().map(|e| e.unwrap().data).collect();
        assert_eq!(data, ["a\u{fffd}b", "[DONE]"]);
    }

    #[test]
    fn an_error_bodys_code_is_its_first_string_code_or_type() {
        // OpenAI: a null code beside the type.
        let (m, code) = error_message(
            br#"{"error":{"message":"bad","type":"invalid_request_error","code":null}}"#,
        );
        assert_eq!(
            (m.as_str(), code.as_deref()),
            ("bad", Some("invalid_request_error"))
        );
        // llama.cpp: a numeric code beside a telling type.
        let (_, code) = error_message(
            br#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#,
        );
        assert_eq!(code.as_deref(), Some("exceed_context_size_error"));
        // A string code wins; a numeric code alone is kept.
        let (_, code) = error_message(br#"{"error":{"code":"rate_limit","type":"x"}}"#);
        assert_eq!(code.as_deref(), Some("rate_limit"));
        let (_, code) = error_message(br#"{"error":{"code":503,"message":"busy"}}"#);
        assert_eq!(code.as_deref(), Some("503"));
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_request(&mut sock).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = direct();
        let err = fetch(
            &client,
            &format!("http://{addr}/v1/models"),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProviderError::Timeout(_)), "{err:?}");
    }

    #[tokio::test]
    async fn an_error_body_that_stalls_does_not_hold_the_request_past_its_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            read_request(&mut sock).await;
            // The head promises 500 bytes of body; none follow.
            sock.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 500\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = direct();
        let started = std::time::Instant::now();
        let err = fetch(
            &client,
            &format!("http://{addr}/v1/models"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert_status_without_body(err, 503);
    }

    /// An error status whose body was not read (too slow or too long): the status stands alone.
    fn assert_status_without_body(err: ProviderError, expected: u16) {
        match err {
            ProviderError::Status {
                status, message, ..
            } => {
                assert_eq!(status, expected);
                assert_eq!(message, "(empty body)");
            }
            other => panic!("{other:?}"),
        }
    }

    /// The error a `GET` answered `status_line` with `body` gives.
    async fn error_for(status_line: &str, body: &str) -> ProviderError {
        let response = format!(
            "HTTP/1.1 {status_line}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (addr, _seen) = server(Box::leak(response.into_boxed_str())).await;
        fetch(
            &direct(),
            &format!("http://{addr}/v1/models"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
    }

    /// An error body over 64 KiB (one echoing a long input) is not read whole, and its start
    /// still says something (it was dropped for "(empty body)").
    #[tokio::test]
    async fn an_oversized_error_body_is_read_only_to_its_start() {
        let body = format!("{{\"error\":{{\"message\":\"{}\"}}}}", "x".repeat(100_000));
        let err = error_for("500 Internal Server Error", &body).await;
        match err {
            ProviderError::Status {
                status, message, ..
            } => {
                assert_eq!(status, 500);
                assert!(
                    message.starts_with("{\"error\":{\"message\":\"xxx"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// Gemini's OpenAI-compatible API wraps its error in a list: its message, status and retry
    /// delay are read from inside it.
    #[test]
    fn an_error_in_a_list_is_read() {
        let body = br#"[{"error": {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}]"#;
        assert_eq!(
            error_message(body),
            ("Quota exceeded".into(), Some("RESOURCE_EXHAUSTED".into()))
        );
        assert_eq!(retry_delay(body), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let p = |v| parse_retry_after(v, now);
        assert_eq!(p("7"), Some(Duration::from_secs(7)));
        assert_eq!(p(" 1.5 "), Some(Duration::from_millis(1500)));
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(
            p("Wed, 21 Oct 2015 07:28:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(p("Wed, 21 Oct 2015 07:27:00 GMT"), Some(Duration::ZERO));
        // Far too long (or milliseconds sent as seconds): capped, never a panic or an overflow.
        assert_eq!(p("60000"), Some(MAX_RETRY_AFTER));
        assert_eq!(p("1e20"), Some(MAX_RETRY_AFTER));
        assert_eq!(p("Fri, 01 Jan 2100 00:00:00 GMT"), Some(MAX_RETRY_AFTER));
        for bad in ["-1", "NaN", "inf", "soon", ""] {
            assert_eq!(p(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_after_ms_is_read_before_retry_after() {
        let now = chrono::Utc::now();
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, http::HeaderValue::from_static(v));
            }
            header_retry_after(&m, now)
        };
        assert_eq!(
            h(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(h(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        // An invalid one leaves `Retry-After`; a huge one is capped.
        assert_eq!(
            h(&[("retry-after-ms", "soon"), ("retry-after", "2")]),
            Some(Duration::from_secs(2))
        );
        assert_eq!(h(&[("retry-after-ms", "1e12")]), Some(MAX_RETRY_AFTER));
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert!(parse_uri("https://api.openai.com/v1/chat/completions").is_ok());
        assert!(parse_uri("http://127.0.0.1:8000/v1").is_ok());
        assert!(parse_uri("ftp://example.com/x").is_err());
        assert!(parse_uri("/v1/chat").is_err());
        assert!(parse_uri("http://exa mple.com/").is_err());
    }

    #[test]
    fn path_segments_are_escaped_only_where_needed() {
        assert!(matches!(
            path_segment("gpt-4o-mini_2024.1~x"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(path_segment("my deploy/v2?x#y"), "my%20deploy%2Fv2%3Fx%23y");
        assert_eq!(path_segment("100%"), "100%25");
        assert_eq!(path_segment("é"), "%C3%A9");
        assert_eq!(path("tunedModels/my model"), "tunedModels/my%20model");
    }

    #[test]
    fn an_error_inside_a_stream_is_classed_by_its_number_when_its_code_says_nothing() {
        use sluice_core::error::ErrorClass;
        let class = |data: &str| stream_error(data.as_bytes()).class();
        // vLLM: a prompt too long, as a 400 with its exception's name for a type.
        assert_eq!(
            class(
                r#"{"error":{"message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.","type":"BadRequestError","param":null,"code":400}}"#
            ),
            ErrorClass::ContextWindowExceeded
        );
        // OpenRouter: numeric codes.
        assert_eq!(
            class(r#"{"error":{"code":429,"message":"Rate limit exceeded"}}"#),
            ErrorClass::RateLimited
        );
        // TGI: a bare message with its error type.
        assert_eq!(
            class(
                r#"{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 500 `max_new_tokens`","error_type":"validation"}"#
            ),
            ErrorClass::ContextWindowExceeded
        );
        assert_eq!(
            class(r#"{"error":"Model is overloaded","error_type":"overloaded"}"#),
            ErrorClass::ServerError
        );
        assert!(matches!(
            stream_error(br#"{"error":"Model is overloaded","error_type":"overloaded"}"#),
            ProviderError::Embedded(e) if matches!(*e, ProviderError::Status { status: 503, .. })
        ));
        // Gemini: its status names the class.
        assert_eq!(
            class(
                r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#
            ),
            ErrorClass::RateLimited
        );
        // Nothing telling: a server error.
        assert!(matches!(
            stream_error(br#"{"error":{"message":"boom"}}"#),
            ProviderError::Embedded(e) if matches!(*e, ProviderError::Status { status: 502, .. })
        ));
    }

    /// An error inside a 200 answer is answered as the status it stands for, and its message
    /// says where it came from: the upstream sent no such status.
    #[test]
    fn an_error_inside_a_200_answer_names_no_status_it_never_sent() {
        let e = stream_error(br#"{"error":{"message":"boom mid-stream"}}"#).to_error("up");
        assert_eq!(e.code, sluice_core::error::ErrorCode::UpstreamError);
        assert_eq!(
            e.message,
            "provider `up` answered 200 with an error inside: boom mid-stream"
        );
        let e = stream_error(br#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#)
            .to_error("up");
        assert_eq!(e.code, sluice_core::error::ErrorCode::UpstreamRateLimited);
        assert!(!e.message.contains("HTTP"), "{}", e.message);
        // Refused credentials: the hint, never the upstream's words (they may quote the key).
        let e = stream_error(
            br#"{"error":{"message":"Incorrect API key provided: sk-ab***cd","code":"invalid_api_key"}}"#,
        )
        .to_error("up");
        assert_eq!(e.code, sluice_core::error::ErrorCode::UpstreamAuth);
        assert!(!e.message.contains("sk-"), "{}", e.message);
        assert!(
            e.message.contains("check the provider's api_key"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_error_inside_a_stream_is_classed_by_its_code() {
        use sluice_core::error::ErrorClass;
        let class = |code: Option<&str>, message: &str| {
            ProviderError::Status {
                status: stream_error_status(code),
                message: message.into(),
                code: code.map(str::to_string),
                param: None,
                retry_after: None,
            }
            .class()
        };
        assert_eq!(
            class(Some("rate_limit_exceeded"), "slow down"),
            ErrorClass::RateLimited
        );
        assert_eq!(
            class(Some("overloaded_error"), "Overloaded"),
            ErrorClass::ServerError
        );
        assert_eq!(
            class(
                Some("invalid_request_error"),
                "prompt is too long: 300000 tokens > 200000 maximum"
            ),
            ErrorClass::ContextWindowExceeded
        );
        assert_eq!(
            class(Some("invalid_request_error"), "bad field"),
            ErrorClass::ClientError
        );
        assert_eq!(class(None, "something broke"), ErrorClass::ServerError);
    }

    /// Each connection thread has a pool of its own: a thread's requests reuse its connection,
    /// and never one that another thread's runtime reads and writes (a pool shared by all
    /// handed every response of such a connection from one thread to another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_connection_thread_has_a_pool_of_its_own() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        // A keep-alive server: every request on a connection answered, until the client closes.
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if sock.write_all(ok.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        let client = direct();
        let url = format!("http://{addr}/");
        // Thread 1 makes two requests and keeps its runtime (and so its connection) running
        // while thread 2 makes two more.
        let (first_done, first_rx) = tokio::sync::oneshot::channel();
        let (second_done, second_rx) = tokio::sync::oneshot::channel();
        let (release, hold) = tokio::sync::oneshot::channel();
        let one =
            two_requests_on_thread(1, client.clone(), url.clone(), None, first_done, Some(hold));
        let two = two_requests_on_thread(2, client, url, Some(first_rx), second_done, None);
        second_rx.await.unwrap();
        release.send(()).unwrap();
        tokio::task::spawn_blocking(move || {
            one.join().unwrap();
            two.join().unwrap();
        })
        .await
        .unwrap();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// On a thread of its own marked as connection thread `n`: waits for `start`, GETs `url`
    /// twice, says `done`, and keeps its runtime running until `hold`.
    fn two_requests_on_thread(
        n: usize,
        client: Client,
        url: String,
        start: Option<tokio::sync::oneshot::Receiver<()>>,
        done: tokio::sync::oneshot::Sender<()>,
        hold: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            sluice_core::shard::enter(n);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Some(start) = start {
                    start.await.unwrap();
                }
                for _ in 0..2 {
                    let resp = fetch(&client, &url, Duration::from_secs(5)).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.into_body().collect().await.unwrap();
                }
                done.send(()).unwrap();
                if let Some(hold) = hold {
                    hold.await.unwrap();
                }
            });
        })
    }
}
