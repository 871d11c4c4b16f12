//! The OpenAI-compatible routes.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::record::RawJson;
use sluice_gateway::{ChatOutcome, ChatStream, RequestContext, StreamItem};
use sluice_types::openai::{ChatRequest, EmbeddingRequest, ModelList, ModelObject};

use crate::error::{ApiError, openai_body};
use crate::{RequestId, SharedState, attribute_from_headers, body};

/// The model a route's path names (Azure OpenAI's `/openai/deployments/{deployment}/…`): it
/// replaces the body's `model`, as on Azure.
#[derive(Debug, Clone)]
pub(crate) struct ModelFromPath(pub String);

/// The body with `model` set to the path's (as served, parsed and recorded); a body that is not
/// a JSON object is left as it is, for the parser to report.
fn with_model(bytes: bytes::Bytes, model: &str) -> bytes::Bytes {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice(&bytes) else {
        return bytes;
    };
    o.insert("model".into(), serde_json::Value::String(model.to_string()));
    match serde_json::to_vec(&o) {
        Ok(v) => v.into(),
        Err(_) => bytes,
    }
}

/// `POST /openai/deployments/{deployment}/chat/completions`, the path the `AzureOpenAI` clients
/// of the OpenAI SDKs call: the deployment is the model.
pub async fn azure_chat_completions(
    State(state): State<SharedState>,
    crate::IdPath(deployment): crate::IdPath,
    mut req: Request,
) -> Response {
    req.extensions_mut().insert(ModelFromPath(deployment));
    chat_completions(State(state), req).await
}

/// `POST /openai/deployments/{deployment}/embeddings` (Azure OpenAI's path).
pub async fn azure_embeddings(
    State(state): State<SharedState>,
    crate::IdPath(deployment): crate::IdPath,
    mut req: Request,
) -> Response {
    req.extensions_mut().insert(ModelFromPath(deployment));
    embeddings(State(state), req).await
}

/// Reads a request: its id, `x-sluice-*` headers and JSON body, into its context and `T`. A
/// request that cannot be read is recorded here and its error returned.
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    state: &SharedState,
    req: Request,
    endpoint: &str,
) -> Result<(RequestContext, T), Error> {
    let (parts, body_stream) = req.into_parts();
    let mut ctx = RequestContext::new(endpoint, false);
    if let Some(RequestId(id)) = parts.extensions.get::<RequestId>() {
        ctx.record.id = *id;
    }
    if let Some(crate::keys::KeyContext(k)) = parts.extensions.get::<crate::keys::KeyContext>() {
        ctx.attribute_key(k.clone());
    }
    let read = match attribute_from_headers(&mut ctx, &parts.headers) {
        Ok(()) => body::read(&parts.headers, body_stream, state.max_body_bytes).await,
        Err(e) => {
            body::discard(&parts.headers, body_stream).await;
            Err(e)
        }
    };
    let bytes = match read {
        Ok(b) => b,
        Err(e) => {
            state.gateway.reject(ctx, None, &e).await;
            return Err(e);
        }
    };
    let path_model = parts
        .extensions
        .get::<ModelFromPath>()
        .map(|m| m.0.as_str());
    let bytes = match path_model {
        Some(model) => with_model(bytes, model),
        None => bytes,
    };
    match body::parse(&bytes) {
        Ok(v) => {
            if state.gateway.stores_bodies() {
                // The body as the client sent it: no re-serialization on the hot path.
                ctx.record.request_body = RawJson::from_bytes(&bytes);
            }
            Ok((ctx, v))
        }
        Err(e) => {
            state
                .gateway
                .reject(
                    ctx,
                    path_model
                        .map(str::to_string)
                        // Not from a body refused for its size: it is not read again.
                        .or_else(|| {
                            (e.code != ErrorCode::PayloadTooLarge)
                                .then(|| body::sniff_model(&bytes))
                                .flatten()
                        })
                        .as_deref(),
                    &e,
                )
                .await;
            Err(e)
        }
    }
}

pub async fn chat_completions(State(state): State<SharedState>, req: Request) -> Response {
    let (ctx, chat) = match read_json::<ChatRequest>(&state, req, "chat.completions").await {
        Ok(v) => v,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    match state.gateway.chat(ctx, chat).await {
        Ok(ChatOutcome::Complete {
            completion,
            raw,
            cost_usd,
            route,
            headers,
        }) => {
            let mut resp = match raw {
                Some(raw) => (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    raw.get().to_string(),
                )
                    .into_response(),
                None => Json(completion).into_response(),
            };
            set_cost(&mut resp, cost_usd);
            set_route(&mut resp, &route);
            set_headers(&mut resp, &headers);
            resp
        }
        Ok(ChatOutcome::Stream(stream)) => {
            let route = stream.route().to_string();
            let headers = stream.headers().to_vec();
            let mut resp = sse_response(&state, openai_sse(stream), openai_abort_frame);
            set_route(&mut resp, &route);
            set_headers(&mut resp, &headers);
            resp
        }
        Err(e) => ApiError::openai(e).into_response(),
    }
}

pub(crate) fn set_cost(resp: &mut Response, cost: f64) {
    if let Ok(v) = HeaderValue::from_str(&format!("{cost:.8}")) {
        resp.headers_mut()
            .insert(crate::names::X_SLUICE_COST_USD, v);
    }
}

/// Extra headers from the gateway (`x-ratelimit-*`).
pub(crate) fn set_headers(resp: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, v);
        }
    }
}

/// `x-sluice-route`: where the router sent the request, and why.
pub(crate) fn set_route(resp: &mut Response, route: &str) {
    if let Ok(v) = HeaderValue::from_str(route) {
        resp.headers_mut().insert(crate::names::X_SLUICE_ROUTE, v);
    }
}

/// A streaming response with the headers SSE clients and proxies need. When the shutdown grace
/// period ends first ([`crate::aborted`]),
/// the stream ends with the frame `abort_frame` makes (an error event in the client's API; made
/// only then) and is dropped, so
/// its record is written as cancelled while the request log still takes records.
pub(crate) fn sse_response(
    state: &crate::AppState,
    body: impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    abort_frame: fn() -> Bytes,
) -> Response {
    let body = UntilAbort {
        body: Some(Box::pin(body)),
        abort: Box::pin(crate::aborted(state.abort.subscribe())),
        frame: Some(abort_frame),
    };
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// An event stream that ends with a last frame when the gateway aborts the requests still
/// running at shutdown. The abort is looked at only while the stream waits, so a stream that
/// has its next frame ready pays nothing for it.
struct UntilAbort<S> {
    body: Option<std::pin::Pin<Box<S>>>,
    abort: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    frame: Option<fn() -> Bytes>,
}

impl<S: futures::Stream<Item = Result<Bytes, Infallible>>> futures::Stream for UntilAbort<S> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(item) = body.as_mut().poll_next(cx) {
            if item.is_none() {
                this.body = None;
            }
            return Poll::Ready(item);
        }
        if this.abort.as_mut().poll(cx).is_ready() {
            // Dropping the gateway's stream writes its record, as cancelled.
            this.body = None;
            return Poll::Ready(this.frame.take().map(|make| Ok(make())));
        }
        Poll::Pending
    }
}

/// The last frame of an OpenAI stream the shutdown ended.
fn openai_abort_frame() -> Bytes {
    data_frame(&openai_body(&crate::shutting_down()))
}

/// One SSE `data:` frame holding a JSON value.
pub(crate) fn data_frame(value: &impl serde::Serialize) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut out, value).is_err() {
        out.truncate(6);
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// OpenAI's SSE framing: `data: {chunk}` per chunk, then `data: [DONE]`; a stream that fails
/// after it started ends with `data: {"error": …}` instead.
fn openai_sse(
    stream: ChatStream,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures::stream::unfold((stream, false), |(mut s, done)| async move {
        if done {
            return None;
        }
        match s.next().await {
            Some(StreamItem::Chunk(mut c)) => {
                // Sluice's own note for `/v1/messages` clients.
                if !c.extra.is_empty() {
                    c.extra.shift_remove(sluice_types::anthropic::START_USAGE);
                }
                Some((Ok(data_frame(&c)), (s, false)))
            }
            Some(StreamItem::Error(e)) => Some((Ok(data_frame(&openai_body(&e))), (s, true))),
            None => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), (s, true))),
        }
    })
}

pub async fn embeddings(State(state): State<SharedState>, req: Request) -> Response {
    let (ctx, emb) = match read_json::<EmbeddingRequest>(&state, req, "embeddings").await {
        Ok(v) => v,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    match state.gateway.embed(ctx, emb).await {
        Ok((resp, cost, headers)) => {
            let mut r = Json(resp).into_response();
            set_cost(&mut r, cost);
            set_headers(&mut r, &headers);
            r
        }
        Err(e) => ApiError::openai(e).into_response(),
    }
}

/// `created` of the models: when this process first listed them (a Unix time, as clients expect;
/// 0 read as 1970).
fn models_created() -> u64 {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

fn model_object(name: &str) -> ModelObject {
    ModelObject {
        id: name.to_string(),
        object: "model".into(),
        created: models_created(),
        owned_by: "sluice".into(),
    }
}

/// Whether the caller is an Anthropic client (its SDKs send `anthropic-version`): the model
/// endpoints then answer in Anthropic's shape.
fn anthropic_client(req: &Request) -> bool {
    req.headers().contains_key(crate::names::ANTHROPIC_VERSION)
}

/// A model in Anthropic's shape.
fn anthropic_model(name: &str) -> serde_json::Value {
    let created = chrono::DateTime::from_timestamp(models_created() as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    serde_json::json!({"type": "model", "id": name, "display_name": name, "created_at": created})
}

/// Anthropic's paging of the model list: `limit` (1–1000, default 20), `after_id`, `before_id`.
/// Other parameters (the SDK's `beta=true` for `client.beta.models.list()`) are ignored.
#[derive(Debug, Default, serde::Deserialize)]
pub struct AnthropicModelPage {
    limit: Option<u32>,
    after_id: Option<String>,
    before_id: Option<String>,
}

/// `GET /v1/models` for an Anthropic client: `{"data", "has_more", "first_id", "last_id"}`.
fn anthropic_model_list(names: Vec<String>, page: &AnthropicModelPage) -> Response {
    let limit = page.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return ApiError::anthropic(
            Error::invalid("limit: must be between 1 and 1000").with_param("limit"),
        )
        .into_response();
    }
    let position = |id: &str| names.iter().position(|n| n == id);
    let (from, to) = match (&page.after_id, &page.before_id) {
        (Some(a), _) => (position(a).map_or(names.len(), |i| i + 1), names.len()),
        (None, Some(b)) => (0, position(b).unwrap_or(0)),
        (None, None) => (0, names.len()),
    };
    let from = from.min(to);
    let limit = limit as usize;
    // Before an id, the page is the one just before it.
    let (start, end) = if page.after_id.is_none() && page.before_id.is_some() {
        (to.saturating_sub(limit).max(from), to)
    } else {
        (from, (from + limit).min(to))
    };
    let data: Vec<serde_json::Value> = names[start..end]
        .iter()
        .map(|m| anthropic_model(m))
        .collect();
    let has_more = if page.after_id.is_none() && page.before_id.is_some() {
        start > from
    } else {
        end < to
    };
    Json(serde_json::json!({
        "data": data,
        "has_more": has_more,
        "first_id": names[start..end].first(),
        "last_id": names[start..end].last(),
    }))
    .into_response()
}

/// `GET /v1/models`: the configured models the caller's virtual key may use (all of them for a
/// key without a model list, or with no key). An Anthropic client gets Anthropic's shape.
pub async fn list_models(State(state): State<SharedState>, req: Request) -> Response {
    let key = crate::keys::KeyContext::of(req.extensions());
    if anthropic_client(&req) {
        let page = match axum::extract::Query::<AnthropicModelPage>::try_from_uri(req.uri()) {
            Ok(axum::extract::Query(p)) => p,
            Err(e) => return ApiError::anthropic(crate::query_error(&e)).into_response(),
        };
        let names: Vec<String> = state
            .gateway
            .model_names()
            .into_iter()
            .filter(|m| key.as_ref().is_none_or(|k| k.allows_model(m)))
            .collect();
        return anthropic_model_list(names, &page);
    }
    Json(ModelList {
        object: "list".into(),
        data: state
            .gateway
            .model_names()
            .iter()
            .filter(|m| key.as_ref().is_none_or(|k| k.allows_model(m)))
            .map(|m| model_object(m))
            .collect(),
    })
    .into_response()
}

/// `GET /v1/models/{id}`: a model the caller's key may use; any other is not found (and the
/// message lists only the models the key may use).
pub async fn get_model(
    State(state): State<SharedState>,
    crate::IdPath(id): crate::IdPath,
    req: Request,
) -> Response {
    let key = crate::keys::KeyContext::of(req.extensions());
    let allowed = |m: &str| key.as_ref().is_none_or(|k| k.allows_model(m));
    if state.gateway.has_model(&id) && allowed(&id) {
        if anthropic_client(&req) {
            Json(anthropic_model(&id)).into_response()
        } else {
            Json(model_object(&id)).into_response()
        }
    } else {
        let names: Vec<String> = state
            .gateway
            .model_names()
            .into_iter()
            .filter(|m| allowed(m))
            .collect();
        let e = Error::new(
            ErrorCode::ModelNotFound,
            format!(
                "model `{id}` is not configured; configured models: {}",
                names.join(", ")
            ),
        )
        .with_param("model");
        let mut resp = if anthropic_client(&req) {
            ApiError::anthropic(e)
        } else {
            ApiError::openai(e)
        }
        .into_response();
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp
    }
}
