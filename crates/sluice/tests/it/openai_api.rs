//! The OpenAI-compatible API driven by the official-shaped Rust client (async-openai).

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::CreateChatCompletionRequest;
use async_openai::types::embeddings::CreateEmbeddingRequest;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Opts, Sluice, request_id};

pub const MOCK: &str = r#"
[providers.mock]
type = "mock"

[models."mock-echo"]
deployments = [{ provider = "mock", model = "mock-echo" }]

[models."priced"]
deployments = [{ provider = "mock", model = "gpt-4o-mini" }]

[models."unmetered"]
deployments = [{ provider = "quiet", model = "gpt-4o" }]

[providers.quiet]
type = "mock"
report_usage = false
"#;

fn client(s: &Sluice) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(s.url("/v1"))
            .with_api_key("unused-on-loopback"),
    )
}

fn chat(v: serde_json::Value) -> CreateChatCompletionRequest {
    serde_json::from_value(v).expect("a valid request")
}

#[tokio::test]
async fn plain_completion_through_the_sdk() {
    let s = Sluice::start(MOCK).await;
    let resp = client(&s)
        .chat()
        .create(chat(json!({
            "model": "priced",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping pong"}]
        })))
        .await
        .expect("completion");
    assert_eq!(
        resp.choices[0].message.content.as_deref(),
        Some("ping pong")
    );
    let usage = resp.usage.expect("usage");
    assert_eq!(usage.prompt_tokens, 4);
    assert_eq!(usage.completion_tokens, 2);
}

#[tokio::test]
async fn streaming_completion_through_the_sdk() {
    let s = Sluice::start(MOCK).await;
    let mut stream = client(&s)
        .chat()
        .create_stream(chat(json!({
            "model": "mock-echo",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "one two three four"}]
        })))
        .await
        .expect("stream");
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                text.push_str(t);
            }
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(text, "one two three four");
    assert!(finish.is_some());
    assert_eq!(usage.expect("usage chunk").completion_tokens, 4);
}

#[tokio::test]
async fn models_and_embeddings_through_the_sdk() {
    let s = Sluice::start(MOCK).await;
    let c = client(&s);
    let models = c.models().list().await.expect("models");
    let ids: Vec<_> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["mock-echo", "priced", "unmetered"]);
    // A Unix time (it was 0: 1970 to every client that shows it).
    assert!(models.data.iter().all(|m| m.created > 1_700_000_000));
    let req: CreateEmbeddingRequest = serde_json::from_value(json!({
        "model": "mock-echo", "input": ["alpha beta", "gamma"], "dimensions": 12
    }))
    .unwrap();
    let emb = c.embeddings().create(req).await.expect("embeddings");
    assert_eq!(emb.data.len(), 2);
    assert_eq!(emb.data[0].embedding.len(), 12);
    assert_ne!(emb.data[0].embedding, emb.data[1].embedding);
    assert_eq!(emb.usage.prompt_tokens, 3);

    // A bad value is a 400 naming its parameter, whichever provider serves the model (it was a
    // 422 without one from the mock and local providers).
    for (field, value) in [("encoding_format", json!("int8")), ("dimensions", json!(0))] {
        let mut body = json!({"model": "mock-echo", "input": "a"});
        body[field] = value;
        let r = reqwest::Client::new()
            .post(s.url("/v1/embeddings"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{field}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["param"], field, "{body:#}");
    }

    // OpenAI's limit of inputs per request holds here too (a local model would otherwise embed
    // millions of them in one call).
    let r = reqwest::Client::new()
        .post(s.url("/v1/embeddings"))
        .json(&json!({"model": "mock-echo", "input": vec!["a"; 2049]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "input", "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2048")),
        "{body:#}"
    );
}

/// The SDK's Azure client (`api-key` header, the deployment in the path, `api-version` in the
/// query) works against Sluice: the deployment names the model, whatever the body says.
#[tokio::test]
async fn azure_clients_reach_models_by_deployment() {
    use async_openai::config::AzureConfig;
    let s = Sluice::start(MOCK).await;
    let azure = |deployment: &str| {
        Client::with_config(
            AzureConfig::new()
                .with_api_base(s.url(""))
                .with_api_version("2024-10-21")
                .with_deployment_id(deployment)
                .with_api_key("unused-on-loopback"),
        )
    };
    let resp = azure("priced")
        .chat()
        .create(chat(json!({
            "model": "mock-echo",
            "messages": [{"role": "user", "content": "ping pong"}]
        })))
        .await
        .expect("completion");
    assert_eq!(
        resp.choices[0].message.content.as_deref(),
        Some("ping pong")
    );
    let mut stream = azure("mock-echo")
        .chat()
        .create_stream(chat(json!({
            "model": "mock-echo", "stream": true,
            "messages": [{"role": "user", "content": "one two"}]
        })))
        .await
        .expect("stream");
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        if let Some(c) = chunk
            .choices
            .first()
            .and_then(|c| c.delta.content.as_deref())
        {
            text.push_str(c);
        }
    }
    assert_eq!(text, "one two");
    let req: CreateEmbeddingRequest = serde_json::from_value(json!({
        "model": "ignored", "input": ["alpha beta"], "dimensions": 8
    }))
    .unwrap();
    let emb = azure("mock-echo")
        .embeddings()
        .create(req)
        .await
        .expect("embeddings");
    assert_eq!(emb.data[0].embedding.len(), 8);

    // The path's model is the one served and recorded; an unknown deployment is a 404.
    let http = reqwest::Client::new();
    let r = http
        .post(s.url("/openai/deployments/priced/chat/completions?api-version=2024-10-21"))
        .header("api-key", "k")
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = s.record(&request_id(&r)).await;
    assert_eq!(rec["model"], "priced", "{rec:#}");
    assert_eq!(rec["request_body"]["model"], "priced", "as served: {rec:#}");
    // A body that cannot be read is recorded under the path's model.
    let r = http
        .post(s.url("/openai/deployments/priced/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.record(&request_id(&r)).await["model"], "priced");
    let r = http
        .post(s.url("/openai/deployments/gpt-9/chat/completions"))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Azure's newer `/openai/v1` API takes the model in the body.
    let r = http
        .post(s.url("/openai/v1/chat/completions"))
        .header("api-key", "k")
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn sdk_sees_openai_shaped_errors() {
    let s = Sluice::start(MOCK).await;
    let err = client(&s)
        .chat()
        .create(chat(
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        ))
        .await
        .expect_err("unknown model");
    match err {
        async_openai::error::OpenAIError::ApiError(e) => {
            assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));
            assert!(
                e.api_error.message.contains("mock-echo"),
                "{}",
                e.api_error.message
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn records_carry_attribution_usage_cost_and_bodies() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .header("x-sluice-session", "sess-1")
        .header("x-sluice-tags", "beta, search")
        .json(&json!({
            "model": "priced",
            "user": "alice",
            "metadata": {"team": "search"},
            "messages": [{"role": "user", "content": "count these five words please"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = request_id(&resp);
    let cost: f64 = resp.headers()["x-sluice-cost-usd"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let rec = s.record(&id).await;
    assert_eq!(rec["id"], id.as_str());
    assert_eq!(rec["model"], "priced");
    assert_eq!(rec["provider"], "mock");
    assert_eq!(rec["deployment"], "gpt-4o-mini");
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["attempts"], 1);
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["session"], "sess-1");
    assert_eq!(rec["tags"], json!(["beta", "search"]));
    assert_eq!(rec["metadata"]["team"], "search");
    assert_eq!(rec["prompt_tokens"], 5);
    assert_eq!(rec["completion_tokens"], 5);
    assert_eq!(rec["usage_source"], "provider");
    // gpt-4o-mini: $0.15 in / $0.60 out per million tokens.
    let want = (5.0 * 0.15 + 5.0 * 0.60) / 1e6;
    assert!(
        (rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{rec}"
    );
    assert!((cost - want).abs() < 1e-8);
    assert_eq!(
        rec["request_body"]["messages"][0]["content"],
        "count these five words please"
    );
    assert_eq!(
        rec["response_body"]["choices"][0]["message"]["content"],
        "count these five words please"
    );
    assert!(rec["latency_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn tokenizer_counts_when_the_upstream_reports_no_usage() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    // The record of a request to the mock's model that reports no usage.
    let record = |body: Value| {
        let (http, s) = (&http, &s);
        async move {
            let resp = http
                .post(s.url("/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let id = request_id(&resp);
            let _ = resp.text().await.unwrap();
            let rec = s.record(&id).await;
            assert_eq!(rec["usage_source"], "tokenizer", "{rec}");
            rec
        }
    };
    let prompt = |rec: Value| rec["prompt_tokens"].as_u64().expect("prompt tokens");
    // An image counts as `count_tokens` counts it (765), and a structured-output schema and the
    // legacy `functions` as their JSON: the prompt the upstream read, not its text alone.
    let image = json!([
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    ]);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let functions = json!([{"name": "lookup_the_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    for stream in [false, true] {
        let rec = record(json!({
            "model": "unmetered", "stream": stream,
            "messages": [{"role": "user", "content": "hello world"}]
        }))
        .await;
        // o200k_base: 3 priming + 3 framing + "user" (1) + "hello world" (2).
        assert_eq!(rec["prompt_tokens"], 9, "{rec}");
        assert_eq!(rec["completion_tokens"], 2, "{rec}");
        assert!(rec["cost_usd"].as_f64().unwrap() > 0.0);
        let with_image = prompt(
            record(json!({
                "model": "unmetered", "stream": stream,
                "messages": [{"role": "user", "content": image}]
            }))
            .await,
        );
        assert_eq!(with_image, 9 + 765);
        let with_schema = prompt(
            record(json!({
                "model": "unmetered", "stream": stream,
                "response_format": schema, "functions": functions,
                "messages": [{"role": "user", "content": image}]
            }))
            .await,
        );
        assert!(
            with_schema >= with_image + 30,
            "{with_schema} vs {with_image}"
        );
    }
}

#[tokio::test]
async fn bodies_none_keeps_no_bodies_and_streams_record_ttft() {
    let s = Sluice::start_opts(Opts {
        config: MOCK,
        store_extra: "bodies = \"none\"",
        ..Opts::default()
    })
    .await;
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({
            "model": "mock-echo", "stream": true,
            "messages": [{"role": "user", "content": "secret words here"}]
        }))
        .send()
        .await
        .unwrap();
    let id = request_id(&resp);
    let body = resp.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        !body.contains("\"usage\""),
        "usage was not asked for: {body}"
    );
    let rec = s.record(&id).await;
    assert!(
        rec["request_body"].is_null() && rec["response_body"].is_null(),
        "{rec}"
    );
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["completion_tokens"], 3);
    let ttft = rec["ttft_ms"].as_f64().expect("ttft recorded");
    assert!(ttft <= rec["latency_ms"].as_f64().unwrap());
}
