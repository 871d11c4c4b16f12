//! Sluice's HTTP edge (axum).
//!
//! - `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`: the OpenAI-compatible API
//!   ([`openai`]).
//! - `/v1/messages`: the Anthropic-compatible API ([`anthropic`]), translated to the same gateway.
//! - `/api/requests`: the request log; `/api/deployments`: every deployment's live state;
//!   `/api/config/reload`: re-reads the configuration ([`admin`]). Behind the admin key.
//! - `/metrics` (Prometheus), `/health`.
//!
//! Every response carries `x-sluice-request-id`; the same id is the request's record id. Errors
//! are turned into HTTP only here ([`error`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::keys::{Actor, Role};
use sluice_core::record::LogStore;
use sluice_core::secret::Secret;
use sluice_gateway::{Gateway, RequestContext};

pub mod admin;
pub mod anthropic;
pub mod body;
pub mod conn;
pub mod error;
pub mod keys;
pub mod openai;
pub mod usage;

/// Header names the request path reads or writes on every request, made once: a name given as
/// text is parsed (checked and lowercased) on each use.
pub(crate) mod names {
    use axum::http::HeaderName;

    pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const X_SLUICE_REQUEST_ID: HeaderName = HeaderName::from_static("x-sluice-request-id");
    pub const X_SLUICE_COST_USD: HeaderName = HeaderName::from_static("x-sluice-cost-usd");
    pub const X_SLUICE_ROUTE: HeaderName = HeaderName::from_static("x-sluice-route");
    pub const X_SLUICE_USER: HeaderName = HeaderName::from_static("x-sluice-user");
    pub const X_SLUICE_SESSION: HeaderName = HeaderName::from_static("x-sluice-session");
    pub const X_SLUICE_TAGS: HeaderName = HeaderName::from_static("x-sluice-tags");
    pub const X_SLUICE_METADATA: HeaderName = HeaderName::from_static("x-sluice-metadata");
    pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
    pub const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
    /// Headers a reverse proxy adds to what it forwards.
    pub const FORWARDING: [HeaderName; 5] = [
        HeaderName::from_static("forwarded"),
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-forwarded-host"),
        HeaderName::from_static("x-real-ip"),
        HeaderName::from_static("via"),
    ];
}

use error::ApiError;

/// `[server]` configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:4141`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Largest request body accepted, in bytes (default 32 MiB).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Web origins (`https://app.example.com`, `http://localhost:3000`, or `*`) whose pages may
    /// call the API from a browser (CORS). Default: none.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Seconds a client may leave an answer unread (its receive window full, nothing taken)
    /// before its connection is closed and the request's slots are given back (default 60).
    #[serde(default = "default_client_stall")]
    pub client_stall_secs: u64,
    /// Seconds a connection may wait for a request's head to arrive whole: an idle keep-alive
    /// connection is closed after it, and so is one that trickles a head (default 75, above the
    /// 60 s idle timeout of common load balancers, which must close first).
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Threads that serve client connections, each running its connections start to finish
    /// (see [`conn::Shards`]). `None`: one per CPU; `Some(0)`: the shared work-stealing runtime.
    #[serde(default)]
    pub connection_threads: Option<usize>,
}

/// The most `connection_threads` accepted.
pub const MAX_CONNECTION_THREADS: usize = sluice_core::shard::MAX;

fn default_listen() -> String {
    "127.0.0.1:4141".into()
}
fn default_max_body() -> usize {
    32 * 1024 * 1024
}
fn default_grace() -> u64 {
    20
}
fn default_client_stall() -> u64 {
    60
}
fn default_idle() -> u64 {
    75
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            shutdown_grace_secs: default_grace(),
            cors_origins: Vec::new(),
            client_stall_secs: default_client_stall(),
            idle_timeout_secs: default_idle(),
            connection_threads: None,
        }
    }
}

impl ServerConfig {
    /// How many connection threads to start: 0 for none (connections are served on the shared
    /// runtime).
    pub fn connection_threads(&self) -> usize {
        self.connection_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_CONNECTION_THREADS)
        })
    }

    /// The CORS policy for `cors_origins`: `None` without any. The error names the key.
    pub fn cors(&self) -> Result<Option<tower_http::cors::CorsLayer>, String> {
        use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
        if self.cors_origins.is_empty() {
            return Ok(None);
        }
        let any = self.cors_origins.iter().any(|o| o == "*");
        let mut origins = Vec::new();
        for o in &self.cors_origins {
            if o == "*" {
                continue;
            }
            let well_formed = o.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && !host.contains(['/', '?', '#', ' '])
            });
            let value = HeaderValue::from_str(o).ok().filter(|_| well_formed);
            origins.push(value.ok_or_else(|| {
                format!(
                    "cors_origins: `{o}` is not an origin; write scheme://host[:port] without a path (e.g. http://localhost:3000), or \"*\""
                )
            })?);
        }
        let allow = if any {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(origins)
        };
        let expose: Vec<header::HeaderName> = [
            "x-request-id",
            "x-sluice-request-id",
            "request-id",
            "x-sluice-route",
            "x-sluice-cache",
            "x-sluice-cost-usd",
            "x-should-retry",
            "retry-after",
            "x-ratelimit-limit-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        ]
        .into_iter()
        .map(header::HeaderName::from_static)
        .collect();
        Ok(Some(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([http::Method::GET, http::Method::POST, http::Method::DELETE])
                // The SDKs send `authorization`, `x-api-key`, `anthropic-version`,
                // `x-stainless-*`…: whatever the preflight asks for (a `*` would not cover
                // `authorization`).
                .allow_headers(AllowHeaders::mirror_request())
                .expose_headers(expose)
                .max_age(std::time::Duration::from_secs(600)),
        ))
    }

    /// The listen address, parsed.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "listen: `{}` is not an address like 127.0.0.1:4141",
                self.listen
            )
        })
    }
}

/// What the handlers share.
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub store: Arc<dyn LogStore>,
    /// The admin key (`SLUICE_ADMIN_KEY`). When set, `/api` and `/v1` require it; when unset,
    /// Sluice only listens on loopback.
    pub admin_key: Option<Secret>,
    pub max_body_bytes: usize,
    /// Browser access (`server.cors_origins`); `None`: no CORS headers.
    pub cors: Option<tower_http::cors::CorsLayer>,
    /// Re-reads the configuration and swaps the router (`POST /api/config/reload`, SIGHUP).
    pub reloader: Option<Arc<dyn Reload>>,
    /// Virtual keys. When any is active (or the admin key is set), `/v1` requires a key.
    pub keys: Option<Arc<keys::KeyCache>>,
    /// Where admin actions are recorded.
    pub audit: Option<Arc<dyn sluice_core::keys::AuditStore>>,
    /// Spend and usage from the request log (`/api/usage`).
    pub usage: Option<Arc<dyn sluice_core::usage::UsageStore>>,
    /// Set once the shutdown grace period is over: the requests still running end at once (a
    /// 503, or a stream cut with an error event), so that their records are written as
    /// cancelled before the request log is drained.
    pub abort: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Resolves once the gateway gives up on the requests still running at shutdown ([`AppState::abort`]).
pub(crate) async fn aborted(mut abort: tokio::sync::watch::Receiver<bool>) {
    if abort.wait_for(|a| *a).await.is_err() {
        // Never set, and gone: nothing will abort.
        std::future::pending::<()>().await;
    }
}

/// What a request still running when the shutdown grace period ends is answered.
pub(crate) fn shutting_down() -> Error {
    Error::new(
        ErrorCode::Unavailable,
        "the gateway is shutting down and this request ran past its grace period; retry it",
    )
}

/// Reloads the configuration: `Ok` with a one-line summary of what is now served, `Err` with the
/// error (the running configuration stays).
pub trait Reload: Send + Sync + 'static {
    fn reload(&self) -> Result<String, String>;
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("admin_key", &self.admin_key)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

pub type SharedState = Arc<AppState>;

/// A path parameter (an id), whose rejection is an OpenAI-style 400 rather than axum's plain text
/// (for example a percent-encoded byte that is not UTF-8).
pub struct IdPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            // A whole key pasted where its id belongs stands for its id; its secret is never
            // repeated.
            Ok(axum::extract::Path(id)) if id.starts_with(sluice_core::keys::KEY_PREFIX) => {
                match sluice_core::keys::key_id(&id) {
                    Some(short) => Ok(IdPath(short.to_string())),
                    None => Err(ApiError::openai(Error::invalid(
                        "that is not the shape of a Sluice key (sk-sluice-<16 hex characters>-<secret>); pass the key's id (`GET /api/keys` lists them)",
                    ))
                    .into_response()),
                }
            }
            Ok(axum::extract::Path(id)) => Ok(IdPath(id)),
            Err(e) => {
                let e = Error::invalid(format!("the path is not valid: {}", e.body_text()));
                // An Anthropic SDK (`GET /v1/models/{id}`) reads errors in its own shape.
                Err(if parts.headers.contains_key(names::ANTHROPIC_VERSION) {
                    ApiError::anthropic(e)
                } else {
                    ApiError::openai(e)
                }
                .into_response())
            }
        }
    }
}

/// An admin request as the audit log and the server log name it (`DELETE /api/keys/ID`): a whole
/// key pasted where its id belongs shows as its id (the secret never lands in a log), and a path
/// longer than 256 characters is cut.
fn audit_target(method: &axum::http::Method, path: &str) -> String {
    let path: Vec<String> = path
        .split('/')
        .map(
            |seg| match seg.strip_prefix(sluice_core::keys::KEY_PREFIX) {
                Some(_) => match sluice_core::keys::key_id(seg) {
                    Some(id) => format!("{}{id}-…", sluice_core::keys::KEY_PREFIX),
                    None => format!("{}…", sluice_core::keys::KEY_PREFIX),
                },
                None => seg.to_string(),
            },
        )
        .collect();
    let mut what = format!("{method} {}", path.join("/"));
    if let Some((cut, _)) = what.char_indices().nth(256) {
        what.truncate(cut);
        what.push('…');
    }
    what
}

/// The request id of this request, set by the id middleware.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub uuid::Uuid);

/// Builds the router.
pub fn router(state: SharedState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::list_models))
        .route("/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        .route("/models/{*id}", get(openai::get_model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/messages/count_tokens", post(anthropic::count_tokens))
        // Azure OpenAI's paths, for the `AzureOpenAI` clients of the OpenAI SDKs: by deployment,
        // and the newer `/openai/v1` API.
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(openai::azure_chat_completions),
        )
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(openai::azure_embeddings),
        )
        .route(
            "/openai/v1/chat/completions",
            post(openai::chat_completions),
        )
        .route("/openai/v1/embeddings", post(openai::embeddings))
        .route("/openai/v1/models", get(openai::list_models))
        .route("/openai/v1/models/{*id}", get(openai::get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), v1_auth));
    let api = Router::new()
        .route("/api/requests", get(admin::list_requests))
        .route("/api/requests/{id}", get(admin::get_request))
        .route("/api/deployments", get(admin::deployments))
        .route("/api/keys", get(keys::list).post(keys::create))
        .route("/api/keys/{id}", get(keys::get).delete(keys::revoke))
        .route("/api/keys/{id}/rotate", post(keys::rotate))
        .route("/api/audit", get(keys::audit_log))
        .route("/api/usage", get(usage::usage))
        .route("/api/cache", axum::routing::delete(usage::clear_cache))
        .route("/api/config/reload", post(admin::reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    let app = Router::new()
        .merge(v1)
        .merge(api)
        .route("/metrics", get(metrics))
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), request_id));
    // Outermost: a preflight is answered before any key check (it carries no key).
    let cors = state.cors.clone();
    let app = app.with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// Gives every request an id (UUIDv7) and every response its headers: `x-sluice-request-id`,
/// `x-request-id` (which the OpenAI SDKs read) and, on `/v1/messages`, `request-id` (which the
/// Anthropic SDKs read). On a gateway without an admin key it first refuses requests not meant
/// for this machine (one layer for both: each layer costs every request a boxed future).
async fn request_id(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let id = sluice_types::ids::new_request_id();
    req.extensions_mut().insert(RequestId(id));
    let anthropic = is_anthropic_route(req.uri().path());
    let flavor = error_flavor(&req);
    let mut resp = match this_machine_only(&state, &req, flavor) {
        Some(refused) => {
            // A refusal at the admin API's door is in the audit log, as any other is.
            if req.uri().path().starts_with("/api") {
                let who = match presented_key(req.headers()) {
                    Some(p) => sluice_core::keys::key_id(p)
                        .map_or_else(|| "unknown-key".to_string(), |id| format!("key:{id}")),
                    None => "anonymous".to_string(),
                };
                let what = audit_target(req.method(), req.uri().path());
                keys::audit_refusal(&state, &who, &what, ErrorCode::Forbidden.as_str());
            }
            let (parts, body) = req.into_parts();
            body::discard(&parts.headers, body).await;
            refused
        }
        // Model calls still running when the shutdown grace period ends are ended then (their
        // records are written as cancelled); admin calls run to their end.
        None if is_model_route(req.uri().path()) => {
            let abort = state.abort.subscribe();
            if *abort.borrow() {
                ApiError {
                    error: shutting_down(),
                    flavor,
                }
                .into_response()
            } else {
                tokio::select! {
                    biased;
                    resp = next.run(req) => resp,
                    () = aborted(abort) => ApiError { error: shutting_down(), flavor }.into_response(),
                }
            }
        }
        None => next.run(req).await,
    };
    if let Ok(v) = HeaderValue::from_str(&id.hyphenated().to_string()) {
        let headers = resp.headers_mut();
        if anthropic {
            headers.insert(names::REQUEST_ID, v.clone());
        }
        headers.insert(names::X_REQUEST_ID, v.clone());
        headers.insert(names::X_SLUICE_REQUEST_ID, v);
    }
    resp
}

/// A gateway without an admin key listens on loopback and takes its local user for an admin, so
/// it answers only requests meant for this machine: none addressed to another host name (a DNS
/// rebinding page reaching it under its own name) and none sent by a browser from a page of
/// another site (cross-site requests that would spend the providers' keys or mint keys).
fn this_machine_only(state: &AppState, req: &Request, flavor: error::Flavor) -> Option<Response> {
    if state.admin_key.is_some() {
        return None;
    }
    let why = foreign(req.headers()).or_else(|| {
        // nginx's `proxy_pass` speaks HTTP/1.0 upstream by default and, unless told to, adds no
        // forwarding header: HTTP/1.0 is taken for such a proxy (the SDKs speak 1.1). Health
        // checks and metrics scrapes are let through.
        let path = req.uri().path();
        (req.version() <= axum::http::Version::HTTP_10
            && path != "/health"
            && path != "/metrics")
            .then(|| {
                "this gateway has no admin key, so it answers only requests from this machine, and an HTTP/1.0 request is taken for one a proxy forwarded; set SLUICE_ADMIN_KEY to serve requests through a proxy, or send HTTP/1.1".to_string()
            })
    })?;
    Some(
        ApiError {
            error: Error::new(ErrorCode::Forbidden, why),
            flavor,
        }
        .into_response(),
    )
}

/// Why a request is not from this machine, if it is not.
fn foreign(headers: &HeaderMap) -> Option<String> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(host) = text(&header::HOST)
        && !loopback_name(host)
    {
        return Some(format!(
            "this gateway has no admin key, so it answers only requests addressed to this machine (localhost, 127.0.0.1), not `{host}`; set SLUICE_ADMIN_KEY to serve it under other names"
        ));
    }
    // Forwarded by a reverse proxy (which makes the request look local: `proxy_pass
    // http://127.0.0.1:4141` sends that Host): the request comes from elsewhere.
    if let Some(name) = names::FORWARDING
        .iter()
        .find(|name| headers.contains_key(*name))
    {
        return Some(format!(
            "this gateway has no admin key, so it answers only requests from this machine, and this one was forwarded by a proxy (`{name}`); set SLUICE_ADMIN_KEY to serve requests through a proxy"
        ));
    }
    let cross_site = match text(&header::ORIGIN) {
        Some(origin) => !origin
            .split_once("://")
            .is_some_and(|(_, rest)| loopback_name(rest.split('/').next().unwrap_or(rest))),
        None => text(&names::SEC_FETCH_SITE) == Some("cross-site"),
    };
    cross_site.then(|| {
        "this gateway has no admin key, so it refuses requests a browser sends from a page of another site; set SLUICE_ADMIN_KEY (and send it) to allow them".to_string()
    })
}

/// Whether `host` (`name[:port]` or `[v6][:port]`) names this machine.
fn loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    const SUFFIX: &str = ".localhost";
    name.eq_ignore_ascii_case("localhost")
        || (name.len() >= SUFFIX.len()
            && name.is_char_boundary(name.len() - SUFFIX.len())
            && name[name.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub use sluice_core::keys::constant_time_eq;

/// The key a client presented: `Authorization: Bearer …` (OpenAI SDKs), `x-api-key` (Anthropic
/// SDKs) or `api-key` (the OpenAI SDKs' Azure clients).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        // The scheme is case-insensitive (RFC 7235): `Bearer`, `bearer`, `BEARER`.
        let key = match v.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest,
            _ => v,
        };
        return Some(key.trim());
    }
    ["x-api-key", "api-key"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
}

fn check_key(state: &AppState, headers: &HeaderMap) -> Result<(), Error> {
    let Some(expected) = &state.admin_key else {
        return Ok(());
    };
    match presented_key(headers) {
        None => Err(Error::new(
            ErrorCode::Unauthorized,
            "missing API key: send `Authorization: Bearer <key>` (or `x-api-key`, `api-key`)",
        )),
        Some(k) if constant_time_eq(k.as_bytes(), expected.expose().as_bytes()) => Ok(()),
        Some(_) => Err(Error::new(
            ErrorCode::Unauthorized,
            "invalid API key: it does not match the server's SLUICE_ADMIN_KEY",
        )),
    }
}

/// `/v1` authentication. A Sluice virtual key (`sk-sluice-…`) must be valid; the admin key is
/// accepted; any other key, or none, is accepted only while no admin key is set and no virtual
/// key is active (a local, open gateway).
fn check_v1_key(state: &AppState, req: &mut Request) -> Result<(), Error> {
    let presented = presented_key(req.headers()).map(str::to_string);
    if let Some(p) = &presented
        && sluice_core::keys::key_id(p).is_some()
    {
        let Some(cache) = &state.keys else {
            return Err(Error::new(
                ErrorCode::Unauthorized,
                "this server has no virtual keys; use the admin key",
            ));
        };
        return match cache.check(p) {
            Ok(k) => {
                req.extensions_mut().insert(keys::KeyContext(k));
                Ok(())
            }
            Err(r) => Err(Error::new(ErrorCode::Unauthorized, r.message())),
        };
    }
    if state.admin_key.is_some() {
        return check_key(state, req.headers());
    }
    if state.keys.as_ref().is_some_and(|c| c.any_active()) {
        return Err(Error::new(
            ErrorCode::Unauthorized,
            match presented {
                None => {
                    "missing API key: this gateway issues virtual keys; send `Authorization: Bearer sk-sluice-…` (or `x-api-key`, `api-key`)"
                }
                Some(_) => {
                    "invalid API key: this gateway accepts only its virtual keys (sk-sluice-…)"
                }
            },
        ));
    }
    Ok(())
}

async fn v1_auth(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    match check_v1_key(&state, &mut req) {
        Ok(()) => next.run(req).await,
        // Boxed: its future is large (a record to send, a body to discard), and every request's
        // future would otherwise carry its size through each layer that moves it.
        Err(e) => Box::pin(refuse_v1(state, req, e)).await,
    }
}

/// Refuses a model call whose key did not pass: recorded (within bounds), its body read off,
/// the error in the shape its client reads.
async fn refuse_v1(state: SharedState, req: Request, e: Error) -> Response {
    let flavor = error_flavor(&req);
    let id = req.extensions().get::<RequestId>().map(|r| r.0);
    let endpoint = endpoint_of(req.uri().path());
    let mut ctx = RequestContext::new(endpoint, false);
    if let Some(id) = id {
        ctx.record.id = id;
    }
    // A revoked or expired key's holder: its record names the key, so that its use shows
    // under `?key=`.
    if let (Some(cache), Some(p)) = (&state.keys, presented_key(req.headers()))
        && let Some(k) = cache.holder(p)
    {
        ctx.attribute_key(k);
    }
    // A key this gateway never issued (or none) is recorded a hundred times a second at
    // most: a flood of them would otherwise fill the log and its queue.
    static UNKNOWN: keys::PerSecond = keys::PerSecond::new(100);
    let known = ctx.record.key_id.is_some();
    if endpoint != "models" {
        if known || UNKNOWN.pass().is_some() {
            state.gateway.reject(ctx, None, &e).await;
        } else {
            // Still counted in the metrics.
            state.gateway.reject_unlogged(ctx, &e);
        }
    }
    let (parts, body) = req.into_parts();
    body::discard(&parts.headers, body).await;
    ApiError { error: e, flavor }.into_response()
}

/// Whether the path reads the model list (`/v1/models/{id}`, whose id may hold slashes and end
/// like another route: `/v1/models/x/chat/completions` is a model's id).
fn is_models_path(path: &str) -> bool {
    ["/v1/models", "/models", "/openai/v1/models"]
        .iter()
        .any(|p| {
            path.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// Whether the path calls a model (chat, messages, embeddings), as opposed to the admin API.
fn is_model_route(path: &str) -> bool {
    !is_models_path(path)
        && (path.ends_with("/chat/completions")
            || path.ends_with("/messages")
            || path.ends_with("/embeddings"))
}

/// The shape of a request's errors: Anthropic's on its routes, and on the model routes for a
/// client that sends `anthropic-version` (the Anthropic SDK's `models.list()`); else OpenAI's.
fn error_flavor(req: &Request) -> error::Flavor {
    let path = req.uri().path();
    if is_anthropic_route(path)
        || (is_models_path(path) && req.headers().contains_key(names::ANTHROPIC_VERSION))
    {
        error::Flavor::Anthropic
    } else {
        error::Flavor::OpenAi
    }
}

/// Whether an Anthropic SDK calls this path (`/v1/messages`, its `count_tokens`): its answers,
/// errors included, are in Anthropic's shape and carry `request-id`.
fn is_anthropic_route(path: &str) -> bool {
    !is_models_path(path)
        && (path.ends_with("/messages") || path.ends_with("/messages/count_tokens"))
}

fn endpoint_of(path: &str) -> &'static str {
    if is_models_path(path) {
        "models"
    } else if path.ends_with("/messages") {
        "messages"
    } else if path.ends_with("/embeddings") {
        "embeddings"
    } else if path.ends_with("/chat/completions") {
        "chat.completions"
    } else {
        "models"
    }
}

/// Who is calling the admin API: the admin key, a virtual key with a role, or — on an open
/// loopback gateway without an admin key — the local user.
fn admin_actor(state: &AppState, headers: &HeaderMap) -> Result<Actor, Error> {
    if let Some(p) = presented_key(headers)
        && sluice_core::keys::key_id(p).is_some()
    {
        let Some(cache) = &state.keys else {
            return Err(Error::new(
                ErrorCode::Unauthorized,
                "this server has no virtual keys; use the admin key",
            ));
        };
        let k = cache
            .check(p)
            .map_err(|r| Error::new(ErrorCode::Unauthorized, r.message()))?;
        let role = k.role.ok_or_else(|| {
            Error::new(
                ErrorCode::Forbidden,
                "this key is a client key; the admin API needs a key with the admin, developer or viewer role",
            )
        })?;
        return Ok(Actor {
            name: format!("key:{}", k.id),
            role,
        });
    }
    match &state.admin_key {
        Some(_) => {
            check_key(state, headers)?;
            Ok(Actor {
                name: "admin-key".into(),
                role: Role::Admin,
            })
        }
        None => Ok(Actor {
            name: "local".into(),
            role: Role::Admin,
        }),
    }
}

/// What each role may do: admins everything; developers read everything and manage keys (their
/// own, checked by the key routes); viewers only read. The audit log is for admins.
fn permitted(role: Role, method: &axum::http::Method, path: &str) -> bool {
    let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    match role {
        Role::Admin => true,
        _ if path.starts_with("/api/audit") => false,
        Role::Developer => read || path.starts_with("/api/keys"),
        Role::Viewer => read,
    }
}

async fn admin_auth(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let actor = match admin_actor(&state, req.headers()) {
        Ok(a) => a,
        Err(e) => {
            // A refused attempt at the door is recorded too, under the key it presented.
            let who = match presented_key(req.headers()) {
                Some(p) => sluice_core::keys::key_id(p)
                    .map_or_else(|| "unknown-key".to_string(), |id| format!("key:{id}")),
                None => "anonymous".to_string(),
            };
            let what = audit_target(req.method(), req.uri().path());
            keys::audit_refusal(&state, &who, &what, e.code.as_str());
            return ApiError::openai(e).into_response();
        }
    };
    if !permitted(actor.role, req.method(), req.uri().path()) {
        let what = audit_target(req.method(), req.uri().path());
        keys::audit_refusal_as(&state, &actor.name, actor.role.as_str(), &what, "forbidden");
        return ApiError::openai(Error::new(
            ErrorCode::Forbidden,
            format!("the {} role may not {what}", actor.role.as_str()),
        ))
        .into_response();
    }
    req.extensions_mut().insert(actor.clone());
    let write = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let what = audit_target(req.method(), req.uri().path());
    // The action and its audit entry run to their end even if the client leaves (a reload that
    // swapped the router is in the audit log whoever waited for it). A write that failed, and
    // that its handler did not record itself, is recorded with the error's code.
    let work = keys::AUDITED.scope(std::cell::Cell::new(false), async move {
        let resp = next.run(req).await;
        let audited = keys::AUDITED.with(std::cell::Cell::get);
        let failed = resp.status().is_client_error() || resp.status().is_server_error();
        if !(write && failed && !audited) {
            return resp;
        }
        let (parts, body) = resp.into_parts();
        // Sluice's own error body, already in memory: read whole (one quoting a long value the
        // client sent can be large, and cutting it left the client an empty body).
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| parts.status.as_u16().to_string());
        keys::audit(
            &state,
            &actor,
            "failed",
            Some(&what),
            &code,
            serde_json::Value::Null,
        )
        .await;
        Response::from_parts(parts, axum::body::Body::from(bytes))
    });
    match tokio::spawn(work).await {
        Ok(resp) => resp,
        Err(_) => ApiError::openai(Error::internal("the admin action failed")).into_response(),
    }
}

async fn metrics(State(state): State<SharedState>) -> Response {
    state.gateway.refresh_gauges();
    // The body is OpenMetrics text (`# EOF`, counters typed by their family name with samples
    // named `…_total`), so it is labelled as such: a scraper reading it as the classic text format
    // would take every counter for untyped.
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.gateway.metrics().encode(),
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    body::discard(&parts.headers, body).await;
    let path = parts.uri.path();
    let e = Error::new(
        ErrorCode::NotFound,
        format!(
            "no route for {} {path}; see /v1/chat/completions, /v1/messages, /v1/messages/count_tokens, /v1/embeddings, /v1/models, /api/requests, /api/deployments, /metrics",
            parts.method,
        ),
    );
    // Under the Anthropic routes, an Anthropic SDK reads the answer.
    if path.starts_with("/v1/messages/") || path.starts_with("/messages/") {
        return ApiError::anthropic(e).into_response();
    }
    ApiError::openai(e).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    let (parts, body) = req.into_parts();
    body::discard(&parts.headers, body).await;
    let path = parts.uri.path();
    let e = Error::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {path}", parts.method),
    );
    // The Anthropic routes answer in Anthropic's shape, as their 404s do.
    let mut resp = if is_anthropic_route(path) {
        ApiError::anthropic(e)
    } else {
        ApiError::openai(e)
    }
    .into_response();
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    resp
}

/// The 400 for a query string that does not parse: the parameter it names, in the API's words
/// (`limit=abc` is "invalid value for `limit`: …", with `param`).
pub(crate) fn query_error(e: &axum::extract::rejection::QueryRejection) -> Error {
    let text = e.body_text();
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(&text);
    match detail.split_once(": ") {
        Some((name, why))
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Error::invalid(format!("invalid value for query parameter `{name}`: {why}"))
                .with_param(name)
        }
        _ => {
            let mut err = Error::invalid(format!("invalid query string: {detail}"));
            // `duplicate field `limit``, `unknown field `x`, expected …`: the parameter named.
            err.param = ["duplicate field `", "unknown field `"]
                .iter()
                .find_map(|p| detail.strip_prefix(p)?.split('`').next())
                .filter(|n| !n.is_empty())
                .map(str::to_string);
            err
        }
    }
}

/// Fills the record's attribution from `x-sluice-*` headers.
pub(crate) fn attribute_from_headers(
    ctx: &mut RequestContext,
    headers: &HeaderMap,
) -> Result<(), Error> {
    // UTF-8 as sent (raw bytes are allowed in header values); anything else is refused rather
    // than taken for an absent header, which would put the spend on the wrong user.
    let get = |name: HeaderName| -> Result<Option<&str>, Error> {
        let Some(v) = headers.get(&name) else {
            return Ok(None);
        };
        let text = std::str::from_utf8(v.as_bytes()).map_err(|_| {
            Error::invalid(format!(
                "header {name} is not UTF-8 text; send UTF-8 (or percent-encode the value)"
            ))
        })?;
        Ok(Some(text.trim()).filter(|s| !s.is_empty()))
    };
    if let Some(c) = get(header::CACHE_CONTROL)? {
        ctx.cache_control = Some(c.to_string());
    }
    if let Some(u) = get(names::X_SLUICE_USER)? {
        ctx.record.user = Some(u.to_string());
    }
    if let Some(s) = get(names::X_SLUICE_SESSION)? {
        ctx.record.session = Some(s.to_string());
    }
    if let Some(t) = get(names::X_SLUICE_TAGS)? {
        ctx.record.tags = sluice_gateway::split_tags(t);
    }
    if let Some(m) = get(names::X_SLUICE_METADATA)? {
        match serde_json::from_str(m) {
            Ok(v @ serde_json::Value::Object(_)) => ctx.record.metadata = v,
            _ => {
                return Err(Error::invalid(
                    "header x-sluice-metadata must be a JSON object, e.g. {\"team\":\"search\"}",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model id may hold slashes and end like another route: it is still a models path.
    #[test]
    fn model_ids_are_not_taken_for_model_calls() {
        for path in [
            "/v1/models/x/chat/completions",
            "/models/x/messages",
            "/openai/v1/models/a/embeddings",
        ] {
            assert_eq!(endpoint_of(path), "models", "{path}");
            assert!(!is_model_route(path) && !is_anthropic_route(path), "{path}");
        }
        assert_eq!(endpoint_of("/v1/chat/completions"), "chat.completions");
        assert_eq!(endpoint_of("/v1/messages"), "messages");
        assert_eq!(
            endpoint_of("/openai/deployments/gpt-4o/chat/completions"),
            "chat.completions"
        );
        assert!(!is_models_path("/v1/modelsx/chat/completions"));
    }

    #[test]
    fn only_names_of_this_machine_are_loopback() {
        for ok in [
            "127.0.0.1:4141",
            "localhost",
            "LOCALHOST:80",
            "[::1]:4141",
            "127.0.0.5",
            "app.localhost:3000",
            "App.LocalHost",
        ] {
            assert!(loopback_name(ok), "{ok}");
        }
        for no in [
            "evil.example:4141",
            "10.0.0.1:4141",
            "localhost.evil.example",
            "evillocalhost",
            "[2001:db8::1]:80",
            "",
        ] {
            assert!(!loopback_name(no), "{no}");
        }
    }
}
