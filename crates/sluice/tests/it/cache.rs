//! The exact cache end to end: a repeated deterministic request is a hit (no upstream call, cost
//! 0, the saved cost on its record), plain and streamed answers serve each other, sampling
//! requests are not cached, `Cache-Control` and the body's `cache` object are honoured (and the
//! latter never reaches the upstream), namespaces keep keys apart, and answers survive a
//! restart in the store.

use serde_json::{Value, json};
use sluice_testkit::MockUpstream;

use crate::harness::{Opts, Sluice, request_id, sse_events};

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[providers.up]
type = "openai"
base_url = "{upstream}/v1"
api_key = "test-key"

[models.cached]
deployments = [{{ provider = "up", model = "echo", input_cost_per_mtok = 1000.0, output_cost_per_mtok = 2000.0 }}]
retries = {{ retries = 0 }}

[cache]
enabled = true
{extra}
"#
    )
}

struct Answer {
    status: u16,
    cache: Option<String>,
    id: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

async fn send(s: &Sluice, body: Value, key: Option<&str>, headers: &[(&str, &str)]) -> Answer {
    let mut rb = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    for (n, v) in headers {
        rb = rb.header(*n, *v);
    }
    let resp = rb.send().await.expect("chat");
    Answer {
        status: resp.status().as_u16(),
        cache: resp
            .headers()
            .get("x-sluice-cache")
            .map(|v| v.to_str().unwrap().to_string()),
        id: request_id(&resp),
        body: resp.text().await.unwrap(),
    }
}

fn ask(text: &str) -> Value {
    json!({"model": "cached", "temperature": 0,
           "messages": [{"role": "user", "content": text}]})
}

/// The text of an SSE chat stream, and the usage chunk's totals.
fn stream_text(body: &str) -> (String, Option<Value>) {
    let mut text = String::new();
    let mut usage = None;
    for (_, data) in sse_events(body) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk json");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    (text, usage)
}

#[tokio::test]
async fn repeated_requests_are_served_from_the_cache() {
    let up = MockUpstream::start().await;
    let s = Sluice::start(&config(&up.base_url(), "")).await;

    let first = send(&s, ask("the cache holds this"), None, &[]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let second = send(&s, ask("the cache holds this"), None, &[]).await;
    assert_eq!(second.cache.as_deref(), Some("hit"));
    assert_eq!(up.count_for("echo"), 1, "a hit makes no upstream call");
    assert_eq!(
        second.json()["choices"][0]["message"]["content"],
        first.json()["choices"][0]["message"]["content"]
    );
    // An answer of its own: a fresh id and time.
    assert_ne!(second.json()["id"], first.json()["id"]);
    assert!(
        second.json()["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-")),
        "{}",
        second.body
    );
    assert!(second.json()["created"].as_u64() >= first.json()["created"].as_u64());
    let miss = s.record(&first.id).await;
    let hit = s.record(&second.id).await;
    assert_eq!(miss["cache"], "miss");
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["cost_usd"], 0.0);
    assert!(miss["cost_usd"].as_f64().unwrap() > 0.0, "{miss:#}");
    assert_eq!(hit["cost_saved_usd"], miss["cost_usd"], "{hit:#}");
    assert_eq!(hit["attempts"], 0);

    // The same request streamed: replayed from the cache as SSE, usage included when asked.
    let mut streamed = ask("the cache holds this");
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let replay = send(&s, streamed, None, &[]).await;
    assert_eq!(replay.cache.as_deref(), Some("hit"));
    let (text, usage) = stream_text(&replay.body);
    assert_eq!(
        text,
        first.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    assert!(
        replay.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        replay.body
    );
    assert_eq!(
        usage.expect("a usage chunk")["total_tokens"],
        first.json()["usage"]["total_tokens"]
    );
    assert_eq!(up.count_for("echo"), 1);

    // A streamed miss fills the cache for a plain request.
    let mut fresh = ask("first seen as a stream");
    fresh["stream"] = json!(true);
    let s1 = send(&s, fresh, None, &[]).await;
    assert_eq!(s1.cache.as_deref(), Some("miss"));
    let (streamed_text, _) = stream_text(&s1.body);
    let plain = send(&s, ask("first seen as a stream"), None, &[]).await;
    assert_eq!(plain.cache.as_deref(), Some("hit"), "{}", plain.body);
    assert_eq!(
        plain.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
        streamed_text
    );
    assert_eq!(
        plain.json()["usage"]["completion_tokens"]
            .as_u64()
            .map(|n| n > 0),
        Some(true)
    );

    // Sampling requests are not cached.
    let sampled = json!({"model": "cached", "messages": [{"role": "user", "content": "roll"}]});
    let a = send(&s, sampled.clone(), None, &[]).await;
    let b = send(&s, sampled, None, &[]).await;
    assert_eq!((a.cache, b.cache), (None, None));
    assert_eq!(s.record(&b.id).await["cache"], Value::Null);
    // A seed makes a request reproducible.
    let seeded =
        json!({"model": "cached", "seed": 7, "messages": [{"role": "user", "content": "roll"}]});
    assert_eq!(
        send(&s, seeded.clone(), None, &[]).await.cache.as_deref(),
        Some("miss")
    );
    assert_eq!(
        send(&s, seeded, None, &[]).await.cache.as_deref(),
        Some("hit")
    );
}

/// An answer a fallback model gave is not cached for the model asked: it would be served for
/// that model after it recovers, and to keys that may not use the fallback.
#[tokio::test]
async fn a_fallback_answer_is_not_cached() {
    let up = MockUpstream::start().await;
    let extra = format!(
        r#"
[models.failing]
deployments = [{{ provider = "up", model = "{}" }}]
retries = {{ retries = 0 }}
fallbacks = {{ default = ["cached"] }}
"#,
        sluice_testkit::models::FAULT_500
    );
    let cfg = config(&up.base_url(), "").replace("[cache]", &format!("{extra}\n[cache]"));
    let s = Sluice::start(&cfg).await;
    let ask_failing = json!({"model": "failing", "temperature": 0,
                             "messages": [{"role": "user", "content": "who answers?"}]});
    for _ in 0..2 {
        let a = send(&s, ask_failing.clone(), None, &[]).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.cache.as_deref(), Some("miss"), "{}", a.body);
    }
    assert_eq!(up.count_for("echo"), 2, "the fallback answered both");
}

#[tokio::test]
async fn a_model_removed_by_a_reload_is_not_served_from_the_cache() {
    let up = MockUpstream::start().await;
    let s = Sluice::start(&config(&up.base_url(), "")).await;
    assert_eq!(
        send(&s, ask("kept"), None, &[]).await.cache.as_deref(),
        Some("miss")
    );
    assert_eq!(
        send(&s, ask("kept"), None, &[]).await.cache.as_deref(),
        Some("hit")
    );
    // The model is renamed away.
    let file = s.dir().join("sluice.toml");
    // Edits the configuration file, reloads, and gives the reload's summary.
    let edit_and_reload = |from: &'static str, to: &'static str| {
        let text = std::fs::read_to_string(&file).expect("read config");
        std::fs::write(&file, text.replacen(from, to, 1)).expect("write");
        let url = s.url("/api/config/reload");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .send()
                .await
                .expect("reload");
            assert_eq!(r.status(), 200);
            let answer: Value = r.json().await.expect("reload answer");
            answer["summary"].as_str().unwrap_or_default().to_string()
        }
    };
    let summary = edit_and_reload("[models.cached]", "[models.other]").await;
    assert!(!summary.contains("restart"), "{summary}");
    let gone = send(&s, ask("kept"), None, &[]).await;
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert_eq!(
        gone.json()["error"]["code"],
        "model_not_found",
        "{}",
        gone.body
    );
    assert_eq!(gone.cache, None);

    // `persist` is fixed at start: a reload that changes it says so.
    let summary = edit_and_reload("enabled = true", "enabled = true\npersist = false").await;
    assert!(
        summary
            .contains("max_entries, max_bytes and persist changes take effect at the next restart"),
        "{summary}"
    );
}

#[tokio::test]
async fn clients_control_the_cache_per_request() {
    let up = MockUpstream::start().await;
    let s = Sluice::start(&config(&up.base_url(), "")).await;
    assert_eq!(
        send(&s, ask("q1"), None, &[]).await.cache.as_deref(),
        Some("miss")
    );
    // no-cache: fetched again (and stored again).
    let fresh = send(&s, ask("q1"), None, &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.cache.as_deref(), Some("miss"));
    assert_eq!(up.count_for("echo"), 2);
    // The body's `cache` object: no_store keeps the answer out, and is not sent upstream.
    let mut body = ask("q2");
    body["cache"] = json!({"no_store": true});
    assert_eq!(
        send(&s, body, None, &[]).await.cache.as_deref(),
        Some("miss")
    );
    let last = up.last_request().expect("upstream request");
    assert!(last.body.get("cache").is_none(), "{:#}", last.body);
    assert_eq!(
        send(&s, ask("q2"), None, &[]).await.cache.as_deref(),
        Some("miss")
    );
    assert_eq!(
        send(&s, ask("q2"), None, &[]).await.cache.as_deref(),
        Some("hit")
    );
    // A bad cache object is a 400 naming it.
    let mut bad = ask("q3");
    bad["cache"] = json!({"ttl": "soon"});
    let e = send(&s, bad, None, &[]).await;
    assert_eq!(e.status, 400, "{}", e.body);
    assert_eq!(e.json()["error"]["param"], "cache");
    // max-age: an answer older than the client accepts is a miss.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let old = send(&s, ask("q2"), None, &[("cache-control", "max-age=1")]).await;
    assert_eq!(old.cache.as_deref(), Some("miss"));

    // A namespace that is not one is refused rather than "cleared".
    let bad = reqwest::Client::new()
        .delete(s.url("/api/cache?namespace=kye:1"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // DELETE /api/cache empties it.
    let cleared: Value = reqwest::Client::new()
        .delete(s.url("/api/cache"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["cleared"], true, "{cleared}");
    assert_eq!(
        send(&s, ask("q1"), None, &[]).await.cache.as_deref(),
        Some("miss")
    );
}

#[tokio::test]
async fn namespaces_keep_keys_apart_and_answers_survive_a_restart() {
    let up = MockUpstream::start().await;
    let cfg = config(&up.base_url(), "namespace = \"team\"");
    let s = Sluice::start(&cfg).await;
    let mut keys = Vec::new();
    for (name, team) in [("a", "red"), ("b", "red"), ("c", "blue")] {
        let v = s
            .create_key(json!({"name": name, "owner": {"team": team}}))
            .await;
        keys.push(v["key"].as_str().unwrap().to_string());
    }
    let q = ask("shared within a team");
    assert_eq!(
        send(&s, q.clone(), Some(&keys[0]), &[])
            .await
            .cache
            .as_deref(),
        Some("miss")
    );
    assert_eq!(
        send(&s, q.clone(), Some(&keys[1]), &[])
            .await
            .cache
            .as_deref(),
        Some("hit")
    );
    assert_eq!(
        send(&s, q.clone(), Some(&keys[2]), &[])
            .await
            .cache
            .as_deref(),
        Some("miss")
    );

    // A second gateway on the same store finds the answers there.
    let s2 = Sluice::start_opts(Opts {
        config: &cfg,
        store_url: Some(s.store_url.clone()),
        ..Opts::default()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let again = send(&s2, q, Some(&keys[1]), &[]).await;
    assert_eq!(again.cache.as_deref(), Some("hit"), "{}", again.body);
    assert_eq!(up.count_for("echo"), 2);
}
