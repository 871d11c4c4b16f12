//! OpenAI and Azure OpenAI wire format.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::wire::{self, Ev};
use super::{
    Answer, Fault, Flavor, Gen, Incoming, Script, Shared, Source, deliver, generate, json_value,
    pre_fault,
};
use crate::fixtures;

const FINGERPRINT: &str = "fp_34a54ae93c";

fn error(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn check_bearer(req: &Incoming) -> Option<Response> {
    let ok = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty());
    if ok {
        return None;
    }
    Some(json_value(
        StatusCode::UNAUTHORIZED,
        &error(
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
        ),
    ))
}

/// Azure needs `api-version` (else 404) and `api-key` (else 401; an Entra ID
/// `authorization: Bearer` token is accepted as well).
fn check_azure(req: &Incoming) -> Option<Response> {
    if req.query_param("api-version").is_none_or(str::is_empty) {
        return Some(json_value(
            StatusCode::NOT_FOUND,
            &json!({"error": {"code": "404", "message": "Resource not found"}}),
        ));
    }
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !t.trim().is_empty());
    if !req.has_header("api-key") && !bearer {
        return Some(json_value(
            StatusCode::UNAUTHORIZED,
            &json!({"error": {
                "code": "401",
                "message": "Access denied due to invalid subscription key or wrong API endpoint. \
                            Make sure to provide a valid key for an active subscription and use \
                            a correct regional API endpoint for your resource."
            }}),
        ));
    }
    None
}

pub(crate) async fn chat_completions(State(shared): State<Arc<Shared>>, req: Incoming) -> Response {
    if let Some(resp) = check_bearer(&req) {
        return resp;
    }
    let model = req.str_field("model").to_owned();
    generate(
        &shared,
        Flavor::OpenAi,
        &model,
        req.stream_flag(),
        &req.body,
    )
    .await
}

pub(crate) async fn azure_chat_completions(
    State(shared): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    req: Incoming,
) -> Response {
    if let Some(resp) = check_azure(&req) {
        return resp;
    }
    generate(
        &shared,
        Flavor::OpenAi,
        &deployment,
        req.stream_flag(),
        &req.body,
    )
    .await
}

pub(crate) async fn embeddings(State(shared): State<Arc<Shared>>, req: Incoming) -> Response {
    if let Some(resp) = check_bearer(&req) {
        return resp;
    }
    let model = req.str_field("model").to_owned();
    embeddings_answer(&shared, &model, &req.body).await
}

pub(crate) async fn azure_embeddings(
    State(shared): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    req: Incoming,
) -> Response {
    if let Some(resp) = check_azure(&req) {
        return resp;
    }
    embeddings_answer(&shared, &deployment, &req.body).await
}

pub(crate) async fn list_models(req: Incoming) -> Response {
    if let Some(resp) = check_bearer(&req) {
        return resp;
    }
    let mut ids = vec![
        "gpt-4o-mini",
        "gpt-4o-mini-2024-07-18",
        "gpt-4o",
        "text-embedding-3-small",
        super::models::ECHO,
        super::models::SLOW_STREAM,
    ];
    ids.extend_from_slice(super::models::ALL_FAULTS);
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_721_172_741, "owned_by": "system"}))
        .collect();
    json_value(StatusCode::OK, &json!({"object": "list", "data": data}))
}

pub(crate) fn fault_error(fault: Fault) -> (StatusCode, Value) {
    match fault {
        Fault::Status500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            error(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
        ),
        Fault::Status503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            error(
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                None,
            ),
        ),
        Fault::Status429 => (
            StatusCode::TOO_MANY_REQUESTS,
            error(
                "Rate limit reached for gpt-4o-mini in organization org-mock on requests per min \
                 (RPM): Limit 3, Used 3, Requested 1. Please try again in 1s.",
                "requests",
                None,
                Some("rate_limit_exceeded"),
            ),
        ),
        Fault::Status401 => (
            StatusCode::UNAUTHORIZED,
            error(
                "Incorrect API key provided: sk-mock***. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
        ),
        Fault::ContentPolicy => (
            StatusCode::BAD_REQUEST,
            error(
                "Your request was rejected as a result of our safety system.",
                "invalid_request_error",
                None,
                Some("content_policy_violation"),
            ),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            error(
                "This model's maximum context length is 128000 tokens. However, your messages \
                 resulted in 250000 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
            ),
        ),
    }
}

fn messages(body: &Value) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

pub(crate) fn echo_text(body: &Value) -> String {
    messages(body)
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| wire::content_text(m.get("content").unwrap_or(&Value::Null)))
        .unwrap_or_default()
}

pub(crate) fn prompt_words(body: &Value) -> u64 {
    messages(body)
        .iter()
        .map(|m| {
            wire::words(&wire::content_text(
                m.get("content").unwrap_or(&Value::Null),
            ))
        })
        .sum()
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// A chat completion answer (non-streaming JSON or SSE chunks).
pub(crate) fn chat(g: &Gen<'_>, source: &Source) -> Answer {
    let with_usage = include_usage(g.body) && !g.no_usage;
    match source {
        Source::Fixture { tools } => {
            if g.stream {
                let raw = if *tools {
                    fixtures::OPENAI_CHAT_STREAM_TOOLS
                } else {
                    fixtures::OPENAI_CHAT_STREAM
                };
                if with_usage {
                    return Answer::Stream(wire::verbatim(raw));
                }
                // Without include_usage OpenAI sends no usage chunk and no
                // `usage` key on the other chunks.
                Answer::Stream(wire::map_json_events(raw, |chunk| {
                    let usage_chunk = chunk
                        .get("choices")
                        .and_then(Value::as_array)
                        .is_some_and(Vec::is_empty);
                    wire::remove_key(chunk, "usage");
                    !usage_chunk
                }))
            } else {
                let raw = if *tools {
                    fixtures::OPENAI_CHAT_TOOLS
                } else {
                    fixtures::OPENAI_CHAT
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
                Answer::Stream(script_stream(g, script, with_usage))
            } else {
                Answer::Json(script_json(g, script).to_string())
            }
        }
    }
}

fn script_json(g: &Gen<'_>, script: &Script) -> Value {
    let mut v = json!({
        "id": format!("chatcmpl-mock{}", g.id),
        "object": "chat.completion",
        "created": wire::now_secs(),
        "model": g.model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": script.text(),
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT
    });
    if !g.no_usage {
        v["usage"] = usage(script.prompt_words, script.completion_words);
    }
    v
}

fn script_stream(g: &Gen<'_>, script: &Script, with_usage: bool) -> Vec<Ev> {
    let id = format!("chatcmpl-mock{}", g.id);
    let created = wire::now_secs();
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": g.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let choice = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let data = |v: &Value| format!("data: {v}\n\n");

    let mut events = vec![Ev::now(data(&chunk(choice(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    ))))];
    for (i, piece) in script.pieces.iter().enumerate() {
        events.push(Ev::after(
            script.delay_before(i),
            data(&chunk(choice(json!({"content": piece}), None))),
        ));
    }
    events.push(Ev::now(data(&chunk(choice(json!({}), Some("stop"))))));
    if with_usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage(script.prompt_words, script.completion_words);
        events.push(Ev::now(data(&last)));
    }
    events.push(Ev::now("data: [DONE]\n\n"));
    events
}

async fn embeddings_answer(shared: &Arc<Shared>, model: &str, body: &Value) -> Response {
    let fault = shared.fault_for(model);
    if let Some(resp) = pre_fault(Flavor::OpenAi, fault).await {
        return resp;
    }
    let inputs = embedding_inputs(body.get("input").unwrap_or(&Value::Null));
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 4096) as usize);
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embed(text, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|t| wire::words(t)).sum();
    let mut v = json!({"object": "list", "data": data, "model": model});
    if fault != Some(Fault::NoUsage) {
        v["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    deliver(shared, Flavor::OpenAi, fault, Answer::Json(v.to_string()))
}

/// `input` may be a string, a list of strings, a token list or a list of token
/// lists; token lists become their numbers joined with spaces.
fn embedding_inputs(input: &Value) -> Vec<String> {
    let tokens = |v: &[Value]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![tokens(items)]
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Array(t) => tokens(t),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Deterministic unit vector derived from `text` (FNV-1a seed, xorshift).
pub(crate) fn embed(text: &str, dims: usize) -> Vec<f32> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        state ^= u64::from(b);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state |= 1;
    let raw: Vec<f64> = (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    raw.iter()
        .map(|x| if norm > 0.0 { x / norm } else { 0.0 } as f32)
        .collect()
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embed("hello world", 8);
        assert_eq!(a, embed("hello world", 8));
        assert_ne!(a, embed("hello there", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
