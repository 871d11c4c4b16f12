//! The `local` provider end to end: SmolLM2 (GGUF, continuous batching) and MiniLM embeddings
//! running inside the real binary, through the OpenAI-shaped API.

use std::path::PathBuf;

use futures::future::join_all;
use serde_json::{Value, json};

use crate::harness::{Sluice, request_id};

/// The models directory, or `None` (and a notice) when the models are not installed. With
/// `SLUICE_REQUIRE_MODELS=1` (the test script sets it after pulling them) a missing model fails.
fn models() -> Option<PathBuf> {
    let dir = std::env::var("SLUICE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let ok = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        && dir.join("all-MiniLM-L6-v2/model.safetensors").is_file();
    if ok {
        return Some(dir);
    }
    assert_ne!(
        std::env::var("SLUICE_REQUIRE_MODELS").as_deref(),
        Ok("1"),
        "local models are required but missing in {}; run `sluice models pull all`",
        dir.display()
    );
    eprintln!("skipping: local models not installed in {}", dir.display());
    None
}

async fn start(dir: &std::path::Path) -> Sluice {
    let cfg = format!(
        "[providers.chat]\ntype = \"local\"\npath = \"{}\"\nmax_batch = 8\n[providers.embed]\ntype = \"local\"\npath = \"{}\"\n[models.smol]\ndeployments = [{{ provider = \"chat\", model = \"smollm2-135m\" }}]\n[models.minilm]\ndeployments = [{{ provider = \"embed\", model = \"minilm-l6\" }}]\n",
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").display(),
        dir.join("all-MiniLM-L6-v2").display()
    );
    Sluice::start(&cfg).await
}

fn ask(q: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "smol",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": q}
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true}
    })
}

async fn stream_text(http: &reqwest::Client, s: &Sluice, body: &Value) -> (String, Value, String) {
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let text = r.text().await.unwrap();
    let mut out = String::new();
    let mut usage = Value::Null;
    for (_, data) in crate::harness::sse_events(&text) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
    }
    (out, usage, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chat_answers_plain_and_streamed_identically() {
    let Some(dir) = models() else { return };
    let s = start(&dir).await;
    let http = reqwest::Client::new();
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&ask("What is the capital of France?", 24, false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(answer.contains("Paris"), "a coherent answer: {answer}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 24);
    let rec = s.record(&id).await;
    assert_eq!(rec["usage_source"], "provider");
    assert_eq!(rec["provider"], "chat");

    // Greedy decoding: the stream produces the very same text.
    let (streamed, usage, sid) =
        stream_text(&http, &s, &ask("What is the capital of France?", 24, true)).await;
    assert_eq!(streamed, answer);
    assert_eq!(usage["completion_tokens"].as_u64(), Some(completion));
    let rec = s.record(&sid).await;
    assert!(rec["ttft_ms"].as_f64().unwrap() > 0.0);

    // A stop string: the text ends before it, and the answer says which one it was.
    let mut body = ask("What is the capital of France?", 24, false);
    body["stop"] = json!(["Rome", "Paris"]);
    let v = s.post_json("/v1/chat/completions", &body).await;
    let cut = answer.split("Paris").next().unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], cut, "{v:#}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], "Paris", "{v:#}");
    // An Anthropic client gets it as `stop_sequence`.
    let m = s
        .post_json(
            "/v1/messages",
            &json!({
                "model": "smol", "max_tokens": 24, "temperature": 0, "stop_sequences": ["Paris"],
                "system": "You are a helpful assistant.",
                "messages": [{"role": "user", "content": "What is the capital of France?"}]
            }),
        )
        .await;
    assert_eq!(
        (m["stop_reason"].as_str(), m["stop_sequence"].as_str()),
        (Some("stop_sequence"), Some("Paris")),
        "{m:#}"
    );
}

/// A last message of the assistant's is the start of the answer (a prefill): the model goes on
/// from it, and the answer holds only what it added, as the Anthropic API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefilled_answer_is_continued() {
    let Some(dir) = models() else { return };
    let s = start(&dir).await;
    let prefill = "The capital of France is";
    let ask = |messages: Value| {
        let body = json!({
            "model": "smol", "max_tokens": 8, "temperature": 0,
            "system": "You are a helpful assistant.", "messages": messages
        });
        let s = &s;
        async move { s.post_json("/v1/messages", &body).await }
    };
    let question = json!({"role": "user", "content": "What is the capital of France?"});
    let m = ask(json!([question, {"role": "assistant", "content": prefill}])).await;
    let text = m["content"][0]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("Paris") && !text.contains(prefill),
        "a continuation of the prefill: {m:#}"
    );
    // The prefill is part of the prompt: the same conversation without it counts fewer tokens
    // by about the prefill's own (no end of turn, no new assistant header after it).
    let fresh = ask(json!([question])).await;
    let with = m["usage"]["input_tokens"].as_u64().unwrap();
    let without = fresh["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        (without + 3..=without + 8).contains(&with),
        "{with} prompt tokens with the prefill, {without} without"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_without_changing_answers() {
    let Some(dir) = models() else { return };
    let s = start(&dir).await;
    let http = reqwest::Client::new();
    let questions = [
        "Name a primary color.",
        "What is 2 + 2?",
        "Say hello in French.",
        "What is the largest planet?",
    ];
    let mut solo = Vec::new();
    for q in questions {
        solo.push(stream_text(&http, &s, &ask(q, 12, true)).await.0);
    }
    let together = join_all(questions.iter().map(|q| {
        let http = http.clone();
        let body = ask(q, 12, true);
        let s = &s;
        async move { stream_text(&http, s, &body).await.0 }
    }))
    .await;
    assert_eq!(
        together, solo,
        "batched decoding gives each request the same tokens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible_and_bad_requests_are_refused() {
    let Some(dir) = models() else { return };
    let s = start(&dir).await;
    let http = reqwest::Client::new();
    let body = json!({
        "model": "smol", "temperature": 0.9, "seed": 1234, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Write a short poem about rivers."}]
    });
    let mut outs = Vec::new();
    for _ in 0..2 {
        let v: Value = http
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        outs.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(outs[0], outs[1]);

    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "smol", "max_tokens": 1000000, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");

    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);

    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422, "an embedding model does not chat");

    // What the chat model cannot read or give is refused (so a group can send it elsewhere),
    // not dropped; a flood of stop sequences is refused; a negative top_k means no limit.
    let post_to = |path: &str, body: Value| {
        let http = http.clone();
        let url = s.url(path);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let post = |body: Value| post_to("/v1/chat/completions", body);
    let image = json!({"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ]}]});
    // 422 with a message that says why.
    let refused = |(status, v): (u16, Value), why: &str| {
        assert_eq!(status, 422, "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{v}");
    };
    refused(post(image).await, "image_url");
    refused(
        post(json!({"model": "smol", "max_tokens": 4, "logprobs": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .await,
        "logprobs",
    );
    let stops: Vec<String> = (0..100).map(|i| format!("stop{i}")).collect();
    let (status, v) = post(json!({"model": "smol", "max_tokens": 4, "stop": stops,
        "messages": [{"role": "user", "content": "hi"}]}))
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = post(json!({"model": "smol", "max_tokens": 4, "top_k": -1,
        "messages": [{"role": "user", "content": "hi"}]}))
    .await;
    assert_eq!(status, 200, "{v}");
    // Embeddings from the chat model say why not.
    refused(
        post_to("/v1/embeddings", json!({"model": "smol", "input": "hi"})).await,
        "chat model",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_embeddings_are_normalized_and_semantic() {
    let Some(dir) = models() else { return };
    let s = start(&dir).await;
    let http = reqwest::Client::new();
    let v: Value = http
        .post(s.url("/v1/embeddings"))
        .json(&json!({"model": "minilm", "input": [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The girl is carrying a baby."
        ]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 3);
    assert!(vecs.iter().all(|e| e.len() == 384));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!((dot(&vecs[0], &vecs[0]) - 1.0).abs() < 1e-4);
    assert!(dot(&vecs[0], &vecs[1]) > dot(&vecs[0], &vecs[2]));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 18);
}
