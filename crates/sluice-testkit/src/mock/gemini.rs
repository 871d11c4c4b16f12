//! Gemini (Generative Language API) wire format.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::wire::{self, Ev};
use super::{Answer, Fault, Flavor, Gen, Incoming, Script, Shared, Source, generate, json_value};
use crate::fixtures;

fn error(code: StatusCode, status: &str, message: &str) -> Value {
    json!({"error": {"code": code.as_u16(), "message": message, "status": status}})
}

fn error_response(code: StatusCode, status: &str, message: &str) -> Response {
    json_value(code, &error(code, status, message))
}

/// `POST /v1beta/models/{model}:{method}`.
pub(crate) async fn models_call(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    req: Incoming,
) -> Response {
    let has_key =
        req.has_header("x-goog-api-key") || req.query_param("key").is_some_and(|k| !k.is_empty());
    if !has_key {
        return error_response(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
        );
    }
    let Some((model, method)) = target.rsplit_once(':') else {
        return error_response(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("mock upstream: no method in models/{target}"),
        );
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                &format!("mock upstream: unsupported method {method}"),
            );
        }
    };
    if stream && req.query_param("alt") != Some("sse") {
        return error_response(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "mock upstream: streamGenerateContent is only served with ?alt=sse",
        );
    }
    generate(&shared, Flavor::Gemini, model, stream, &req.body).await
}

pub(crate) fn fault_error(fault: Fault) -> (StatusCode, Value) {
    let (code, status, message) = match fault {
        Fault::Status500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting",
        ),
        Fault::Status503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
        ),
        Fault::Status429 => (
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
        ),
        Fault::Status401 => (
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential.",
        ),
        Fault::ContentPolicy => (
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "The request was blocked by the content filter (SAFETY).",
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "The input token count (1250000) exceeds the maximum number of tokens allowed \
             (1048576).",
        ),
    };
    (code, error(code, status, message))
}

fn parts_text(content: &Value) -> String {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn contents(body: &Value) -> &[Value] {
    body.get("contents")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Text of the last content whose role is `user` (or missing).
pub(crate) fn echo_text(body: &Value) -> String {
    contents(body)
        .iter()
        .rev()
        .find(|c| {
            c.get("role")
                .and_then(Value::as_str)
                .is_none_or(|r| r == "user")
        })
        .map(parts_text)
        .unwrap_or_default()
}

pub(crate) fn prompt_words(body: &Value) -> u64 {
    let system = body
        .get("systemInstruction")
        .or_else(|| body.get("system_instruction"))
        .map_or(0, |s| wire::words(&parts_text(s)));
    system
        + contents(body)
            .iter()
            .map(|c| wire::words(&parts_text(c)))
            .sum::<u64>()
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": completion,
        "totalTokenCount": prompt + completion,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": completion}]
    })
}

pub(crate) fn generate_answer(g: &Gen<'_>, source: &Source) -> Answer {
    match source {
        Source::Fixture { tools } => {
            if g.stream {
                // There is no streamed tool-call recording; tool requests
                // stream the tool-call response as a single event.
                if *tools {
                    let mut v: Value = serde_json::from_str(fixtures::GEMINI_GENERATE_TOOLS)
                        .expect("fixture is valid JSON");
                    if g.no_usage {
                        wire::remove_key(&mut v, "usageMetadata");
                    }
                    return Answer::Stream(vec![Ev::now(format!("data: {v}\r\n\r\n"))]);
                }
                if !g.no_usage {
                    return Answer::Stream(wire::verbatim(fixtures::GEMINI_STREAM));
                }
                Answer::Stream(wire::map_json_events(fixtures::GEMINI_STREAM, |v| {
                    wire::remove_key(v, "usageMetadata");
                    true
                }))
            } else {
                let raw = if *tools {
                    fixtures::GEMINI_GENERATE_TOOLS
                } else {
                    fixtures::GEMINI_GENERATE
                };
                if g.no_usage {
                    Answer::Json(wire::edit_json(raw, |v| {
                        wire::remove_key(v, "usageMetadata");
                    }))
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

fn response(g: &Gen<'_>, text: &str, last: Option<&Script>) -> Value {
    let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}});
    let mut v = json!({});
    if let Some(script) = last {
        candidate["finishReason"] = json!("STOP");
        if !g.no_usage {
            v["usageMetadata"] = usage(script.prompt_words, script.completion_words);
        }
    }
    v["candidates"] = json!([candidate]);
    v["modelVersion"] = json!(g.model);
    v["responseId"] = json!(format!("mock-response-{}", g.id));
    v
}

fn script_json(g: &Gen<'_>, script: &Script) -> Value {
    response(g, &script.text(), Some(script))
}

fn script_stream(g: &Gen<'_>, script: &Script) -> Vec<Ev> {
    if script.pieces.is_empty() {
        let v = response(g, "", Some(script));
        return vec![Ev::now(format!("data: {v}\r\n\r\n"))];
    }
    let n = script.pieces.len();
    script
        .pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let v = response(g, piece, (i + 1 == n).then_some(script));
            Ev::after(script.delay_before(i), format!("data: {v}\r\n\r\n"))
        })
        .collect()
}
