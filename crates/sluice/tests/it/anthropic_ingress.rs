//! Anthropic SDK users pointing at Sluice's `POST /v1/messages`: the request is translated to the
//! OpenAI shape for an OpenAI-type provider (the mock upstream), and the answer comes back in the
//! Messages API shape, whole or as its exact event sequence.

use serde_json::{Value, json};
use sluice_testkit::{CapturedRequest, MockUpstream, fixtures};

use crate::harness::{Sluice, provider_config, request_id, sse_events};

/// The upstream model that serves the recorded OpenAI fixtures.
const PLAIN: &str = "gpt-4o-mini";

async fn setup() -> (MockUpstream, Sluice) {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config(
        "openai",
        &upstream.base_url(),
        &["echo", PLAIN],
    ))
    .await;
    (upstream, sluice)
}

/// `POST /v1/messages` with the headers an Anthropic SDK sends.
fn messages_request(sluice: &Sluice) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(sluice.url("/v1/messages"))
        .header("x-api-key", "sk-ant-anything")
        .header("anthropic-version", "2023-06-01")
}

async fn send(sluice: &Sluice, body: &Value) -> reqwest::Response {
    messages_request(sluice)
        .json(body)
        .send()
        .await
        .expect("POST /v1/messages")
}

/// Sends, expects 200 and returns (request id, JSON body).
async fn message_ok(sluice: &Sluice, body: &Value) -> (String, Value) {
    let resp = send(sluice, body).await;
    let id = request_id(&resp);
    let status = resp.status();
    let text = resp.text().await.expect("body");
    assert_eq!(status, 200, "expected 200, got {status}: {text}");
    (id, serde_json::from_str(&text).expect("JSON body"))
}

/// Sends a streamed request, expects 200 `text/event-stream`; returns (id, (event, data JSON)).
async fn message_stream(sluice: &Sluice, body: &Value) -> (String, Vec<(String, Value)>) {
    let resp = send(sluice, body).await;
    let id = request_id(&resp);
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp.text().await.expect("stream body");
    assert_eq!(status, 200, "expected 200, got {status}: {text}");
    assert!(
        ctype.starts_with("text/event-stream"),
        "content-type {ctype:?}"
    );
    let events = sse_events(&text)
        .into_iter()
        .map(|(name, data)| {
            let name = name.unwrap_or_else(|| panic!("every event is named: {text}"));
            let data: Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event {name} data {data:?} is not JSON: {e}"));
            assert_eq!(
                data["type"],
                name.as_str(),
                "each data's type equals its event name"
            );
            (name, data)
        })
        .collect();
    (id, events)
}

/// Event names with runs of `content_block_delta` collapsed to one.
fn collapsed_names(events: &[(String, Value)]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for (name, _) in events {
        if name == "content_block_delta" && out.last() == Some(&"content_block_delta") {
            continue;
        }
        out.push(name);
    }
    out
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

/// Expects an Anthropic-shaped error body with `status` and error `type`; returns the record.
async fn expect_error(
    sluice: &Sluice,
    resp: reqwest::Response,
    status: u16,
    kind: &str,
) -> (Value, Value) {
    let id = request_id(&resp);
    let got = resp.status().as_u16();
    let text = resp.text().await.expect("error body");
    assert_eq!(got, status, "status: {text}");
    let body: Value = serde_json::from_str(&text).expect("error body is JSON");
    assert_eq!(body["type"], "error", "Anthropic error shape: {body:#}");
    assert_eq!(body["error"]["type"], kind, "error type: {body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error message: {body:#}"
    );
    assert!(
        body.get("code").is_none() && body["error"].get("code").is_none(),
        "not the OpenAI shape: {body:#}"
    );
    let rec = sluice.record(&id).await;
    assert_eq!(rec["endpoint"], "messages", "{rec:#}");
    assert_eq!(rec["status"], "error", "{rec:#}");
    assert_eq!(rec["http_status"], status, "{rec:#}");
    (body, rec)
}

fn weather_tool() -> Value {
    json!({
        "name": "get_weather",
        "description": "Get the current weather in a location",
        "input_schema": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
            },
            "required": ["location"]
        }
    })
}

/// The tool call of the OpenAI tools fixture: (name, parsed arguments).
fn fixture_tool_call() -> (String, Value) {
    let v: Value = serde_json::from_str(fixtures::OPENAI_CHAT_TOOLS).unwrap();
    let f = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    (
        f["name"].as_str().unwrap().to_string(),
        serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap(),
    )
}

#[tokio::test]
async fn plain_message_comes_back_in_messages_shape() {
    let (upstream, sluice) = setup().await;
    let text = "hello from an Anthropic SDK";
    let (id, msg) = message_ok(
        &sluice,
        &json!({
            "model": "m-echo",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": text}]
        }),
    )
    .await;
    assert_eq!(msg["type"], "message", "{msg:#}");
    assert_eq!(msg["role"], "assistant", "{msg:#}");
    assert_eq!(
        msg["model"], "m-echo",
        "the model the client asked for: {msg:#}"
    );
    assert_eq!(
        msg["content"],
        json!([{"type": "text", "text": text}]),
        "one text block with the echo: {msg:#}"
    );
    assert_eq!(msg["stop_reason"], "end_turn", "{msg:#}");
    let mid = msg["id"].as_str().expect("id");
    assert!(mid.starts_with("msg_"), "id {mid}");
    assert_eq!(
        mid,
        format!("msg_{}", id.replace('-', "")),
        "the message id is the request id"
    );
    assert!(
        msg["usage"]["input_tokens"].as_u64().is_some_and(|n| n > 0),
        "{msg:#}"
    );
    assert!(
        msg["usage"]["output_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{msg:#}"
    );

    // Upstream: an OpenAI chat call.
    let req = only_request(&upstream);
    assert_eq!(req.path, "/v1/chat/completions", "{req:#?}");
    assert_eq!(req.body["model"], "echo", "{req:#?}");
    assert_eq!(req.body["max_tokens"], 256, "{req:#?}");
    assert_eq!(
        req.body["messages"],
        json!([{"role": "user", "content": text}]),
        "{req:#?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["endpoint"], "messages", "{rec:#}");
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["model"], "m-echo", "{rec:#}");
    assert_eq!(rec["provider"], "up", "{rec:#}");
    assert_eq!(rec["deployment"], "echo", "{rec:#}");
    assert_eq!(rec["usage_source"], "provider", "{rec:#}");
    assert_eq!(rec["stream"], false, "{rec:#}");
}

#[tokio::test]
async fn streaming_follows_the_messages_event_order() {
    let (upstream, sluice) = setup().await;
    let text = "stream these words back to me please";
    let (id, events) = message_stream(
        &sluice,
        &json!({
            "model": "m-echo",
            "max_tokens": 256,
            "stream": true,
            "messages": [{"role": "user", "content": text}]
        }),
    )
    .await;
    assert_eq!(
        collapsed_names(&events),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "event order: {events:#?}"
    );
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .count();
    assert!(deltas > 1, "the echo streams word by word: {events:#?}");

    let start = &events[0].1["message"];
    assert_eq!(start["type"], "message", "{start:#}");
    assert_eq!(start["role"], "assistant", "{start:#}");
    assert_eq!(start["model"], "m-echo", "{start:#}");
    assert_eq!(start["content"], json!([]), "{start:#}");
    assert!(
        start["id"].as_str().is_some_and(|s| s.starts_with("msg_")),
        "{start:#}"
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""}),
        "{events:#?}"
    );
    let mut streamed = String::new();
    for (name, data) in &events {
        if name == "content_block_delta" {
            assert_eq!(data["index"], 0, "{data:#}");
            assert_eq!(data["delta"]["type"], "text_delta", "{data:#}");
            streamed.push_str(data["delta"]["text"].as_str().expect("text"));
        }
    }
    assert_eq!(streamed, text, "the deltas spell the echo");
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn", "{delta:#}");
    assert!(
        delta["usage"]["output_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "message_delta carries output_tokens: {delta:#}"
    );

    // Upstream: a streamed OpenAI call that asks for usage.
    let req = only_request(&upstream);
    assert_eq!(req.body["stream"], true, "{req:#?}");
    assert_eq!(
        req.body["stream_options"]["include_usage"], true,
        "{req:#?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["endpoint"], "messages", "{rec:#}");
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["stream"], true, "{rec:#}");
    assert_eq!(rec["usage_source"], "provider", "{rec:#}");
}

#[tokio::test]
async fn tool_use_round_trip() {
    let (upstream, sluice) = setup().await;
    let (name, args) = fixture_tool_call();
    let tool = weather_tool();
    let (id, msg) = message_ok(
        &sluice,
        &json!({
            "model": format!("m-{PLAIN}"),
            "max_tokens": 512,
            "tools": [tool],
            "messages": [{"role": "user", "content": "What's the weather in Paris?"}]
        }),
    )
    .await;
    assert_eq!(msg["stop_reason"], "tool_use", "{msg:#}");
    let blocks = msg["content"].as_array().expect("content blocks");
    let uses: Vec<&Value> = blocks.iter().filter(|b| b["type"] == "tool_use").collect();
    assert_eq!(uses.len(), 1, "one tool_use block: {msg:#}");
    assert_eq!(uses[0]["name"], name.as_str(), "{msg:#}");
    assert_eq!(uses[0]["input"], args, "parsed tool input: {msg:#}");
    assert!(
        uses[0]["id"].as_str().is_some_and(|s| !s.is_empty()),
        "{msg:#}"
    );

    // Upstream: OpenAI tools whose parameters are the Anthropic input_schema.
    let req = only_request(&upstream);
    let tools = req.body["tools"].as_array().expect("OpenAI tools upstream");
    assert_eq!(tools.len(), 1, "{req:#?}");
    assert_eq!(tools[0]["type"], "function", "{req:#?}");
    assert_eq!(tools[0]["function"]["name"], "get_weather", "{req:#?}");
    assert_eq!(
        tools[0]["function"]["description"], tool["description"],
        "{req:#?}"
    );
    assert_eq!(
        tools[0]["function"]["parameters"], tool["input_schema"],
        "parameters = input_schema: {req:#?}"
    );

    let rec = sluice.record(&id).await;
    assert_eq!(rec["endpoint"], "messages", "{rec:#}");
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["finish_reason"], "tool_calls", "{rec:#}");
}

#[tokio::test]
async fn streamed_tool_use_sends_input_json_deltas() {
    let (_upstream, sluice) = setup().await;
    let (name, args) = fixture_tool_call();
    let (_, events) = message_stream(
        &sluice,
        &json!({
            "model": format!("m-{PLAIN}"),
            "max_tokens": 512,
            "stream": true,
            "tools": [weather_tool()],
            "messages": [{"role": "user", "content": "What's the weather in Paris?"}]
        }),
    )
    .await;
    let names = collapsed_names(&events);
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    let start = events
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .map(|(_, d)| d)
        .unwrap_or_else(|| panic!("a tool_use block starts: {events:#?}"));
    assert_eq!(start["content_block"]["name"], name.as_str(), "{start:#}");
    let index = start["index"].clone();
    let json: String = events
        .iter()
        .filter(|(n, d)| n == "content_block_delta" && d["index"] == index)
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta", "{d:#}");
            d["delta"]["partial_json"].as_str().unwrap().to_string()
        })
        .collect();
    let input: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("folded input {json:?} is not JSON: {e}"));
    assert_eq!(input, args);
    assert!(
        events
            .iter()
            .any(|(n, d)| n == "content_block_stop" && d["index"] == index),
        "the tool block is closed: {events:#?}"
    );
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use", "{delta:#}");
}

#[tokio::test]
async fn system_prompt_becomes_the_first_openai_message() {
    let (upstream, sluice) = setup().await;
    message_ok(
        &sluice,
        &json!({
            "model": "m-echo",
            "max_tokens": 64,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "hi there"}]
        }),
    )
    .await;
    let req = only_request(&upstream);
    let messages = req.body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 2, "{req:#?}");
    assert_eq!(messages[0]["role"], "system", "{req:#?}");
    assert_eq!(messages[0]["content"], "You are terse.", "{req:#?}");
    assert_eq!(messages[1]["role"], "user", "{req:#?}");
    assert_eq!(messages[1]["content"], "hi there", "{req:#?}");
    assert!(
        req.body.get("system").is_none(),
        "no Anthropic fields upstream: {req:#?}"
    );
}

/// The mock provider names the stop sequence it cut an answer at, as vLLM does: an Anthropic
/// client gets `stop_reason: "stop_sequence"` and the sequence, whole or streamed.
#[tokio::test]
async fn a_stop_sequence_is_reported_as_one() {
    let sluice = Sluice::start(crate::openai_api::MOCK).await;
    let body = json!({
        "model": "mock-echo", "max_tokens": 50, "stop_sequences": ["two"],
        "messages": [{"role": "user", "content": "one two three"}]
    });
    let (_, msg) = message_ok(&sluice, &body).await;
    assert_eq!(msg["content"][0]["text"], "one ", "{msg:#}");
    assert_eq!(msg["stop_reason"], "stop_sequence", "{msg:#}");
    assert_eq!(msg["stop_sequence"], "two", "{msg:#}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, events) = message_stream(&sluice, &streamed).await;
    let delta = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .map(|(_, d)| d.clone())
        .expect("message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence", "{delta:#}");
    assert_eq!(delta["delta"]["stop_sequence"], "two", "{delta:#}");
    // Without a match, the turn ends as usual.
    let plain = json!({
        "model": "mock-echo", "max_tokens": 50, "stop_sequences": ["four"],
        "messages": [{"role": "user", "content": "one two three"}]
    });
    let (_, msg) = message_ok(&sluice, &plain).await;
    assert_eq!(msg["stop_reason"], "end_turn", "{msg:#}");
    assert!(msg["stop_sequence"].is_null(), "{msg:#}");
}

#[tokio::test]
async fn unknown_model_is_not_found_error() {
    let (upstream, sluice) = setup().await;
    let resp = send(
        &sluice,
        &json!({
            "model": "no-such-model",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]
        }),
    )
    .await;
    let (body, rec) = expect_error(&sluice, resp, 404, "not_found_error").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "the message names the model: {body:#}"
    );
    assert_eq!(rec["model"], "no-such-model", "{rec:#}");
    assert_eq!(rec["error_code"], "model_not_found", "{rec:#}");
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn missing_max_tokens_is_invalid_request_error() {
    let (upstream, sluice) = setup().await;
    let resp = send(
        &sluice,
        &json!({"model": "m-echo", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let (body, rec) = expect_error(&sluice, resp, 400, "invalid_request_error").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "the message names max_tokens: {body:#}"
    );
    assert_eq!(rec["model"], "m-echo", "{rec:#}");
    assert_eq!(upstream.request_count(), 0);
}

/// `max_tokens: 0` is refused, as Anthropic does (it answered an empty `end_turn`).
#[tokio::test]
async fn zero_max_tokens_is_invalid_request_error() {
    let (upstream, sluice) = setup().await;
    let resp = send(
        &sluice,
        &json!({"model": "m-echo", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let (body, _) = expect_error(&sluice, resp, 400, "invalid_request_error").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{body:#}"
    );
    assert_eq!(upstream.request_count(), 0);
}

/// An overloaded upstream is Anthropic's 529 `overloaded_error` for the client, and the record
/// says 529 too (it said 503).
#[tokio::test]
async fn an_overloaded_upstream_is_529_for_the_client_and_on_the_record() {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config(
        "openai",
        &upstream.base_url(),
        &[sluice_testkit::models::FAULT_503],
    ))
    .await;
    let resp = send(
        &sluice,
        &json!({"model": format!("m-{}", sluice_testkit::models::FAULT_503), "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    expect_error(&sluice, resp, 529, "overloaded_error").await;
}

#[tokio::test]
async fn malformed_json_is_invalid_request_error() {
    let (upstream, sluice) = setup().await;
    let resp = messages_request(&sluice)
        .header("content-type", "application/json")
        .body(r#"{"model": "m-echo", "max_tokens": 64, "messages": [}"#)
        .send()
        .await
        .expect("POST /v1/messages");
    let (_, rec) = expect_error(&sluice, resp, 400, "invalid_request_error").await;
    assert_eq!(rec["error_code"], "invalid_json", "{rec:#}");
    assert_eq!(upstream.request_count(), 0);
}

/// `POST /v1/messages/count_tokens` with the headers an Anthropic SDK sends: status and body.
async fn count_tokens(sluice: &Sluice, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(sluice.url("/v1/messages/count_tokens"))
        .header("x-api-key", "sk-ant-anything")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap())
}

/// A stream's `message_start` counts the prompt with the tokenizer of the model's first
/// deployment, as `count_tokens` does (it used the name the client gave, whose tokenizer may
/// differ: `m-gpt-4` is served by `gpt-4`, counted with cl100k_base).
#[tokio::test]
async fn message_start_counts_the_prompt_as_count_tokens_does() {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config("openai", &upstream.base_url(), &["gpt-4"])).await;
    let text = "Ünïcödé façades, naïve café déjà vu: 東京タワー, Ελληνικά, русский текст; 12345.67";
    let mut body = json!({"model": "m-gpt-4", "max_tokens": 16,
                          "messages": [{"role": "user", "content": text}]});
    let (_, counted) = count_tokens(&sluice, body.clone()).await;
    body["stream"] = json!(true);
    let (_, events) = message_stream(&sluice, &body).await;
    let (name, start) = &events[0];
    assert_eq!(name, "message_start");
    assert_eq!(
        start["message"]["usage"]["input_tokens"], counted["input_tokens"],
        "{start:#} against {counted:#}"
    );
}

/// `POST /v1/messages/count_tokens`, as the Anthropic SDK's `messages.count_tokens()` calls it:
/// the prompt's tokens, with nothing sent to an OpenAI-type upstream (which has no counting API)
/// or logged; errors in the Anthropic shape.
#[tokio::test]
async fn count_tokens_counts_without_calling_the_upstream() {
    let (upstream, sluice) = setup().await;
    let count = |body: Value| count_tokens(&sluice, body);
    let short =
        json!({"model": format!("m-{PLAIN}"), "messages": [{"role": "user", "content": "Hello"}]});
    let (status, body) = count(short.clone()).await;
    assert_eq!(status, 200, "{body}");
    let n = body["input_tokens"].as_u64().expect("input_tokens");
    assert!(n > 0, "{body}");
    // A system prompt and a longer message count more.
    let long = json!({"model": format!("m-{PLAIN}"), "system": "You are terse.",
                      "messages": [{"role": "user", "content": "Hello there, how are you doing today?"}]});
    let (_, body) = count(long).await;
    assert!(body["input_tokens"].as_u64().unwrap() > n, "{body}");
    assert_eq!(upstream.request_count(), 0, "nothing reached the upstream");
    assert_eq!(sluice.list("").await["data"].as_array().unwrap().len(), 0);

    let (status, body) =
        count(json!({"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        (body["type"].as_str(), body["error"]["type"].as_str()),
        (Some("error"), Some("not_found_error")),
        "{body}"
    );
    let (status, body) = count(json!({"model": format!("m-{PLAIN}")})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    // Any other path under the Anthropic routes is an Anthropic-shaped 404.
    let resp = reqwest::Client::new()
        .post(sluice.url("/v1/messages/batches"))
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
}

/// With an Anthropic upstream, `count_tokens` is the upstream's own count (it counts tools,
/// images and its framing, which a local tokenizer cannot): sent with the fields that endpoint
/// takes (no `max_tokens`, sampling or `metadata`, which it refuses) and the client's beta flags.
/// An upstream that cannot count leaves the count to Sluice's tokenizer.
#[tokio::test]
async fn count_tokens_asks_an_anthropic_upstream() {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config(
        "anthropic",
        &upstream.base_url(),
        &["claude-sonnet-4-5"],
    ))
    .await;
    let body = json!({
        "model": "m-claude-sonnet-4-5", "system": "Be terse.", "temperature": 0.5,
        "metadata": {"user_id": "u1"},
        "tools": [{"name": "read", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                     {"role": "user", "content": "Count me"}]
    });
    let resp = reqwest::Client::new()
        .post(sluice.url("/v1/messages/count_tokens"))
        .header("x-api-key", "sk-ant-anything")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "token-counting-2024-11-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let counted: Value = resp.json().await.unwrap();
    assert_eq!(
        counted["input_tokens"], 1003,
        "the upstream's count: {counted}"
    );
    let reqs = upstream.requests();
    assert_eq!(reqs.len(), 1);
    let sent = &reqs[0];
    assert_eq!(sent.path, "/v1/messages/count_tokens");
    assert_eq!(sent.body["model"], "claude-sonnet-4-5");
    assert!(sent.body.get("max_tokens").is_none(), "{}", sent.body);
    assert_eq!(sent.body["tools"][0]["name"], "read");
    assert!(
        sent.headers
            .iter()
            .any(|(k, v)| k == "anthropic-beta" && v.contains("token-counting-2024-11-01")),
        "{:?}",
        sent.headers
    );
    // A request the upstream refuses is refused, in the Anthropic shape (a count would say it
    // fits).
    let (status, refused) = count_tokens(
        &sluice,
        json!({"model": "m-claude-sonnet-4-5", "messages": [{"role": "user", "content": "[mock:refuse]"}]}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        refused["error"]["type"], "invalid_request_error",
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("prompt is too long")),
        "{refused}"
    );
    // An upstream that fails: counted here instead.
    drop(upstream);
    let (status, local) = count_tokens(&sluice, body).await;
    assert_eq!(status, 200, "{local}");
    let n = local["input_tokens"].as_u64().unwrap();
    assert!(n > 0 && n != 1003, "{local}");
}

/// A Claude Code–like request: caching breakpoints on the system prompt, a tool, a text block
/// and a tool result, extended thinking, context management, and beta flags in `anthropic-beta`.
fn agent_turn(model: &str) -> Value {
    let cc = json!({"type": "ephemeral"});
    json!({
        "model": model,
        "max_tokens": 2048,
        "system": [
            {"type": "text", "text": "You are a coding agent."},
            {"type": "text", "text": "Project notes.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
        ],
        "tools": [
            {"name": "read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
            {"name": "grep", "input_schema": {"type": "object"}, "cache_control": cc}
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Open main.rs", "cache_control": cc}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Reading it."},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "main.rs"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "fn main() {}", "cache_control": cc},
                {"type": "text", "text": "Explain it."}
            ]}
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}
    })
}

const BETAS: &str = "context-management-2025-06-27, interleaved-thinking-2025-05-14";

/// To an Anthropic upstream, prompt caching, thinking, context management and beta flags arrive
/// as the client sent them (before, every breakpoint and top-level field was dropped, so nothing
/// was ever cached and thinking never switched on).
#[tokio::test]
async fn breakpoints_thinking_and_betas_reach_an_anthropic_upstream() {
    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&provider_config(
        "anthropic",
        &upstream.base_url(),
        &[PLAIN],
    ))
    .await;
    let body = agent_turn(&format!("m-{PLAIN}"));
    let resp = messages_request(&sluice)
        .header("anthropic-beta", BETAS)
        .json(&body)
        .send()
        .await
        .expect("POST /v1/messages");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    let req = only_request(&upstream);
    assert_eq!(req.path, "/v1/messages", "{req:#?}");
    for field in [
        "max_tokens",
        "system",
        "tools",
        "messages",
        "thinking",
        "context_management",
    ] {
        assert_eq!(
            req.body[field], body[field],
            "`{field}` as the client sent it: {:#}",
            req.body
        );
    }
    for absent in ["anthropic", "betas"] {
        assert!(req.body.get(absent).is_none(), "{:#}", req.body);
    }
    let beta: Vec<&str> = req
        .headers
        .iter()
        .filter(|(k, _)| k == "anthropic-beta")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        beta,
        ["context-management-2025-06-27,interleaved-thinking-2025-05-14"]
    );
}

/// To an OpenAI-compatible upstream the Messages request's own top-level fields never go, nor
/// (unless the provider forwards them) its breakpoints: the system prompt is one string again.
/// With `forward_cache_control` the breakpoints ride on the parts, tools and tool message that
/// stand for the blocks (the shape gateways such as OpenRouter read).
#[tokio::test]
async fn an_openai_compatible_upstream_gets_breakpoints_only_when_it_forwards_them() {
    let (upstream, sluice) = setup().await;
    let resp = messages_request(&sluice)
        .header("anthropic-beta", BETAS)
        .json(&agent_turn("m-echo"))
        .send()
        .await
        .expect("POST /v1/messages");
    assert_eq!(resp.status(), 200);
    let req = only_request(&upstream);
    let body = &req.body;
    for absent in ["anthropic", "thinking", "context_management", "betas"] {
        assert!(body.get(absent).is_none(), "{body:#}");
    }
    assert!(!body.to_string().contains("cache_control"), "{body:#}");
    assert_eq!(
        body["messages"][0]["content"],
        "You are a coding agent.\nProject notes."
    );
    assert_eq!(body["messages"][1]["content"], "Open main.rs");
    assert!(
        req.headers.iter().all(|(k, _)| k != "anthropic-beta"),
        "{req:#?}"
    );

    let upstream = MockUpstream::start().await;
    let sluice = Sluice::start(&format!(
        "[providers.up]\ntype = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"k\"\nforward_cache_control = true\n\
         [models.\"m-echo\"]\ndeployments = [{{ provider = \"up\", model = \"echo\" }}]\n",
        upstream.base_url()
    ))
    .await;
    let resp = send(&sluice, &agent_turn("m-echo")).await;
    assert_eq!(resp.status(), 200);
    let req = only_request(&upstream);
    let body = &req.body;
    assert!(body.get("anthropic").is_none(), "{body:#}");
    let cc = json!({"type": "ephemeral"});
    let messages = &body["messages"];
    assert_eq!(messages[0]["role"], "system", "{body:#}");
    assert_eq!(
        messages[0]["content"][1]["cache_control"]["ttl"], "1h",
        "{body:#}"
    );
    assert_eq!(messages[1]["content"][0]["cache_control"], cc, "{body:#}");
    assert_eq!(messages[3]["role"], "tool", "{body:#}");
    assert_eq!(messages[3]["cache_control"], cc, "{body:#}");
    assert_eq!(body["tools"][1]["cache_control"], cc, "{body:#}");
}
