//! `sluice demo`: starts a real gateway on a free loopback port and drives it with real HTTP
//! requests, printing what happens. No API key and no network are needed because the requests
//! are served by the built-in **mock provider**, a deterministic test double that echoes the
//! last user message; it is not a language model. Everything else — routing, streaming, errors,
//! usage, cost, the request log and metrics — is the production path.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::app;
use figment::providers::Format;

use crate::config::{Config, RawConfig, Source};

const DEMO_CONFIG: &str = r#"
[providers.mock]
type = "mock"
tokens_per_second = 40

[models."mock-echo"]
deployments = [{ provider = "mock", model = "mock-echo" }]

# Served by the mock too, but priced as gpt-4o-mini from the shipped price table, to show cost
# accounting.
[models."priced-echo"]
deployments = [{ provider = "mock", model = "gpt-4o-mini" }]
"#;

pub async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory for the demo store")?;
    crate::remove_at_exit(Some(dir.path().to_path_buf()));
    let db = dir.path().join("demo.db");
    let raw: RawConfig = figment::Figment::new()
        .merge(figment::providers::Toml::string(DEMO_CONFIG))
        .merge(("store.url", format!("sqlite://{}", db.display())))
        .merge(("server.listen", "127.0.0.1:0"))
        .extract()
        .context("demo configuration")?;
    let cfg = Config::from_raw(Source::EmbeddedDefault, raw).map_err(anyhow::Error::msg)?;
    let running = app::build(cfg, None).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = sluice_server::router(running.state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    outln!(
        "Sluice demo — a real gateway on {base}, store {}",
        db.display()
    );
    outln!("Responses come from the built-in MOCK provider: a deterministic test double that");
    outln!(
        "echoes your last message. It is not a language model; no API key or network is used.\n"
    );

    // The demo talks to its own loopback gateway: never through a proxy from the environment.
    let http = reqwest::Client::builder().no_proxy().build()?;

    step("GET /v1/models");
    let models: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = models["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    outln!("  models: {}", names.join(", "));

    step("POST /v1/chat/completions (priced-echo)");
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "priced-echo",
            "messages": [{"role": "user", "content": "Sluice routes, streams, counts and logs every request."}],
            "user": "demo-user"
        }))
        .send()
        .await?;
    let id = header(&resp, "x-sluice-request-id");
    let cost = header(&resp, "x-sluice-cost-usd");
    let body: Value = resp.json().await?;
    outln!("  answer: {}", body["choices"][0]["message"]["content"]);
    outln!("  usage:  {}", body["usage"]);
    outln!("  x-sluice-request-id: {id}\n  x-sluice-cost-usd:   {cost}");

    step("POST /v1/chat/completions, stream: true (40 tokens/s)");
    let resp = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({
            "model": "mock-echo",
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "each word arrives as its own server-sent event"}]
        }))
        .send()
        .await?;
    out!("  ");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.trim().strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<Value>(data)
            {
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    out!("{t}");
                    std::io::stdout().flush().ok();
                }
                if !v["usage"].is_null() {
                    out!("\n  usage: {}", v["usage"]);
                }
            }
        }
    }
    outln!();

    step("POST /v1/messages (Anthropic-compatible ingress)");
    let msg: Value = http
        .post(format!("{base}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "mock-echo",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Anthropic SDKs work too."}]
        }))
        .send()
        .await?
        .json()
        .await?;
    outln!("  {}", msg["content"][0]["text"]);

    step("Errors: an unknown model, and an upstream failure on demand");
    for (model, text) in [
        ("gpt-9", "hi"),
        ("mock-echo", "[mock:error=503] fail please"),
    ] {
        let resp = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        outln!("  {status}: {}", body["error"]["message"]);
    }

    step("The request log (GET /api/requests)");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log: Value = http
        .get(format!("{base}/api/requests?limit=10"))
        .send()
        .await?
        .json()
        .await?;
    for r in log["data"].as_array().into_iter().flatten().rev() {
        outln!(
            "  {:<16} {:<11} {:<9} {:>3}  tokens {:>2}/{:<2}  ttft {:>6}  cost ${:.8}",
            r["endpoint"].as_str().unwrap_or(""),
            r["model"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["http_status"],
            r["prompt_tokens"],
            r["completion_tokens"],
            r["ttft_ms"]
                .as_f64()
                .map(|t| format!("{t:.0}ms"))
                .unwrap_or_else(|| "-".into()),
            r["cost_usd"].as_f64().unwrap_or(0.0)
        );
    }

    step("Metrics (GET /metrics, excerpt)");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("sluice_requests_total") || l.starts_with("sluice_cost_usd_total")
    }) {
        outln!("  {line}");
    }

    let _ = stop_tx.send(());
    let _ = server.await;
    let state = running.state;
    drop(state);
    let stats = running.writer.drain(Duration::from_secs(5)).await;
    outln!(
        "\nDone: {} request records written. Run `sluice serve` to start the gateway for real.",
        stats.written
    );
    crate::remove_at_exit(None);
    Ok(())
}

fn step(title: &str) {
    outln!("\n▶ {title}");
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}
