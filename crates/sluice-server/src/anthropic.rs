//! The Anthropic-compatible route, `POST /v1/messages`: Anthropic SDKs point at Sluice and reach
//! any configured model. The request is translated to the OpenAI shape, served by the same
//! gateway, and the answer translated back (whole, or as the Messages API event sequence).

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use sluice_core::error::Error;
use sluice_gateway::{ChatOutcome, ChatStream, StreamItem};
use sluice_types::anthropic::{self as wire, MessagesRequest, StreamEncoder, StreamEvent};

use crate::SharedState;
use crate::error::{ApiError, anthropic_body};
use crate::openai::{read_json, set_cost, set_headers, set_route, sse_response};

/// `POST /v1/messages/count_tokens`: the prompt tokens of a Messages request (its body without
/// `max_tokens`), counted by the model's first deployment: an Anthropic upstream's own
/// `count_tokens`, else Sluice's tokenizer for its model (also when the upstream cannot answer).
/// Nothing is logged.
pub async fn count_tokens(State(state): State<SharedState>, req: Request) -> Response {
    match count(&state, req).await {
        Ok(n) => Json(serde_json::json!({ "input_tokens": n })).into_response(),
        Err(e) => ApiError::anthropic(e).into_response(),
    }
}

async fn count(state: &SharedState, req: Request) -> Result<u64, Error> {
    let (parts, body) = req.into_parts();
    let key = crate::keys::KeyContext::of(&parts.extensions);
    let bytes = crate::body::read(&parts.headers, body, state.max_body_bytes).await?;
    let mut value: serde_json::Value = crate::body::parse(&bytes)?;
    // The count takes no `max_tokens`; the request type wants one.
    if let Some(obj) = value.as_object_mut() {
        obj.entry("max_tokens").or_insert(1.into());
    }
    let msg: MessagesRequest = serde_json::from_value(value)
        .map_err(|e| Error::invalid(format!("the request is not a Messages request: {e}")))?;
    let mut chat = wire::request_to_openai(&msg).map_err(|e| Error::invalid(e.0))?;
    wire::set_betas(&mut chat, betas(&parts.headers).iter().map(String::as_str));
    state
        .gateway
        .count_prompt_tokens(key.as_deref(), &chat)
        .await
}

/// The client's beta flags (`anthropic-beta`): they go to an Anthropic upstream with the request.
fn betas(headers: &axum::http::HeaderMap) -> Vec<String> {
    headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

pub async fn messages(State(state): State<SharedState>, req: Request) -> Response {
    let betas = betas(req.headers());
    let (ctx, msg) = match read_json::<MessagesRequest>(&state, req, "messages").await {
        Ok(v) => v,
        Err(e) => return ApiError::anthropic(e).into_response(),
    };
    let translated = if msg.max_tokens > 0 {
        wire::request_to_openai(&msg)
    } else {
        Err(sluice_types::TranslateError::invalid(
            "max_tokens: must be at least 1",
        ))
    };
    let chat = match translated {
        Ok(c) => c,
        Err(e) => {
            let e = Error::invalid(e.0);
            state.gateway.reject(ctx, Some(&msg.model), &e).await;
            return ApiError::anthropic(e).into_response();
        }
    };
    let mut chat = chat;
    wire::set_betas(&mut chat, betas.iter().map(String::as_str));
    let id = format!("msg_{}", ctx.id().simple());
    // Anthropic reports input tokens in `message_start`; the upstream's count only arrives at the
    // end of the stream, so the start carries the tokenizer's count: that of the model's first
    // deployment (`count_tokens` asks an Anthropic upstream; a stream does not wait for that).
    let input_estimate = chat
        .is_stream()
        .then(|| state.gateway.estimate_prompt_tokens(&chat));
    match state.gateway.chat(ctx, chat).await {
        Ok(ChatOutcome::Complete {
            completion,
            cost_usd,
            route,
            headers,
            ..
        }) => {
            let mut out = wire::response_from_openai(&completion, &msg.model);
            out.id = id;
            if !msg.wants_thinking() {
                wire::without_thinking(&mut out);
            }
            let mut resp = Json(out).into_response();
            set_cost(&mut resp, cost_usd);
            set_route(&mut resp, &route);
            set_headers(&mut resp, &headers);
            resp
        }
        Ok(ChatOutcome::Stream(stream)) => {
            let mut enc = StreamEncoder::new(&id, &msg.model);
            if !msg.wants_thinking() {
                enc = enc.without_thinking();
            }
            if let Some(n) = input_estimate {
                enc = enc.with_input_tokens(n);
            }
            let route = stream.route().to_string();
            let headers = stream.headers().to_vec();
            let mut resp = sse_response(&state, anthropic_sse(stream, enc), abort_frame);
            set_route(&mut resp, &route);
            set_headers(&mut resp, &headers);
            resp
        }
        Err(e) => ApiError::anthropic(e).into_response(),
    }
}

/// The last event of a Messages stream the shutdown ended.
fn abort_frame() -> Bytes {
    let mut frame = b"event: error\ndata: ".to_vec();
    let _ = serde_json::to_writer(&mut frame, &anthropic_body(&crate::shutting_down()));
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

fn event_frame(ev: &StreamEvent) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(ev.name().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    if serde_json::to_writer(&mut out, ev).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn frames(events: Vec<StreamEvent>) -> Bytes {
    let mut out = Vec::new();
    for ev in &events {
        out.extend_from_slice(&event_frame(ev));
    }
    Bytes::from(out)
}

/// The Messages API event sequence for a gateway stream; a failure after the start becomes an
/// `error` event.
fn anthropic_sse(
    stream: ChatStream,
    encoder: StreamEncoder,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures::stream::unfold(
        (stream, encoder, false),
        |(mut s, mut enc, done)| async move {
            if done {
                return None;
            }
            loop {
                match s.next().await {
                    Some(StreamItem::Chunk(c)) => {
                        let evs = enc.on_chunk(&c);
                        if evs.is_empty() {
                            continue;
                        }
                        return Some((Ok(frames(evs)), (s, enc, false)));
                    }
                    Some(StreamItem::Error(e)) => {
                        let mut out = Vec::new();
                        out.extend_from_slice(b"event: error\ndata: ");
                        let _ = serde_json::to_writer(&mut out, &anthropic_body(&e));
                        out.extend_from_slice(b"\n\n");
                        return Some((Ok(Bytes::from(out)), (s, enc, true)));
                    }
                    None => {
                        let evs = enc.finish();
                        return Some((Ok(frames(evs)), (s, enc, true)));
                    }
                }
            }
        },
    )
}
