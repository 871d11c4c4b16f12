//! One conformance battery, run against every provider type (openai, azure, anthropic, gemini):
//! the same OpenAI-shaped requests to Sluice, each provider pointed at the testkit's mock upstream
//! speaking that provider's wire protocol. The checks are written once as async functions taking
//! the provider kind; `conformance!` generates a `mod <kind>` of `#[tokio::test]`s per kind.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_testkit::{CapturedRequest, MockUpstream, fixtures};

use crate::harness::{Sluice, provider_config, request_id, sse_events};

/// The upstream model that serves the recorded fixtures (any non-special name would; this one has
/// a price, so costs are non-zero).
const PLAIN: &str = "gpt-4o-mini";
const API_KEY: &str = "test-key";

/// Upstream model names configured for every battery (`m-<name>` on Sluice's side).
const MODELS: &[&str] = &[
    PLAIN,
    "echo",
    "slow-stream",
    "fault-500",
    "fault-429",
    "fault-401",
    "fault-garbage",
    "fault-hang",
    "fault-cut",
    "fault-cut-late",
    "fault-no-usage",
];

// ---------------------------------------------------------------------------------------------
// The battery
// ---------------------------------------------------------------------------------------------

/// One test of the battery.
macro_rules! check_test {
    ($kind:ident, $check:ident) => {
        #[tokio::test]
        async fn $check() {
            super::$check(stringify!($kind)).await;
        }
    };
}

macro_rules! battery {
    ($kind:ident; $($check:ident),* $(,)?) => {
        mod $kind {
            $( check_test!($kind, $check); )*
        }
    };
}

macro_rules! conformance {
    ($($kind:ident),* $(,)?) => {
        $(
            battery!($kind;
                plain_chat,
                stream_with_usage,
                stream_without_usage,
                tools_plain,
                tools_stream,
                echo_through_translation,
                fault_500_is_upstream_error,
                fault_429_is_rate_limited_with_retry_after,
                fault_401_is_upstream_auth_failed_without_key,
                fault_garbage_is_protocol_error,
                fault_hang_times_out,
                fault_cut_stream_ends_with_error_event,
                fault_no_usage_falls_back_to_tokenizer,
                fault_no_usage_stream_falls_back_to_tokenizer,
                cancelled_stream_cancels_upstream,
            );
        )*
    };
}

conformance!(openai, azure, anthropic, gemini);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn setup(kind: &str) -> (MockUpstream, Sluice) {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config(kind, &upstream.base_url(), MODELS)).await;
    (upstream, sluice)
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["location"]
            }
        }
    }])
}

async fn post_chat(sluice: &Sluice, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(sluice.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("POST /v1/chat/completions")
}

/// Sends a request, expects 200 and returns (request id, JSON body, cost header).
async fn chat_ok(sluice: &Sluice, body: &Value) -> (String, Value, Option<String>) {
    let resp = post_chat(sluice, body).await;
    let id = request_id(&resp);
    let status = resp.status();
    let cost = resp
        .headers()
        .get("x-sluice-cost-usd")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "expected 200, got {status}: {text}");
    let json: Value = serde_json::from_str(&text).expect("JSON body");
    (id, json, cost)
}

/// Sends a streamed request, expects 200 `text/event-stream`; returns (id, parsed SSE events).
async fn chat_stream(sluice: &Sluice, body: &Value) -> (String, Vec<(Option<String>, String)>) {
    let resp = post_chat(sluice, body).await;
    let id = request_id(&resp);
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("stream body");
    assert_eq!(status, 200, "expected 200 stream, got {status}: {text}");
    assert!(
        ctype.starts_with("text/event-stream"),
        "content-type {ctype:?}"
    );
    (id, sse_events(&text))
}

/// The JSON chunks of an OpenAI SSE stream (everything but `[DONE]`).
fn chunks(events: &[(Option<String>, String)]) -> Vec<Value> {
    events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d:?}: {e}")))
        .collect()
}

fn delta_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn stream_finish_reason(chunks: &[Value]) -> Option<String> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .next_back()
        .map(str::to_string)
}

/// Folds streamed tool-call deltas into (name, arguments text) per tool-call index.
fn fold_tool_calls(chunks: &[Value]) -> Vec<(String, String)> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for c in chunks {
        let Some(deltas) = c["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for d in deltas {
            let i = d["index"].as_u64().expect("tool call delta index") as usize;
            while calls.len() <= i {
                calls.push((String::new(), String::new()));
            }
            if let Some(n) = d["function"]["name"].as_str() {
                calls[i].0.push_str(n);
            }
            if let Some(a) = d["function"]["arguments"].as_str() {
                calls[i].1.push_str(a);
            }
        }
    }
    calls
}

/// Reads from a streaming response until `n` SSE events have arrived; returns the text.
async fn read_events(resp: &mut reqwest::Response, n: usize) -> String {
    let mut buf = String::new();
    while buf.matches("\n\n").count() < n {
        match tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await {
            Ok(Ok(Some(b))) => buf.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("stream ended or stalled after {buf:?}: {other:?}"),
        }
    }
    buf
}

/// Polls until `cond` holds, for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn only_request(upstream: &MockUpstream) -> CapturedRequest {
    let reqs = upstream.requests();
    assert_eq!(
        reqs.len(),
        1,
        "expected exactly one upstream request, got {reqs:#?}"
    );
    reqs.into_iter().next().unwrap()
}

fn assert_record_usage(rec: &Value, want: &Answer, what: &str) {
    assert_eq!(rec["usage_source"], "provider", "{what}: record {rec:#}");
    assert_eq!(
        rec["prompt_tokens"], want.prompt,
        "{what}: prompt tokens; record {rec:#}"
    );
    assert_eq!(
        rec["completion_tokens"], want.completion,
        "{what}: completion tokens; record {rec:#}"
    );
    assert_eq!(
        rec["cached_tokens"], want.cached,
        "{what}: cached tokens; record {rec:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// What the fixtures say (computed from the recorded bodies, in each provider's terms)
// ---------------------------------------------------------------------------------------------

/// The answer text and the usage Sluice must report for it (OpenAI terms: prompt includes cache).
#[derive(Debug)]
struct Answer {
    text: String,
    prompt: u64,
    completion: u64,
    cached: u64,
}

fn parse(raw: &str) -> Value {
    serde_json::from_str(raw).expect("fixture JSON")
}

/// The JSON `data` of every event of a recorded SSE body (Gemini's use CRLF).
fn fixture_events(raw: &str) -> Vec<Value> {
    sse_events(&raw.replace("\r\n", "\n"))
        .into_iter()
        .filter_map(|(_, d)| serde_json::from_str(&d).ok())
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn openai_usage(usage: &Value) -> (u64, u64, u64) {
    (
        u(&usage["prompt_tokens"]),
        u(&usage["completion_tokens"]),
        u(&usage["prompt_tokens_details"]["cached_tokens"]),
    )
}

/// Anthropic's `input_tokens` excludes cache reads and writes; OpenAI's prompt includes both.
fn anthropic_prompt(usage: &Value) -> (u64, u64) {
    let read = u(&usage["cache_read_input_tokens"]);
    (
        u(&usage["input_tokens"]) + read + u(&usage["cache_creation_input_tokens"]),
        read,
    )
}

fn gemini_usage(meta: &Value) -> (u64, u64, u64) {
    (
        u(&meta["promptTokenCount"]),
        u(&meta["candidatesTokenCount"]) + u(&meta["thoughtsTokenCount"]),
        u(&meta["cachedContentTokenCount"]),
    )
}

fn gemini_text(resp: &Value) -> String {
    resp["candidates"][0]["content"]["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

/// The non-streamed fixture answer of a provider kind.
fn fixture_plain(kind: &str) -> Answer {
    match kind {
        "openai" | "azure" => {
            let v = parse(fixtures::OPENAI_CHAT);
            let (prompt, completion, cached) = openai_usage(&v["usage"]);
            Answer {
                text: v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .into(),
                prompt,
                completion,
                cached,
            }
        }
        "anthropic" => {
            let v = parse(fixtures::ANTHROPIC_MESSAGES);
            let text = v["content"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect();
            let (prompt, cached) = anthropic_prompt(&v["usage"]);
            Answer {
                text,
                prompt,
                completion: u(&v["usage"]["output_tokens"]),
                cached,
            }
        }
        "gemini" => {
            let v = parse(fixtures::GEMINI_GENERATE);
            let (prompt, completion, cached) = gemini_usage(&v["usageMetadata"]);
            Answer {
                text: gemini_text(&v),
                prompt,
                completion,
                cached,
            }
        }
        other => panic!("unknown kind {other}"),
    }
}

/// The streamed fixture answer of a provider kind.
fn fixture_stream(kind: &str) -> Answer {
    match kind {
        "openai" | "azure" => {
            let evs = fixture_events(fixtures::OPENAI_CHAT_STREAM);
            let usage = evs
                .iter()
                .rev()
                .find(|e| !e["usage"].is_null())
                .map(|e| openai_usage(&e["usage"]))
                .expect("usage chunk in fixture");
            Answer {
                text: delta_text(&evs),
                prompt: usage.0,
                completion: usage.1,
                cached: usage.2,
            }
        }
        "anthropic" => {
            let evs = fixture_events(fixtures::ANTHROPIC_MESSAGES_STREAM);
            let mut text = String::new();
            let (mut prompt, mut cached, mut completion) = (0, 0, 0);
            for e in &evs {
                match e["type"].as_str() {
                    Some("message_start") => {
                        (prompt, cached) = anthropic_prompt(&e["message"]["usage"]);
                        completion = u(&e["message"]["usage"]["output_tokens"]);
                    }
                    Some("content_block_delta") => {
                        if let Some(t) = e["delta"]["text"].as_str() {
                            text.push_str(t);
                        }
                    }
                    Some("message_delta") => completion = u(&e["usage"]["output_tokens"]),
                    _ => {}
                }
            }
            Answer {
                text,
                prompt,
                completion,
                cached,
            }
        }
        "gemini" => {
            let evs = fixture_events(fixtures::GEMINI_STREAM);
            let text = evs.iter().map(gemini_text).collect();
            let usage = evs
                .iter()
                .rev()
                .find(|e| !e["usageMetadata"].is_null())
                .map(|e| gemini_usage(&e["usageMetadata"]))
                .expect("usageMetadata in fixture");
            Answer {
                text,
                prompt: usage.0,
                completion: usage.1,
                cached: usage.2,
            }
        }
        other => panic!("unknown kind {other}"),
    }
}

/// The tool call (name, parsed arguments) the fixture of a provider kind answers with.
fn fixture_tool_call(kind: &str) -> (String, Value) {
    match kind {
        "openai" | "azure" => {
            let v = parse(fixtures::OPENAI_CHAT_TOOLS);
            let f = &v["choices"][0]["message"]["tool_calls"][0]["function"];
            (
                f["name"].as_str().unwrap().into(),
                serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap(),
            )
        }
        "anthropic" => {
            let v = parse(fixtures::ANTHROPIC_MESSAGES_TOOLS);
            let b = v["content"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["type"] == "tool_use")
                .unwrap()
                .clone();
            (b["name"].as_str().unwrap().into(), b["input"].clone())
        }
        "gemini" => {
            let v = parse(fixtures::GEMINI_GENERATE_TOOLS);
            let fc = v["candidates"][0]["content"]["parts"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|p| p.get("functionCall"))
                .unwrap()
                .clone();
            (fc["name"].as_str().unwrap().into(), fc["args"].clone())
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Checks that the captured upstream request is a chat call in `kind`'s wire shape for the
/// upstream model `model`, carrying the user text `text`.
fn assert_wire_shape(kind: &str, req: &CapturedRequest, model: &str, text: &str, stream: bool) {
    assert_eq!(req.method, "POST", "{req:#?}");
    match kind {
        "openai" => {
            assert_eq!(req.path, "/v1/chat/completions", "{req:#?}");
            assert_eq!(
                req.header("authorization"),
                Some(format!("Bearer {API_KEY}").as_str()),
                "{req:#?}"
            );
            assert_eq!(req.body["model"], model, "{req:#?}");
            assert_eq!(req.body["messages"], user(text), "{req:#?}");
        }
        "azure" => {
            assert_eq!(
                req.path,
                format!("/openai/deployments/{model}/chat/completions"),
                "{req:#?}"
            );
            assert_eq!(
                req.query_param("api-version"),
                Some("2024-10-21"),
                "{req:#?}"
            );
            assert_eq!(req.header("api-key"), Some(API_KEY), "{req:#?}");
            assert_eq!(req.body["messages"], user(text), "{req:#?}");
        }
        "anthropic" => {
            assert_eq!(req.path, "/v1/messages", "{req:#?}");
            assert_eq!(req.header("x-api-key"), Some(API_KEY), "{req:#?}");
            assert_eq!(
                req.header("anthropic-version"),
                Some("2023-06-01"),
                "{req:#?}"
            );
            assert!(req.header("authorization").is_none(), "{req:#?}");
            assert_eq!(req.body["model"], model, "{req:#?}");
            assert!(
                req.body["max_tokens"].as_u64().is_some_and(|n| n > 0),
                "Anthropic needs max_tokens: {req:#?}"
            );
            let m = &req.body["messages"];
            assert_eq!(m.as_array().map(Vec::len), Some(1), "{req:#?}");
            assert_eq!(m[0]["role"], "user", "{req:#?}");
            let content = match &m[0]["content"] {
                Value::String(s) => s.clone(),
                Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
                other => panic!("content {other}"),
            };
            assert_eq!(content, text, "{req:#?}");
            if stream {
                assert_eq!(req.body["stream"], true, "{req:#?}");
            }
        }
        "gemini" => {
            let method = if stream {
                "streamGenerateContent"
            } else {
                "generateContent"
            };
            assert_eq!(
                req.path,
                format!("/v1beta/models/{model}:{method}"),
                "{req:#?}"
            );
            if stream {
                assert_eq!(req.query_param("alt"), Some("sse"), "{req:#?}");
            }
            assert_eq!(req.header("x-goog-api-key"), Some(API_KEY), "{req:#?}");
            let c = &req.body["contents"];
            assert_eq!(c.as_array().map(Vec::len), Some(1), "{req:#?}");
            assert_eq!(c[0]["role"], "user", "{req:#?}");
            assert_eq!(c[0]["parts"][0]["text"], text, "{req:#?}");
        }
        other => panic!("unknown kind {other}"),
    }
    if matches!(kind, "openai" | "azure") && stream {
        assert_eq!(req.body["stream"], true, "{req:#?}");
    }
}

/// Expects an OpenAI-shaped error with `status` and `code`, and a record with the same code.
async fn expect_error(
    sluice: &Sluice,
    body: &Value,
    status: u16,
    code: &str,
) -> (reqwest::header::HeaderMap, Value, Value) {
    let resp = post_chat(sluice, body).await;
    let id = request_id(&resp);
    let got = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("error body");
    assert_ne!(got, 500, "never a 500: {text}");
    assert_eq!(got, status, "status for {body}: {text}");
    let err: Value = serde_json::from_str(&text).expect("error body is JSON");
    let e = &err["error"];
    assert_eq!(e["code"], code, "error code: {err:#}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message: {err:#}"
    );
    assert!(e["type"].is_string(), "error type: {err:#}");
    assert!(
        e.as_object().is_some_and(|o| o.contains_key("param")),
        "error param: {err:#}"
    );
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "error", "record {rec:#}");
    assert_eq!(rec["error_code"], code, "record {rec:#}");
    assert_eq!(rec["http_status"], status, "record {rec:#}");
    assert_eq!(rec["provider"], "up", "record {rec:#}");
    (headers, err, rec)
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

async fn plain_chat(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let want = fixture_plain(kind);
    let model = format!("m-{PLAIN}");
    let (id, resp, cost) = chat_ok(
        &sluice,
        &json!({"model": model, "messages": user("How are you?")}),
    )
    .await;
    assert_eq!(resp["object"], "chat.completion", "{resp:#}");
    assert_eq!(
        resp["choices"][0]["message"]["role"], "assistant",
        "{resp:#}"
    );
    assert_eq!(
        resp["choices"][0]["message"]["content"], want.text,
        "{kind}: answer text"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp:#}");
    let usage = &resp["usage"];
    assert!(usage.is_object(), "usage present: {resp:#}");
    assert_eq!(usage["prompt_tokens"], want.prompt, "{resp:#}");
    assert_eq!(usage["completion_tokens"], want.completion, "{resp:#}");
    assert_eq!(
        usage["total_tokens"],
        want.prompt + want.completion,
        "{resp:#}"
    );

    assert_wire_shape(kind, &only_request(&upstream), PLAIN, "How are you?", false);

    let rec = sluice.record(&id).await;
    assert_eq!(rec["id"], id.as_str(), "{rec:#}");
    assert_eq!(rec["endpoint"], "chat.completions", "{rec:#}");
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["http_status"], 200, "{rec:#}");
    assert_eq!(rec["model"], model, "{rec:#}");
    assert_eq!(rec["provider"], "up", "{rec:#}");
    assert_eq!(rec["deployment"], PLAIN, "{rec:#}");
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    assert_eq!(rec["stream"], false, "{rec:#}");
    assert_eq!(rec["finish_reason"], "stop", "{rec:#}");
    assert!(rec["error_code"].is_null(), "{rec:#}");
    assert_record_usage(&rec, &want, kind);

    let header: f64 = cost
        .expect("x-sluice-cost-usd on a non-streamed success")
        .parse()
        .expect("cost header is a number");
    let stored = rec["cost_usd"].as_f64().expect("cost_usd");
    assert!(stored > 0.0, "{PLAIN} has a price, so cost > 0: {rec:#}");
    assert!(
        (header - stored).abs() < 1e-8,
        "header cost {header} vs record cost {stored}"
    );
}

async fn stream_with_usage(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let want = fixture_stream(kind);
    let (id, events) = chat_stream(
        &sluice,
        &json!({
            "model": format!("m-{PLAIN}"),
            "messages": user("How are you?"),
            "stream": true,
            "stream_options": {"include_usage": true}
        }),
    )
    .await;
    assert!(events.iter().all(|(e, _)| e.is_none()), "no named events");
    let done: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| d == "[DONE]")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        done,
        [events.len() - 1],
        "exactly one final [DONE]: {events:#?}"
    );
    let chunks = chunks(&events);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"),
        "{chunks:#?}"
    );
    // Sluice's note of an Anthropic upstream's start usage is for `/v1/messages` clients only.
    assert!(
        chunks.iter().all(|c| c.get("sluice_start_usage").is_none()),
        "{chunks:#?}"
    );
    assert_eq!(delta_text(&chunks), want.text, "{kind}: streamed text");
    assert_eq!(stream_finish_reason(&chunks).as_deref(), Some("stop"));
    let usage_at = chunks
        .iter()
        .position(|c| !c["usage"].is_null())
        .expect("a usage chunk");
    let last = chunks.last().unwrap();
    assert_eq!(
        usage_at,
        chunks.len() - 1,
        "usage chunk is the last before [DONE]"
    );
    assert_eq!(last["choices"], json!([]), "usage chunk has no choices");
    assert_eq!(last["usage"]["prompt_tokens"], want.prompt, "{last:#}");
    assert_eq!(
        last["usage"]["completion_tokens"], want.completion,
        "{last:#}"
    );

    assert_wire_shape(kind, &only_request(&upstream), PLAIN, "How are you?", true);

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["stream"], true, "{rec:#}");
    assert_eq!(rec["provider"], "up", "{rec:#}");
    assert_eq!(rec["deployment"], PLAIN, "{rec:#}");
    assert_eq!(rec["finish_reason"], "stop", "{rec:#}");
    let ttft = rec["ttft_ms"].as_f64().expect("ttft_ms on a stream");
    let latency = rec["latency_ms"].as_f64().expect("latency_ms");
    assert!(
        ttft > 0.0 && ttft <= latency,
        "ttft {ttft} <= latency {latency}"
    );
    assert_record_usage(&rec, &want, kind);
}

async fn stream_without_usage(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let want = fixture_stream(kind);
    let (id, events) = chat_stream(
        &sluice,
        &json!({"model": format!("m-{PLAIN}"), "messages": user("How are you?"), "stream": true}),
    )
    .await;
    assert_eq!(
        events.last().map(|(_, d)| d.as_str()),
        Some("[DONE]"),
        "{events:#?}"
    );
    let chunks = chunks(&events);
    for c in &chunks {
        assert!(
            c["usage"].is_null(),
            "the client did not ask for usage, yet a chunk carries it: {c:#}"
        );
        assert!(
            c["choices"].as_array().is_some_and(|a| !a.is_empty()),
            "no usage-only chunk without include_usage: {c:#}"
        );
    }
    assert_eq!(delta_text(&chunks), want.text, "{kind}: streamed text");

    let req = only_request(&upstream);
    if matches!(kind, "openai" | "azure") {
        assert_eq!(
            req.body["stream_options"]["include_usage"], true,
            "Sluice asks the upstream for usage anyway: {req:#?}"
        );
    }

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["stream"], true, "{rec:#}");
    assert_record_usage(&rec, &want, kind);
}

async fn tools_plain(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let (name, args) = fixture_tool_call(kind);
    let (id, resp, _) = chat_ok(
        &sluice,
        &json!({
            "model": format!("m-{PLAIN}"),
            "messages": user("What is the weather in Paris?"),
            "tools": weather_tools()
        }),
    )
    .await;
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{resp:#}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("tool_calls: {resp:#}"));
    assert_eq!(calls.len(), 1, "{resp:#}");
    assert_eq!(calls[0]["type"], "function", "{resp:#}");
    assert!(
        calls[0]["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{resp:#}"
    );
    assert_eq!(calls[0]["function"]["name"], name.as_str(), "{resp:#}");
    let got: Value = serde_json::from_str(
        calls[0]["function"]["arguments"]
            .as_str()
            .expect("arguments is a JSON string"),
    )
    .expect("arguments parse as JSON");
    assert_eq!(got, args, "{kind}: tool arguments");

    let req = only_request(&upstream);
    let sent_name = match kind {
        "openai" | "azure" => req.body["tools"][0]["function"]["name"].clone(),
        "anthropic" => req.body["tools"][0]["name"].clone(),
        _ => req.body["tools"][0]["functionDeclarations"][0]["name"].clone(),
    };
    assert_eq!(
        sent_name, "get_weather",
        "tools reach the upstream: {req:#?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["finish_reason"], "tool_calls", "{rec:#}");
}

async fn tools_stream(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let (name, args) = fixture_tool_call(kind);
    let (id, events) = chat_stream(
        &sluice,
        &json!({
            "model": format!("m-{PLAIN}"),
            "messages": user("What is the weather in Paris?"),
            "tools": weather_tools(),
            "stream": true
        }),
    )
    .await;
    assert_eq!(
        events.last().map(|(_, d)| d.as_str()),
        Some("[DONE]"),
        "{events:#?}"
    );
    let chunks = chunks(&events);
    assert_eq!(
        stream_finish_reason(&chunks).as_deref(),
        Some("tool_calls"),
        "{chunks:#?}"
    );
    let calls = fold_tool_calls(&chunks);
    assert_eq!(calls.len(), 1, "one tool call: {chunks:#?}");
    assert_eq!(calls[0].0, name, "{kind}: tool name");
    let got: Value = serde_json::from_str(&calls[0].1)
        .unwrap_or_else(|e| panic!("folded arguments {:?} are not JSON: {e}", calls[0].1));
    assert_eq!(got, args, "{kind}: folded tool arguments");

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["finish_reason"], "tool_calls", "{rec:#}");
}

async fn echo_through_translation(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let text = "the quick brown fox jumps over the lazy dog";
    let (id, resp, _) = chat_ok(&sluice, &json!({"model": "m-echo", "messages": user(text)})).await;
    let answer = resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("content: {resp:#}"));
    assert!(
        answer.contains(text),
        "{kind}: the echo {answer:?} should contain the user text"
    );
    assert_wire_shape(kind, &only_request(&upstream), "echo", text, false);

    // Streamed, the words come back one chunk each.
    let (_, events) = chat_stream(
        &sluice,
        &json!({"model": "m-echo", "messages": user(text), "stream": true}),
    )
    .await;
    let streamed = delta_text(&chunks(&events));
    assert!(
        streamed.contains(text),
        "{kind}: streamed echo {streamed:?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["deployment"], "echo", "{rec:#}");
    assert!(
        rec["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{rec:#}"
    );
}

async fn fault_500_is_upstream_error(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    expect_error(
        &sluice,
        &json!({"model": "m-fault-500", "messages": user("hi")}),
        502,
        "upstream_error",
    )
    .await;
    assert_eq!(upstream.request_count(), 1);
}

async fn fault_429_is_rate_limited_with_retry_after(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let (headers, _, _) = expect_error(
        &sluice,
        &json!({"model": "m-fault-429", "messages": user("hi")}),
        429,
        "upstream_rate_limited",
    )
    .await;
    let retry = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .expect("429 carries retry-after");
    assert!(
        retry.parse::<u64>().is_ok_and(|s| s >= 1),
        "retry-after {retry:?}"
    );
}

async fn fault_401_is_upstream_auth_failed_without_key(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let (_, err, rec) = expect_error(
        &sluice,
        &json!({"model": "m-fault-401", "messages": user("hi")}),
        502,
        "upstream_auth_failed",
    )
    .await;
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(!msg.contains(API_KEY), "the api key leaks: {msg}");
    let stored = rec["error_message"].as_str().unwrap_or("");
    assert!(
        !stored.contains(API_KEY),
        "the api key leaks into the log: {stored}"
    );
}

async fn fault_garbage_is_protocol_error(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    expect_error(
        &sluice,
        &json!({"model": "m-fault-garbage", "messages": user("hi")}),
        502,
        "upstream_protocol_error",
    )
    .await;
}

async fn fault_hang_times_out(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let start = Instant::now();
    let (_, _, rec) = expect_error(
        &sluice,
        &json!({"model": "m-fault-hang", "messages": user("hi")}),
        504,
        "upstream_timeout",
    )
    .await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(4500),
        "the 2 s request timeout should answer in ~2 s, took {took:?}"
    );
    assert!(
        rec["latency_ms"].as_f64().is_some_and(|l| l >= 1800.0),
        "{rec:#}"
    );
}

async fn fault_cut_stream_ends_with_error_event(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    if kind == "anthropic" {
        // The mock cuts an Anthropic stream after `message_start` and `content_block_start`:
        // before any content, so nothing reached the client yet and the failure is answered as
        // a plain HTTP error (after failover, had there been another deployment).
        let (_, _, rec) = expect_error(
            &sluice,
            &json!({"model": "m-fault-cut", "messages": user("hi"), "stream": true}),
            502,
            "upstream_error",
        )
        .await;
        assert_eq!(rec["stream"], true, "{rec:#}");
        assert_eq!(rec["attempts"], 1, "{rec:#}");
        return;
    }
    let (id, events) = chat_stream(
        &sluice,
        &json!({"model": "m-fault-cut", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert!(
        events.iter().all(|(_, d)| d != "[DONE]"),
        "a broken stream must not end with [DONE]: {events:#?}"
    );
    let (_, last) = events.last().expect("some events before the error");
    let last: Value = serde_json::from_str(last).expect("error event is JSON");
    let code = last["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("last event is an error: {events:#?}"))
        .to_string();
    assert!(
        last["error"]["message"].is_string(),
        "error message: {last:#}"
    );
    assert!(
        code.starts_with("upstream_"),
        "an upstream failure code, got {code}"
    );
    assert!(
        events.len() >= 2,
        "chunks came before the error: {events:#?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "error", "{rec:#}");
    assert_eq!(rec["error_code"], code.as_str(), "{rec:#}");
    assert_eq!(rec["stream"], true, "{rec:#}");
    assert_eq!(
        rec["http_status"], 200,
        "the client got 200 and the stream: {rec:#}"
    );
}

async fn fault_no_usage_falls_back_to_tokenizer(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let (id, resp, _) = chat_ok(
        &sluice,
        &json!({"model": "m-fault-no-usage", "messages": user("How are you today?")}),
    )
    .await;
    assert!(
        resp["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{resp:#}"
    );
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(
        rec["usage_source"], "tokenizer",
        "{kind}: the upstream reported no usage, so Sluice counts: {rec:#}"
    );
    assert!(
        rec["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{rec:#}"
    );
    assert!(
        rec["completion_tokens"].as_u64().is_some_and(|n| n > 0),
        "{rec:#}"
    );
    // The client is given the same count.
    assert_eq!(
        resp["usage"]["prompt_tokens"], rec["prompt_tokens"],
        "{resp:#}"
    );
    assert_eq!(
        resp["usage"]["completion_tokens"], rec["completion_tokens"],
        "{resp:#}"
    );
}

async fn fault_no_usage_stream_falls_back_to_tokenizer(kind: &str) {
    let (_upstream, sluice) = setup(kind).await;
    let (id, events) = chat_stream(
        &sluice,
        &json!({
            "model": "m-fault-no-usage",
            "messages": user("How are you today?"),
            "stream": true,
            "stream_options": {"include_usage": true}
        }),
    )
    .await;
    assert_eq!(
        events.last().map(|(_, d)| d.as_str()),
        Some("[DONE]"),
        "{events:#?}"
    );
    assert!(!delta_text(&chunks(&events)).is_empty(), "{events:#?}");
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(
        rec["usage_source"], "tokenizer",
        "{kind}: the upstream stream reported no usage, so Sluice counts: {rec:#}"
    );
    assert!(
        rec["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{rec:#}"
    );
    assert!(
        rec["completion_tokens"].as_u64().is_some_and(|n| n > 0),
        "{rec:#}"
    );
    // The client asked for usage: its last chunk carries the same count.
    let last = chunks(&events).last().cloned().expect("chunks");
    assert_eq!(
        last["usage"]["prompt_tokens"], rec["prompt_tokens"],
        "{events:#?}"
    );
    assert_eq!(
        last["usage"]["completion_tokens"], rec["completion_tokens"],
        "{events:#?}"
    );
}

async fn cancelled_stream_cancels_upstream(kind: &str) {
    let (upstream, sluice) = setup(kind).await;
    let mut resp = post_chat(
        &sluice,
        &json!({"model": "m-slow-stream", "messages": user("count"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let got = read_events(&mut resp, 3).await;
    assert!(got.contains("tok0"), "first tokens arrived: {got:?}");
    assert_eq!(upstream.cancelled_streams(), 0);
    drop(resp);

    eventually(Duration::from_secs(3), "upstream stream cancelled", || {
        upstream.cancelled_streams() == 1
    })
    .await;
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "cancelled", "{rec:#}");
    assert_eq!(rec["http_status"], 499, "{rec:#}");
    assert_eq!(rec["stream"], true, "{rec:#}");
    assert_eq!(rec["provider"], "up", "{rec:#}");
    // The attempt was under way when the client left.
    assert_eq!(rec["attempt_log"][0]["outcome"], "cancelled", "{rec:#}");
    // What was sent before the client left is counted from sizes: no tokenizer runs for a
    // request already gone.
    assert_eq!(rec["usage_source"], "estimate", "{rec:#}");
    assert!(rec["prompt_tokens"].as_u64() > Some(0), "{rec:#}");
    assert!(rec["completion_tokens"].as_u64() > Some(0), "{rec:#}");
}

// ---------------------------------------------------------------------------------------------
// Provider-specific
// ---------------------------------------------------------------------------------------------

/// Anthropic cannot return several choices: `n: 2` is refused before any upstream call.
#[tokio::test]
async fn anthropic_refuses_n_greater_than_one() {
    let (upstream, sluice) = setup("anthropic").await;
    let (_, err, rec) = expect_error(
        &sluice,
        &json!({"model": format!("m-{PLAIN}"), "messages": user("hi"), "n": 2}),
        422,
        "unsupported_parameter",
    )
    .await;
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains('n')),
        "{err:#}"
    );
    assert_eq!(upstream.request_count(), 0, "nothing reached the upstream");
    assert_eq!(rec["endpoint"], "chat.completions", "{rec:#}");
}

/// A scripted Anthropic-compatible upstream: to every request it answers a stream of these
/// events as `data:` lines alone (no `event:` names), then holds the connection open a while
/// before closing it.
async fn scripted_anthropic(events: Vec<Value>) -> std::net::SocketAddr {
    let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    scripted("text/event-stream", body).await
}

/// A scripted upstream: to every request it answers 200 with this body, then holds the
/// connection open a while before closing it.
async fn scripted(content_type: &'static str, body: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // The head, then the body its Content-Length announces.
                loop {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            });
        }
    });
    addr
}

/// An Anthropic-compatible server that sends its stream events as `data:` lines alone (no
/// `event:` names): the stream ends at the `message_stop` event, complete and without an error.
#[tokio::test]
async fn an_anthropic_stream_without_event_names_ends_at_message_stop() {
    let addr = scripted_anthropic(vec![
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 0}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 1}}),
        json!({"type": "message_stop"}),
    ])
    .await;
    // Held open after `message_stop`: the stream must end there, not at the close.
    let sluice = Sluice::start(&provider_config(
        "anthropic",
        &format!("http://{addr}"),
        &[PLAIN],
    ))
    .await;
    let (id, events) = chat_stream(
        &sluice,
        &json!({"model": format!("m-{PLAIN}"), "messages": user("Hi"), "stream": true}),
    )
    .await;
    let chunks = chunks(&events);
    assert_eq!(delta_text(&chunks), "Hello");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{chunks:#?}"
    );
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
}

/// An answer of 200 that carries an error (OpenRouter reports errors during generation so) is
/// that error: a rate limit is a 429 (it was a broken upstream, 502, counted against the
/// breaker), and one beside a completion is not taken for an empty answer.
#[tokio::test]
async fn an_error_in_a_200_answer_is_that_error() {
    for (body, status) in [
        (
            json!({"error": {"code": 429, "message": "Rate limit exceeded upstream"}}),
            429,
        ),
        (
            json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "error"}],
                   "error": {"code": 502, "message": "provider returned error"}}),
            502,
        ),
    ] {
        let addr = scripted("application/json", body.to_string()).await;
        let sluice = Sluice::start(&provider_config(
            "openai",
            &format!("http://{addr}"),
            &[PLAIN],
        ))
        .await;
        let resp = reqwest::Client::new()
            .post(sluice.url("/v1/chat/completions"))
            .json(&json!({"model": format!("m-{PLAIN}"), "messages": user("Hi")}))
            .send()
            .await
            .unwrap();
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(got, status, "{body}: {text}");
    }
}

/// A Claude stream cut before its final usage, whose prompt was mostly read from the cache: the
/// record keeps `message_start`'s cache reads and writes and prices them as such (the whole
/// prompt was priced as plain input, 6.3 times the cost here).
#[tokio::test]
async fn a_cut_claude_stream_prices_its_cache_reads_as_such() {
    let addr = scripted_anthropic(vec![
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 100, "cache_read_input_tokens": 20000, "cache_creation_input_tokens": 1000, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello there"}}),
    ])
    .await;
    let sluice = Sluice::start(&format!(
        "[providers.up]\ntype = \"anthropic\"\nbase_url = \"http://{addr}\"\napi_key = \"k\"\n\
         [models.\"c\"]\ndeployments = [{{ provider = \"up\", model = \"claude-x\", \
         input_cost_per_mtok = 3, output_cost_per_mtok = 15, cached_input_cost_per_mtok = 0.3, \
         cache_write_cost_per_mtok = 3.75 }}]\n"
    ))
    .await;
    let (id, _) = chat_stream(
        &sluice,
        &json!({"model": "c", "messages": user("Hi"), "stream": true}),
    )
    .await;
    let rec = sluice.record(&id).await;
    assert_eq!(rec["status"], "error", "{rec:#}");
    assert_eq!(rec["prompt_tokens"], 21_100, "{rec:#}");
    assert_eq!(rec["cached_tokens"], 20_000, "{rec:#}");
    let completion = rec["completion_tokens"]
        .as_f64()
        .expect("completion_tokens");
    let want = (100.0 * 3.0 + 20_000.0 * 0.3 + 1_000.0 * 3.75 + completion * 15.0) / 1e6;
    let cost = rec["cost_usd"].as_f64().expect("cost_usd");
    assert!(
        (cost - want).abs() < 1e-12,
        "{cost} against {want}: {rec:#}"
    );
}

/// An OpenAI upstream gets the request as the client sent it, with only `model` replaced.
#[tokio::test]
async fn openai_upstream_receives_unknown_fields_untouched() {
    let (upstream, sluice) = setup("openai").await;
    let passthrough = json!({
        "logprobs": true,
        "top_logprobs": 3,
        "response_format": {"type": "json_object"},
        "seed": 42,
        "n": 2,
        "parallel_tool_calls": false,
        "x_vendor_field": {"nested": [1, "two", {"three": null}], "flag": true}
    });
    let mut body = json!({"model": format!("m-{PLAIN}"), "messages": user("Answer in JSON")});
    for (k, v) in passthrough.as_object().unwrap() {
        body[k] = v.clone();
    }
    chat_ok(&sluice, &body).await;
    let req = only_request(&upstream);
    assert_eq!(req.body["model"], PLAIN, "model is the upstream name");
    assert_eq!(req.body["messages"], user("Answer in JSON"));
    for (k, v) in passthrough.as_object().unwrap() {
        assert_eq!(&req.body[k], v, "`{k}` reaches the upstream untouched");
    }
}

/// A forwarding HTTP proxy for the proxy test: each connection's first request head is reported,
/// then the bytes are relayed to `upstream` both ways (the upstream accepts absolute-form
/// request targets).
async fn forwarding_proxy(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let _ = tx.send(String::from_utf8_lossy(&buf[..end]).to_string());
                let mut up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                up.write_all(&buf).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (addr, rx)
}

/// Outbound proxies come from `sluice serve`'s environment (`HTTP_PROXY`, with credentials), and
/// `NO_PROXY` exempts hosts from them.
#[tokio::test]
async fn upstreams_are_reached_through_the_proxy_the_environment_names() {
    let upstream = MockUpstream::start().await;
    let base = upstream.base_url();
    let up_addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let (proxy, mut seen) = forwarding_proxy(up_addr).await;
    let config = provider_config("openai", &base, &[PLAIN]);
    let env = |no_proxy: &str| {
        vec![
            ("HTTP_PROXY", format!("http://team:hunter2@{proxy}")),
            ("http_proxy", format!("http://team:hunter2@{proxy}")),
            ("ALL_PROXY", String::new()),
            ("all_proxy", String::new()),
            ("NO_PROXY", no_proxy.to_string()),
            ("no_proxy", no_proxy.to_string()),
        ]
    };
    let body = json!({"model": format!("m-{PLAIN}"), "messages": user("Hello")});

    let sluice = Sluice::start_opts(crate::harness::Opts {
        config: &config,
        env: env(""),
        ..Default::default()
    })
    .await;
    chat_ok(&sluice, &body).await;
    let head = seen.try_recv().expect("the request went through the proxy");
    assert!(
        head.starts_with(&format!("POST {base}/v1/chat/completions HTTP/1.1\r\n")),
        "absolute-form request to the proxy: {head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nproxy-authorization: basic dgvhbtpodw50zxiy"),
        "credentials of the proxy URL: {head}"
    );
    assert_eq!(upstream.request_count(), 1);
    drop(sluice);

    let sluice = Sluice::start_opts(crate::harness::Opts {
        config: &config,
        env: env("127.0.0.1"),
        ..Default::default()
    })
    .await;
    chat_ok(&sluice, &body).await;
    assert!(seen.try_recv().is_err(), "NO_PROXY hosts bypass the proxy");
    assert_eq!(upstream.request_count(), 2);
}

/// A Claude stream cut after its content, before its final usage: the record keeps the prompt
/// tokens Anthropic reported in `message_start` (it fell back to Sluice's own count).
#[tokio::test]
async fn a_claude_stream_cut_late_keeps_the_upstreams_prompt_count() {
    let (_upstream, sluice) = setup("anthropic").await;
    let prompt = user("what is the weather like in Paris today, and tomorrow?");
    // The same recorded answer, whole (fault models replay the recorded stream).
    let (whole, _) = chat_stream(
        &sluice,
        &json!({"model": format!("m-{PLAIN}"), "messages": prompt, "stream": true}),
    )
    .await;
    let whole = sluice.record(&whole).await;
    assert_eq!(whole["usage_source"], "provider", "{whole:#}");
    let (cut, events) = chat_stream(
        &sluice,
        &json!({"model": "m-fault-cut-late", "messages": prompt, "stream": true}),
    )
    .await;
    assert!(events.iter().all(|(_, d)| d != "[DONE]"), "{events:#?}");
    let cut = sluice.record(&cut).await;
    assert_eq!(cut["status"], "error", "{cut:#}");
    assert_eq!(cut["prompt_tokens"], whole["prompt_tokens"], "{cut:#}");
}
