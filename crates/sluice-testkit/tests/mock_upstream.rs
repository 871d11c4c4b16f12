//! Exercises `MockUpstream` over real HTTP with reqwest.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_testkit::{MockUpstream, fixtures, models};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Parsed SSE events: (event name, data).
fn sse(text: &str) -> Vec<(Option<String>, String)> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            (event, data)
        })
        .collect()
}

fn sse_json(text: &str) -> Vec<Value> {
    sse(text)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

async fn openai(up: &MockUpstream, body: Value) -> reqwest::Response {
    client()
        .post(up.url("/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .expect("send")
}

async fn azure(up: &MockUpstream, deployment: &str, body: Value) -> reqwest::Response {
    client()
        .post(up.url(&format!(
            "/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        )))
        .header("api-key", "azure-key")
        .json(&body)
        .send()
        .await
        .expect("send")
}

async fn anthropic(up: &MockUpstream, body: Value) -> reqwest::Response {
    client()
        .post(up.url("/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("send")
}

async fn gemini(up: &MockUpstream, model: &str, stream: bool, body: Value) -> reqwest::Response {
    let path = if stream {
        format!("/v1beta/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1beta/models/{model}:generateContent")
    };
    client()
        .post(up.url(&path))
        .header("x-goog-api-key", "goog-key")
        .json(&body)
        .send()
        .await
        .expect("send")
}

fn oa_body(model: &str, text: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text}
        ]
    })
}

fn an_body(model: &str, text: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "stream": stream,
        "system": "be brief",
        "messages": [{"role": "user", "content": text}]
    })
}

fn gm_body(text: &str) -> Value {
    json!({
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [{"role": "user", "parts": [{"text": text}]}]
    })
}

fn weather_tool_oa() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
}

async fn text_of(resp: reqwest::Response) -> String {
    resp.text().await.expect("body")
}

/// Reads a body until it ends or errors; returns (bytes read, whether it errored).
async fn read_until_error(mut resp: reqwest::Response) -> (String, bool) {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) => return (String::from_utf8_lossy(&buf).into_owned(), false),
            Err(_) => return (String::from_utf8_lossy(&buf).into_owned(), true),
        }
    }
}

#[test]
fn fixtures_are_well_formed() {
    for (name, text) in fixtures::ALL {
        if name.ends_with(".json") {
            serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            let events = sse(text);
            assert!(events.len() >= 3, "{name}");
            for (_, data) in events {
                if data != "[DONE]" {
                    serde_json::from_str::<Value>(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
        }
    }
    assert!(fixtures::OPENAI_CHAT_STREAM.ends_with("data: [DONE]\n\n"));
    assert!(fixtures::GEMINI_STREAM.contains("\r\n\r\n"));
    let chat: Value = serde_json::from_str(fixtures::OPENAI_CHAT).unwrap();
    assert_eq!(chat["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert!(chat["choices"][0]["logprobs"].is_null());
    let emb: Value = serde_json::from_str(fixtures::OPENAI_EMBEDDINGS).unwrap();
    assert_eq!(emb["data"][1]["embedding"].as_array().unwrap().len(), 8);
    let anthropic = sse(fixtures::ANTHROPIC_MESSAGES_STREAM);
    let names: Vec<_> = anthropic.iter().map(|(e, _)| e.clone().unwrap()).collect();
    assert_eq!(names.first().unwrap(), "message_start");
    assert_eq!(names.last().unwrap(), "message_stop");
    assert!(names.contains(&"ping".to_owned()));
}

#[tokio::test]
async fn openai_plain_and_stream() {
    let up = MockUpstream::start().await;
    let resp = openai(&up, oa_body("gpt-4o-mini", "hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(text_of(resp).await, fixtures::OPENAI_CHAT);

    // Streaming with include_usage: the fixture verbatim.
    let resp = openai(&up, oa_body("gpt-4o-mini", "hi", true)).await;
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = text_of(resp).await;
    assert_eq!(text, fixtures::OPENAI_CHAT_STREAM);
    let chunks = sse_json(&text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello! How can I help you today?");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Streaming without include_usage: no usage chunk, no usage key.
    let mut body = oa_body("gpt-4o-mini", "hi", true);
    body.as_object_mut().unwrap().remove("stream_options");
    let text = text_of(openai(&up, body).await).await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    let chunks = sse_json(&text);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert!(chunks.iter().all(|c| c["choices"] != json!([])));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn openai_tools_plain_and_stream() {
    let up = MockUpstream::start().await;
    let mut body = oa_body("gpt-4o-mini", "weather in Paris?", false);
    body["tools"] = weather_tool_oa();
    let v: Value = openai(&up, body.clone()).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );

    body["stream"] = json!(true);
    let chunks = sse_json(&text_of(openai(&up, body).await).await);
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    let args: Value = serde_json::from_str(&args).unwrap();
    assert_eq!(args["location"], "Paris, France");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls")
    );
}

#[tokio::test]
async fn openai_embeddings_models_and_auth() {
    let up = MockUpstream::start().await;
    let embed = |input: Value| {
        client()
            .post(up.url("/v1/embeddings"))
            .bearer_auth("sk")
            .json(&json!({"model": "text-embedding-3-small", "input": input}))
            .send()
    };
    let v: Value = embed(json!(["hello world", "one two three"]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let again: Value = embed(json!("hello world"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["data"][0]["embedding"], data[0]["embedding"]);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    let models: Value = client()
        .get(up.url("/v1/models"))
        .bearer_auth("sk")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "echo")
    );

    let resp = client()
        .post(up.url("/v1/chat/completions"))
        .json(&oa_body("gpt-4o-mini", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn azure_routes() {
    let up = MockUpstream::start().await;
    let resp = azure(&up, "my-gpt4o", oa_body("ignored", "hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text_of(resp).await, fixtures::OPENAI_CHAT);
    let text = text_of(azure(&up, "my-gpt4o", oa_body("ignored", "hi", true)).await).await;
    assert_eq!(text, fixtures::OPENAI_CHAT_STREAM);

    // The deployment name selects echo / faults.
    let v: Value = azure(
        &up,
        "echo",
        json!({"messages": [{"role": "user", "content": "ping pong"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "ping pong");

    let emb: Value = client()
        .post(up.url("/openai/deployments/emb/embeddings?api-version=2024-10-21"))
        .header("api-key", "k")
        .json(&json!({"input": ["a", "b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(emb["data"].as_array().unwrap().len(), 3);

    let resp = client()
        .post(up.url("/openai/deployments/my-gpt4o/chat/completions"))
        .header("api-key", "k")
        .json(&oa_body("x", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "404");

    let resp = client()
        .post(up.url("/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"))
        .json(&oa_body("x", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn anthropic_plain_stream_tools_and_validation() {
    let up = MockUpstream::start().await;
    let resp = anthropic(&up, an_body("claude-sonnet-4", "hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text_of(resp).await, fixtures::ANTHROPIC_MESSAGES);

    let text = text_of(anthropic(&up, an_body("claude-sonnet-4", "hi", true)).await).await;
    assert_eq!(text, fixtures::ANTHROPIC_MESSAGES_STREAM);
    let events = sse(&text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    let delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let mut body = an_body("claude-sonnet-4", "weather?", false);
    body["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let v: Value = anthropic(&up, body.clone()).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][1]["type"], "tool_use");
    body["stream"] = json!(true);
    let events = sse_json(&text_of(anthropic(&up, body).await).await);
    let json_args: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .map(|e| e["delta"]["partial_json"].as_str().unwrap())
        .collect();
    let args: Value = serde_json::from_str(&json_args).unwrap();
    assert_eq!(args["unit"], "celsius");

    // Validation errors in Anthropic's shape.
    let resp = client()
        .post(up.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&an_body("claude", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "authentication_error");
    let resp = client()
        .post(up.url("/v1/messages"))
        .header("x-api-key", "k")
        .json(&an_body("claude", "hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let mut no_max = an_body("claude", "hi", false);
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let resp = anthropic(&up, no_max).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn gemini_plain_stream_tools_and_auth() {
    let up = MockUpstream::start().await;
    let resp = gemini(&up, "gemini-2.0-flash", false, gm_body("hi")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text_of(resp).await, fixtures::GEMINI_GENERATE);

    let text = text_of(gemini(&up, "gemini-2.0-flash", true, gm_body("hi")).await).await;
    assert_eq!(text, fixtures::GEMINI_STREAM);
    let events = sse_json(&text);
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["candidates"][0]["finishReason"], "STOP");
    assert!(
        events[2]["usageMetadata"]["totalTokenCount"]
            .as_u64()
            .unwrap()
            > 0
    );

    let mut body = gm_body("weather?");
    body["tools"] = json!([{"functionDeclarations": [{"name": "get_weather"}]}]);
    let v: Value = gemini(&up, "gemini-2.0-flash", false, body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["functionCall"]["name"],
        "get_weather"
    );

    // Key in the query works; no key is 403.
    let resp = client()
        .post(up.url("/v1beta/models/gemini-2.0-flash:generateContent?key=abc"))
        .json(&gm_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .post(up.url("/v1beta/models/gemini-2.0-flash:generateContent"))
        .json(&gm_body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(err["error"]["code"], 403);
}

#[tokio::test]
async fn echo_echoes_in_every_shape() {
    let up = MockUpstream::start().await;
    let said = "the quick  brown fox";

    let v: Value = openai(&up, oa_body("echo", said, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], said);
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["model"], "echo");

    let chunks = sse_json(&text_of(openai(&up, oa_body("echo", said, true)).await).await);
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(pieces, ["the ", "quick  ", "brown ", "fox"]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);

    let v: Value = anthropic(&up, an_body("echo", said, false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["content"][0]["text"], said);
    assert_eq!(v["usage"]["input_tokens"], 6);
    assert_eq!(v["usage"]["output_tokens"], 4);
    let events = sse_json(&text_of(anthropic(&up, an_body("echo", said, true)).await).await);
    let text: Vec<&str> = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, ["the ", "quick  ", "brown ", "fox"]);
    assert_eq!(events.last().unwrap()["type"], "message_stop");

    let v: Value = gemini(&up, "echo", false, gm_body(said))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], said);
    assert_eq!(v["usageMetadata"]["promptTokenCount"], 6);
    let events = sse_json(&text_of(gemini(&up, "echo", true, gm_body(said)).await).await);
    assert_eq!(events.len(), 4);
    assert_eq!(events[3]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(events[3]["usageMetadata"]["candidatesTokenCount"], 4);
}

#[tokio::test]
async fn fault_429_has_retry_after_everywhere() {
    let up = MockUpstream::start().await;
    let responses = vec![
        openai(&up, oa_body(models::FAULT_429, "hi", false)).await,
        azure(&up, models::FAULT_429, oa_body("x", "hi", true)).await,
        anthropic(&up, an_body(models::FAULT_429, "hi", false)).await,
        gemini(&up, models::FAULT_429, true, gm_body("hi")).await,
    ];
    for resp in responses {
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"].is_object());
    }
}

#[tokio::test]
async fn error_faults_use_provider_shapes() {
    let up = MockUpstream::start().await;
    for (model, status) in [
        (models::FAULT_500, 500),
        (models::FAULT_503, 503),
        (models::FAULT_401, 401),
        (models::FAULT_400_CONTEXT, 400),
        (models::FAULT_CONTENT_POLICY, 400),
    ] {
        let resp = openai(&up, oa_body(model, "hi", false)).await;
        assert_eq!(resp.status(), status, "{model}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"]["message"].is_string());
        let resp = anthropic(&up, an_body(model, "hi", false)).await;
        assert_eq!(resp.status(), status, "{model}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "error");
        let resp = gemini(&up, model, false, gm_body("hi")).await;
        assert_eq!(resp.status(), status, "{model}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], status);
    }
    let err: Value = openai(&up, oa_body(models::FAULT_400_CONTEXT, "hi", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(err["error"]["code"], "context_length_exceeded");
    let err: Value = anthropic(&up, an_body(models::FAULT_400_CONTEXT, "hi", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        err["error"]["message"],
        "prompt is too long: 250000 tokens > 200000 maximum"
    );
    let err: Value = openai(&up, oa_body(models::FAULT_CONTENT_POLICY, "hi", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        err,
        json!({"error": {
            "message": "Your request was rejected as a result of our safety system.",
            "type": "invalid_request_error",
            "param": null,
            "code": "content_policy_violation"
        }})
    );
}

#[tokio::test]
async fn set_fault_switches_a_model_at_runtime_and_count_for_counts_it() {
    let up = MockUpstream::start().await;
    let resp = openai(&up, oa_body("flaky", "hi", false)).await;
    assert_eq!(resp.status(), 200);
    up.set_fault("flaky", Some(models::FAULT_500));
    assert_eq!(
        openai(&up, oa_body("flaky", "hi", false)).await.status(),
        500
    );
    assert_eq!(
        anthropic(&up, an_body("flaky", "hi", false)).await.status(),
        500
    );
    assert_eq!(
        openai(&up, oa_body("other", "hi", false)).await.status(),
        200
    );
    up.set_fault("flaky", Some(models::FAULT_429));
    let resp = openai(&up, oa_body("flaky", "hi", true)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    up.set_fault("flaky", None);
    let v: Value = openai(&up, oa_body("flaky", "hi", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    // Five bodies named `flaky` (four OpenAI, one Anthropic), one `other`.
    assert_eq!(up.count_for("flaky"), 5);
    assert_eq!(up.count_for("other"), 1);
    assert_eq!(up.count_for("nobody"), 0);
}

#[tokio::test]
async fn fault_cut_ends_with_a_body_error() {
    let up = MockUpstream::start().await;
    let (text, errored) =
        read_until_error(openai(&up, oa_body(models::FAULT_CUT, "hi", true)).await).await;
    assert!(
        errored,
        "openai stream should end with an error, got {text:?}"
    );
    assert_eq!(sse(&text).len(), 2);
    assert!(!text.contains("[DONE]"));

    let (text, errored) =
        read_until_error(anthropic(&up, an_body(models::FAULT_CUT, "hi", true)).await).await;
    assert!(errored);
    assert_eq!(sse(&text).len(), 2);
    assert!(!text.contains("message_stop"));

    let (text, errored) =
        read_until_error(gemini(&up, models::FAULT_CUT, true, gm_body("hi")).await).await;
    assert!(errored);
    assert_eq!(sse(&text).len(), 2);

    let (text, errored) =
        read_until_error(openai(&up, oa_body(models::FAULT_CUT, "hi", false)).await).await;
    assert!(errored);
    assert!(serde_json::from_str::<Value>(&text).is_err());
    // A cut is not a client cancellation.
    assert_eq!(up.cancelled_streams(), 0);
}

#[tokio::test]
async fn garbage_bad_sse_no_usage_slow_and_hang() {
    let up = MockUpstream::start().await;
    let resp = openai(&up, oa_body(models::FAULT_GARBAGE, "hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(text_of(resp).await, "this is not json{");

    let resp = anthropic(&up, an_body(models::FAULT_BAD_SSE, "hi", true)).await;
    assert_eq!(resp.status(), 200);
    let text = text_of(resp).await;
    let first_data = text.lines().find(|l| l.starts_with("data:")).unwrap();
    assert_eq!(first_data, "data: {not json");
    let text = text_of(openai(&up, oa_body(models::FAULT_BAD_SSE, "hi", true)).await).await;
    assert!(text.starts_with("data: {not json"));

    let v: Value = openai(&up, oa_body(models::FAULT_NO_USAGE, "hi", false))
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usage").is_none());
    assert!(v["choices"][0]["message"]["content"].is_string());
    let chunks =
        sse_json(&text_of(openai(&up, oa_body(models::FAULT_NO_USAGE, "hi", true)).await).await);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let events =
        sse_json(&text_of(anthropic(&up, an_body(models::FAULT_NO_USAGE, "hi", true)).await).await);
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert!(events[0]["message"].get("usage").is_none());
    let events =
        sse_json(&text_of(gemini(&up, models::FAULT_NO_USAGE, true, gm_body("hi")).await).await);
    assert!(events.iter().all(|e| e.get("usageMetadata").is_none()));
    let v: Value = gemini(&up, models::FAULT_NO_USAGE, false, gm_body("hi"))
        .await
        .json()
        .await
        .unwrap();
    assert!(v.get("usageMetadata").is_none());

    let started = Instant::now();
    let resp = anthropic(&up, an_body(models::FAULT_SLOW, "hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let hang = reqwest::Client::new()
        .post(up.url("/v1/chat/completions"))
        .bearer_auth("sk")
        .timeout(Duration::from_millis(500))
        .json(&oa_body(models::FAULT_HANG, "hi", false))
        .send()
        .await;
    assert!(hang.unwrap_err().is_timeout());
}

#[tokio::test]
async fn requests_are_captured() {
    let up = MockUpstream::start().await;
    openai(&up, oa_body("gpt-4o-mini", "capture me", false)).await;
    gemini(&up, "gemini-2.0-flash", true, gm_body("hi")).await;
    assert_eq!(up.request_count(), 2);
    let reqs = up.requests();
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(reqs[0].query, None);
    assert_eq!(reqs[0].body["messages"][1]["content"], "capture me");
    assert_eq!(reqs[0].header("Authorization"), Some("Bearer sk-test"));
    assert!(reqs[0].headers.iter().all(|(k, _)| *k == k.to_lowercase()));
    assert_eq!(
        reqs[1].path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    );
    assert_eq!(reqs[1].query.as_deref(), Some("alt=sse"));
    assert_eq!(reqs[1].query_param("alt"), Some("sse"));
    assert_eq!(
        up.last_request().unwrap().header("x-goog-api-key"),
        Some("goog-key")
    );

    // Unknown routes and failed auth are captured too.
    client().get(up.url("/nope?x=1")).send().await.unwrap();
    assert_eq!(up.last_request().unwrap().path, "/nope");
    assert_eq!(up.last_request().unwrap().body, Value::Null);
    up.clear();
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn dropped_slow_stream_is_counted_as_cancelled() {
    let up = MockUpstream::start().await;
    // A fully read stream is not cancelled.
    text_of(openai(&up, oa_body("echo", "a b c", true)).await).await;
    assert_eq!(up.cancelled_streams(), 0);

    let mut resp = openai(&up, oa_body(models::SLOW_STREAM, "hi", true)).await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.cancelled_streams() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.cancelled_streams(), 1);
}

#[tokio::test]
async fn slow_stream_sends_forty_tokens() {
    let up = MockUpstream::start().await;
    let started = Instant::now();
    let events =
        sse_json(&text_of(anthropic(&up, an_body(models::SLOW_STREAM, "hi", true)).await).await);
    assert!(started.elapsed() >= Duration::from_millis(39 * 50));
    let text: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert!(text.starts_with("tok0 tok1 "));
    assert!(text.ends_with("tok39 "));
    assert_eq!(up.cancelled_streams(), 0);
}
