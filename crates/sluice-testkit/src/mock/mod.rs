//! The mock upstream: an axum server that speaks the providers' wire protocols.

mod anthropic;
mod gemini;
mod openai;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use wire::Ev;

/// Model names with special behaviour. The same names work for every API: the
/// body's `model` (OpenAI, Anthropic), the Azure deployment name, or the model
/// in a Gemini path (`/v1beta/models/echo:generateContent`).
pub mod models {
    /// Answers with the text of the last user message; when streaming, one
    /// chunk per whitespace-separated word (the whitespace is kept). Usage:
    /// prompt = whitespace words of all messages, completion = words of the answer.
    pub const ECHO: &str = "echo";
    /// Streams 40 content chunks (`"tok0 "`, `"tok1 "`, ...) 50 ms apart, then
    /// the finish chunk (and usage when asked) and the end marker. A client
    /// that drops the body early shows up in `MockUpstream::cancelled_streams`.
    pub const SLOW_STREAM: &str = "slow-stream";
    /// 500 in the provider's error shape.
    pub const FAULT_500: &str = "fault-500";
    /// 503 in the provider's error shape.
    pub const FAULT_503: &str = "fault-503";
    /// 429 with `retry-after: 1` and the provider's rate-limit error body.
    pub const FAULT_429: &str = "fault-429";
    /// 401 in the provider's error shape.
    pub const FAULT_401: &str = "fault-401";
    /// 400 context-length error (OpenAI code `context_length_exceeded`,
    /// Anthropic `invalid_request_error` "prompt is too long: ...",
    /// Gemini `INVALID_ARGUMENT`).
    pub const FAULT_400_CONTEXT: &str = "fault-400-context";
    /// 400 content-policy refusal (OpenAI code `content_policy_violation`,
    /// Anthropic `invalid_request_error` "... content filtering policy",
    /// Gemini `INVALID_ARGUMENT` "... content filter ...").
    pub const FAULT_CONTENT_POLICY: &str = "fault-content-policy";
    /// Never answers (sleeps one hour).
    pub const FAULT_HANG: &str = "fault-hang";
    /// Waits 300 ms, then answers normally.
    pub const FAULT_SLOW: &str = "fault-slow";
    /// 200, `content-type: application/json`, body `this is not json{`.
    pub const FAULT_GARBAGE: &str = "fault-garbage";
    /// Streaming: 200 `text/event-stream` whose first data line is
    /// `data: {not json`. Non-streaming requests are answered normally.
    pub const FAULT_BAD_SSE: &str = "fault-bad-sse";
    /// Streaming: the first two events of the normal stream, then the
    /// connection is aborted (no `[DONE]` / `message_stop`). Non-streaming:
    /// the first half of the JSON body, then the connection is aborted.
    pub const FAULT_CUT: &str = "fault-cut";
    /// A normal answer without any usage (`usage` / `usageMetadata` omitted,
    /// no usage chunk in streams).
    pub const FAULT_NO_USAGE: &str = "fault-no-usage";
    /// Streaming: the first event of the normal stream (the role chunk,
    /// `message_start`), then only SSE comments (`: keep-alive`) every 200 ms
    /// for a minute. Non-streaming: the response headers, then nothing for an
    /// hour.
    pub const FAULT_STALL: &str = "fault-stall";
    /// Streaming: the response headers at once, then the normal stream after
    /// 1.5 s (a model that thinks before its first chunk). Non-streaming:
    /// answered normally.
    pub const FAULT_LATE_FIRST: &str = "fault-late-first";
    /// Streaming: the normal stream without its last two events (OpenAI: the usage chunk and
    /// `[DONE]`; Anthropic: `message_delta` with the usage, and `message_stop`), then the
    /// connection is aborted: content reached the client, the final usage never comes.
    /// Non-streaming: as `fault-cut`.
    pub const FAULT_CUT_LATE: &str = "fault-cut-late";

    /// Every `fault-*` name.
    pub const ALL_FAULTS: &[&str] = &[
        FAULT_500,
        FAULT_503,
        FAULT_429,
        FAULT_401,
        FAULT_400_CONTEXT,
        FAULT_CONTENT_POLICY,
        FAULT_HANG,
        FAULT_SLOW,
        FAULT_GARBAGE,
        FAULT_BAD_SSE,
        FAULT_CUT,
        FAULT_NO_USAGE,
        FAULT_STALL,
        FAULT_LATE_FIRST,
        FAULT_CUT_LATE,
    ];
}

/// One request as the mock upstream received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path without the query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Raw query string without the `?`, if any.
    pub query: Option<String>,
    /// Headers in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or `Value::Null` when empty or not JSON.
    pub body: Value,
}

impl CapturedRequest {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Value of the query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        wire::query_param(self.query.as_deref(), name)
    }
}

#[derive(Default)]
pub(crate) struct Shared {
    requests: Mutex<Vec<CapturedRequest>>,
    cancelled: AtomicUsize,
    next_id: AtomicU64,
    /// Runtime faults: model name → the fault model it behaves as.
    faults: Mutex<HashMap<String, String>>,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<CapturedRequest>> {
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn faults(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The fault a request for `model` gets: the one set with
    /// [`MockUpstream::set_fault`], else the one the name itself selects.
    pub(crate) fn fault_for(&self, model: &str) -> Option<Fault> {
        match self.faults().get(model) {
            Some(f) => Fault::from_model(f),
            None => Fault::from_model(model),
        }
    }
}

/// An in-process fake of the OpenAI, Azure OpenAI, Anthropic and Gemini APIs.
///
/// Started with [`MockUpstream::start`] on `127.0.0.1` with a free port; the
/// server runs on a tokio task of the current runtime and stops accepting
/// connections when the value is dropped.
///
/// Routes:
/// * OpenAI: `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`
///   (need `authorization: Bearer <key>`, else 401).
/// * Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions` and
///   `.../embeddings` (need query `api-version`, else 404, and header `api-key`,
///   else 401).
/// * Anthropic: `POST /v1/messages` (need `x-api-key`, else 401,
///   `anthropic-version`, else 400, and `max_tokens` in the body, else 400).
/// * Gemini: `POST /v1beta/models/{model}:generateContent` and
///   `POST /v1beta/models/{model}:streamGenerateContent?alt=sse` (need header
///   `x-goog-api-key` or query `key`, else 403).
///
/// Requests with non-empty `tools` get the tool-call fixtures. See [`models`]
/// for the model names that echo, stream slowly or inject faults.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Binds `127.0.0.1:0` and serves on a spawned task.
    ///
    /// # Panics
    /// When no local port can be bound (a broken test environment).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock upstream: cannot bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("mock upstream: bound listener has no local address");
        let shared = Arc::new(Shared::default());
        let app = router(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url()` followed by `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<CapturedRequest> {
        self.shared.requests().clone()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<CapturedRequest> {
        self.shared.requests().last().cloned()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests().len()
    }

    /// Number of streamed responses whose body was dropped (client went away)
    /// before the stream finished.
    pub fn cancelled_streams(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Number of requests received so far whose JSON body's `model` is `model`
    /// (Gemini and Azure requests name the model in the path, not the body).
    pub fn count_for(&self, model: &str) -> usize {
        self.shared
            .requests()
            .iter()
            .filter(|r| r.body.get("model").and_then(Value::as_str) == Some(model))
            .count()
    }

    /// From now on, requests for `model` behave as if they asked for the fault
    /// model `fault` (one of [`models::ALL_FAULTS`], e.g. `"fault-500"`); `None`
    /// makes `model` behave normally again. The request's own model name is
    /// still used for everything else (the answer's `model`, [`Self::count_for`]).
    ///
    /// # Panics
    /// When `fault` is not a fault model name.
    pub fn set_fault(&self, model: &str, fault: Option<&str>) {
        let mut faults = self.shared.faults();
        match fault {
            Some(f) => {
                assert!(
                    Fault::from_model(f).is_some(),
                    "mock upstream: `{f}` is not a fault model; see models::ALL_FAULTS"
                );
                faults.insert(model.to_owned(), f.to_owned());
            }
            None => {
                faults.remove(model);
            }
        }
    }

    /// Forgets the captured requests and resets the cancelled-stream counter.
    pub fn clear(&self) {
        self.shared.requests().clear();
        self.shared.cancelled.store(0, Ordering::SeqCst);
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::list_models))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(openai::azure_chat_completions),
        )
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(openai::azure_embeddings),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1beta/models/{target}", post(gemini::models_call))
        .fallback(no_route)
        .with_state(shared)
}

async fn no_route(req: Incoming) -> Response {
    json_value(
        StatusCode::NOT_FOUND,
        &json!({"error": {
            "message": format!("mock upstream: no route for {} {}", req.method, req.path),
            "type": "invalid_request_error",
            "param": null,
            "code": "unknown_url"
        }}),
    )
}

/// The request as handlers see it; extracting it records a [`CapturedRequest`].
pub(crate) struct Incoming {
    method: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Value,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some_and(|v| !v.trim().is_empty())
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        wire::query_param(self.query.as_deref(), name)
    }

    fn str_field(&self, name: &str) -> &str {
        self.body.get(name).and_then(Value::as_str).unwrap_or("")
    }

    fn stream_flag(&self) -> bool {
        self.body
            .get("stream")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

impl FromRequest<Arc<Shared>> for Incoming {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<Shared>) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20)
            .await
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()).into_response())?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let incoming = Incoming {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers,
            body,
        };
        state.requests().push(CapturedRequest {
            method: incoming.method.clone(),
            path: incoming.path.clone(),
            query: incoming.query.clone(),
            headers: incoming
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: incoming.body.clone(),
        });
        Ok(incoming)
    }
}

/// Which wire protocol an answer is rendered in (Azure uses OpenAI's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Flavor {
    fn echo_text(self, body: &Value) -> String {
        match self {
            Flavor::OpenAi => openai::echo_text(body),
            Flavor::Anthropic => anthropic::echo_text(body),
            Flavor::Gemini => gemini::echo_text(body),
        }
    }

    fn prompt_words(self, body: &Value) -> u64 {
        match self {
            Flavor::OpenAi => openai::prompt_words(body),
            Flavor::Anthropic => anthropic::prompt_words(body),
            Flavor::Gemini => gemini::prompt_words(body),
        }
    }

    fn has_tools(self, body: &Value) -> bool {
        let non_empty = |key: &str| {
            body.get(key)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        };
        match self {
            Flavor::OpenAi => non_empty("tools") || non_empty("functions"),
            Flavor::Anthropic | Flavor::Gemini => non_empty("tools"),
        }
    }

    fn fault_error(self, fault: Fault) -> (StatusCode, Value) {
        match self {
            Flavor::OpenAi => openai::fault_error(fault),
            Flavor::Anthropic => anthropic::fault_error(fault),
            Flavor::Gemini => gemini::fault_error(fault),
        }
    }

    fn bad_sse_event(self) -> &'static str {
        match self {
            Flavor::Anthropic => "event: message_start\ndata: {not json\n\n",
            Flavor::OpenAi | Flavor::Gemini => "data: {not json\n\n",
        }
    }

    fn sse_content_type(self) -> &'static str {
        match self {
            Flavor::Gemini => "text/event-stream",
            Flavor::OpenAi | Flavor::Anthropic => "text/event-stream; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Status500,
    Status503,
    Status429,
    Status401,
    Context,
    ContentPolicy,
    Hang,
    Slow,
    Garbage,
    BadSse,
    Cut,
    NoUsage,
    Stall,
    LateFirst,
    CutLate,
}

impl Fault {
    fn from_model(model: &str) -> Option<Fault> {
        Some(match model {
            models::FAULT_500 => Fault::Status500,
            models::FAULT_503 => Fault::Status503,
            models::FAULT_429 => Fault::Status429,
            models::FAULT_401 => Fault::Status401,
            models::FAULT_400_CONTEXT => Fault::Context,
            models::FAULT_CONTENT_POLICY => Fault::ContentPolicy,
            models::FAULT_HANG => Fault::Hang,
            models::FAULT_SLOW => Fault::Slow,
            models::FAULT_GARBAGE => Fault::Garbage,
            models::FAULT_BAD_SSE => Fault::BadSse,
            models::FAULT_CUT => Fault::Cut,
            models::FAULT_NO_USAGE => Fault::NoUsage,
            models::FAULT_STALL => Fault::Stall,
            models::FAULT_LATE_FIRST => Fault::LateFirst,
            models::FAULT_CUT_LATE => Fault::CutLate,
            _ => return None,
        })
    }
}

/// Generated text answer (echo, slow-stream) rendered per provider.
pub(crate) struct Script {
    pieces: Vec<String>,
    /// Pause before every piece but the first.
    delay: Duration,
    prompt_words: u64,
    completion_words: u64,
}

impl Script {
    fn text(&self) -> String {
        self.pieces.concat()
    }

    fn delay_before(&self, index: usize) -> Duration {
        if index == 0 {
            Duration::ZERO
        } else {
            self.delay
        }
    }
}

pub(crate) enum Source {
    Fixture { tools: bool },
    Script(Script),
}

/// What a handler wants to generate.
pub(crate) struct Gen<'a> {
    body: &'a Value,
    model: &'a str,
    id: u64,
    stream: bool,
    no_usage: bool,
}

pub(crate) enum Answer {
    Json(String),
    Stream(Vec<Ev>),
}

/// Handles the faults that replace or delay the answer. `Some` is the response
/// to send instead of the normal one.
async fn pre_fault(flavor: Flavor, fault: Option<Fault>) -> Option<Response> {
    match fault? {
        f @ (Fault::Status500
        | Fault::Status503
        | Fault::Status429
        | Fault::Status401
        | Fault::Context
        | Fault::ContentPolicy) => {
            let (status, body) = flavor.fault_error(f);
            let mut resp = json_value(status, &body);
            if f == Fault::Status429 {
                resp.headers_mut()
                    .insert(RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            }
            Some(resp)
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
        Fault::Slow => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            None
        }
        Fault::Garbage => Some(
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "application/json")],
                "this is not json{",
            )
                .into_response(),
        ),
        Fault::BadSse
        | Fault::Cut
        | Fault::CutLate
        | Fault::NoUsage
        | Fault::Stall
        | Fault::LateFirst => None,
    }
}

/// The shared path of every generation endpoint (chat, messages, generateContent).
async fn generate(
    shared: &Arc<Shared>,
    flavor: Flavor,
    model: &str,
    stream: bool,
    body: &Value,
) -> Response {
    let fault = shared.fault_for(model);
    if let Some(resp) = pre_fault(flavor, fault).await {
        return resp;
    }
    let source = match model {
        models::ECHO => {
            let text = flavor.echo_text(body);
            let pieces = wire::split_keep_space(&text);
            Source::Script(Script {
                completion_words: wire::words(&text),
                pieces,
                delay: Duration::ZERO,
                prompt_words: flavor.prompt_words(body),
            })
        }
        models::SLOW_STREAM => Source::Script(Script {
            pieces: (0..40).map(|i| format!("tok{i} ")).collect(),
            delay: Duration::from_millis(50),
            prompt_words: flavor.prompt_words(body),
            completion_words: 40,
        }),
        _ => Source::Fixture {
            tools: flavor.has_tools(body),
        },
    };
    let g = Gen {
        body,
        model,
        id: shared.next_id(),
        stream,
        no_usage: fault == Some(Fault::NoUsage),
    };
    let answer = match flavor {
        Flavor::OpenAi => openai::chat(&g, &source),
        Flavor::Anthropic => anthropic::messages_answer(&g, &source),
        Flavor::Gemini => gemini::generate_answer(&g, &source),
    };
    deliver(shared, flavor, fault, answer)
}

/// Sends an answer, applying the faults that break the body.
fn deliver(shared: &Arc<Shared>, flavor: Flavor, fault: Option<Fault>, answer: Answer) -> Response {
    match answer {
        Answer::Json(text) if matches!(fault, Some(Fault::Cut | Fault::CutLate)) => {
            let mut half = text.len() / 2;
            while !text.is_char_boundary(half) {
                half -= 1;
            }
            body_stream(
                shared,
                "application/json",
                vec![Ev::now(&text[..half])],
                true,
            )
        }
        Answer::Json(text) if fault == Some(Fault::Stall) => body_stream(
            shared,
            "application/json",
            vec![Ev::after(Duration::from_secs(3600), text)],
            false,
        ),
        Answer::Json(text) => json_text(StatusCode::OK, text),
        Answer::Stream(events) => {
            let content_type = flavor.sse_content_type();
            match fault {
                Some(Fault::BadSse) => body_stream(
                    shared,
                    content_type,
                    vec![Ev::now(flavor.bad_sse_event())],
                    false,
                ),
                Some(Fault::Cut) => body_stream(
                    shared,
                    content_type,
                    events.into_iter().take(2).collect(),
                    true,
                ),
                Some(Fault::CutLate) => {
                    let keep = events.len().saturating_sub(2);
                    body_stream(
                        shared,
                        content_type,
                        events.into_iter().take(keep).collect(),
                        true,
                    )
                }
                Some(Fault::LateFirst) => {
                    let mut events = events;
                    if let Some(first) = events.first_mut() {
                        first.delay = Duration::from_millis(1500);
                    }
                    body_stream(shared, content_type, events, false)
                }
                Some(Fault::Stall) => {
                    let keep_alive =
                        (0..300).map(|_| Ev::after(Duration::from_millis(200), ": keep-alive\n\n"));
                    body_stream(
                        shared,
                        content_type,
                        events.into_iter().take(1).chain(keep_alive).collect(),
                        false,
                    )
                }
                _ => body_stream(shared, content_type, events, false),
            }
        }
    }
}

/// Counts a stream as cancelled when it is dropped before it finished.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A 200 response whose body is written piece by piece. With `cut`, the body
/// ends with an I/O error after the pieces, so hyper aborts the connection.
fn body_stream(
    shared: &Arc<Shared>,
    content_type: &'static str,
    events: Vec<Ev>,
    cut: bool,
) -> Response {
    let shared = Arc::clone(shared);
    let body = async_stream::stream! {
        let mut guard = StreamGuard { shared, finished: false };
        for ev in events {
            if !ev.delay.is_zero() {
                tokio::time::sleep(ev.delay).await;
            }
            yield Ok::<Bytes, std::io::Error>(Bytes::from(ev.text));
        }
        guard.finished = true;
        if cut {
            // Give hyper the chance to flush what was sent before aborting.
            tokio::time::sleep(Duration::from_millis(50)).await;
            yield Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "mock upstream: fault-cut aborts the body",
            ));
        }
    };
    (
        StatusCode::OK,
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        Body::from_stream(body),
    )
        .into_response()
}

fn json_text(status: StatusCode, text: String) -> Response {
    (status, [(CONTENT_TYPE, "application/json")], text).into_response()
}

fn json_value(status: StatusCode, value: &Value) -> Response {
    json_text(status, value.to_string())
}
