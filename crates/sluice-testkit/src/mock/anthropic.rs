//! Anthropic Messages API wire format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::wire::{self, Ev};
use super::{Answer, Fault, Flavor, Gen, Incoming, Script, Shared, Source, generate, json_value};
use crate::fixtures;

fn error(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub(crate) async fn messages(State(shared): State<Arc<Shared>>, req: Incoming) -> Response {
    if !req.has_header("x-api-key") {
        return json_value(
            StatusCode::UNAUTHORIZED,
            &error("authentication_error", "x-api-key header is required"),
        );
    }
    if !req.has_header("anthropic-version") {
        return json_value(
            StatusCode::BAD_REQUEST,
            &error(
                "invalid_request_error",
                "anthropic-version: header is required",
            ),
        );
    }
    if !req.body.get("max_tokens").is_some_and(Value::is_u64) {
        return json_value(
            StatusCode::BAD_REQUEST,
            &error("invalid_request_error", "max_tokens: Field required"),
        );
    }
    let model = req.str_field("model").to_owned();
    generate(
        &shared,
        Flavor::Anthropic,
        &model,
        req.stream_flag(),
        &req.body,
    )
    .await
}

/// `POST /v1/messages/count_tokens`: 1000 plus the number of messages, so that a test can tell
/// the upstream's count from a local one. Fields the real endpoint refuses (`max_tokens`,
/// `stream`, sampling settings) are refused the same way, and so is a request holding
/// `[mock:refuse]`.
pub(crate) async fn count_tokens(req: Incoming) -> Response {
    if !req.has_header("x-api-key") || !req.has_header("anthropic-version") {
        return json_value(
            StatusCode::UNAUTHORIZED,
            &error(
                "authentication_error",
                "x-api-key and anthropic-version are required",
            ),
        );
    }
    for field in [
        "max_tokens",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
    ] {
        if req.body.get(field).is_some() {
            return json_value(
                StatusCode::BAD_REQUEST,
                &error(
                    "invalid_request_error",
                    &format!("{field}: Extra inputs are not permitted"),
                ),
            );
        }
    }
    let messages = req
        .body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    // A request this upstream refuses, on demand.
    if req.body.to_string().contains("[mock:refuse]") {
        return json_value(
            StatusCode::BAD_REQUEST,
            &error(
                "invalid_request_error",
                "prompt is too long: 250000 tokens > 200000 maximum",
            ),
        );
    }
    json_value(StatusCode::OK, &json!({"input_tokens": 1000 + messages}))
}

pub(crate) fn fault_error(fault: Fault) -> (StatusCode, Value) {
    match fault {
        Fault::Status500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            error("api_error", "Internal server error"),
        ),
        Fault::Status503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            error("overloaded_error", "Overloaded"),
        ),
        Fault::Status429 => (
            StatusCode::TOO_MANY_REQUESTS,
            error(
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of 50 requests \
                 per minute. Please try again later.",
            ),
        ),
        Fault::Status401 => (
            StatusCode::UNAUTHORIZED,
            error("authentication_error", "invalid x-api-key"),
        ),
        Fault::ContentPolicy => (
            StatusCode::BAD_REQUEST,
            error(
                "invalid_request_error",
                "Output blocked by content filtering policy",
            ),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            error(
                "invalid_request_error",
                "prompt is too long: 250000 tokens > 200000 maximum",
            ),
        ),
    }
}

fn messages_of(body: &Value) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub(crate) fn echo_text(body: &Value) -> String {
    messages_of(body)
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| wire::content_text(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default()
}

pub(crate) fn prompt_words(body: &Value) -> u64 {
    let system = wire::words(&wire::content_text(
        body.get("system").unwrap_or(&Value::Null),
    ));
    system
        + messages_of(body)
            .iter()
            .map(|m| {
                wire::words(&wire::content_text(
                    m.get("content").unwrap_or(&Value::Null),
                ))
            })
            .sum::<u64>()
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
        "service_tier": "standard"
    })
}

pub(crate) fn messages_answer(g: &Gen<'_>, source: &Source) -> Answer {
    match source {
        Source::Fixture { tools } => {
            if g.stream {
                let raw = if *tools {
                    fixtures::ANTHROPIC_MESSAGES_STREAM_TOOLS
                } else {
                    fixtures::ANTHROPIC_MESSAGES_STREAM
                };
                if !g.no_usage {
                    return Answer::Stream(wire::verbatim(raw));
                }
                Answer::Stream(wire::map_json_events(raw, |event| {
                    match event.get("type").and_then(Value::as_str) {
                        Some("message_start") => {
                            if let Some(message) = event.get_mut("message") {
                                wire::remove_key(message, "usage");
                            }
                        }
                        Some("message_delta") => wire::remove_key(event, "usage"),
                        _ => {}
                    }
                    true
                }))
            } else {
                let raw = if *tools {
                    fixtures::ANTHROPIC_MESSAGES_TOOLS
                } else {
                    fixtures::ANTHROPIC_MESSAGES
                };
                if g.no_usage {
                    Answer::Json(wire::edit_json(raw, |v| wire::remove_key(v, "usage")))
                } else {
                    Answer::Json(raw.to_owned())
                }
            }
        }
        Source::Script(script) => {
            if g.stream {
                Answer::Stream(script_stream(g, script))
            } else {
                Answer::Json(script_json(g, script).to_string())
            }
        }
    }
}

fn script_json(g: &Gen<'_>, script: &Script) -> Value {
    let mut v = json!({
        "id": format!("msg_mock{:020}", g.id),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [{"type": "text", "text": script.text()}],
        "stop_reason": "end_turn",
        "stop_sequence": null
    });
    if !g.no_usage {
        v["usage"] = usage(script.prompt_words, script.completion_words);
    }
    v
}

fn script_stream(g: &Gen<'_>, script: &Script) -> Vec<Ev> {
    let mut message = json!({
        "id": format!("msg_mock{:020}", g.id),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null
    });
    if !g.no_usage {
        message["usage"] = usage(script.prompt_words, 1);
    }
    let mut events = vec![
        Ev::now(wire::named_event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        )),
        Ev::now(wire::named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        )),
        Ev::now("event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    for (i, piece) in script.pieces.iter().enumerate() {
        events.push(Ev::after(
            script.delay_before(i),
            wire::named_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
            ),
        ));
    }
    events.push(Ev::now(wire::named_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    )));
    let mut delta = json!({
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}
    });
    if !g.no_usage {
        delta["usage"] = json!({"output_tokens": script.completion_words});
    }
    events.push(Ev::now(wire::named_event("message_delta", &delta)));
    events.push(Ev::now(wire::named_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    )));
    events
}
