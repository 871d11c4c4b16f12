//! The router end to end, with faults injected by the mock upstream: failover, retries that honour
//! `Retry-After`, fallbacks by error class, per-attempt timeouts, circuit breakers, the balancing
//! strategies, capacity, LoRA adapters and hot reload.
//!
//! Every test starts its own mock upstream and Sluice. Timing assertions are one-sided or wide, and
//! random choices are checked with tolerances far outside their spread, so a loaded machine does
//! not make them flake.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sluice_testkit::{MockUpstream, models};

use crate::harness::{BIN, Sluice, request_id, sse_events};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `[providers.up]`: the mock's OpenAI API. Its own timeouts are far above the models' ones, so
/// the models' `[timeouts]` are what the tests see.
fn provider(up: &MockUpstream) -> String {
    format!(
        "[providers.up]\ntype = \"openai\"\nbase_url = \"{}/v1\"\napi_key = \"k\"\ntimeouts = {{ request_secs = 30, stream_idle_secs = 30 }}\n",
        up.base_url()
    )
}

/// A deployment on provider `up` serving the upstream model `model` (id `up/MODEL`).
fn dep(model: &str) -> String {
    format!("{{ provider = \"up\", model = \"{model}\" }}")
}

/// Same, with more keys of the deployment, e.g. `weight = 3, rpm = 5`.
fn dep_with(model: &str, keys: &str) -> String {
    format!("{{ provider = \"up\", model = \"{model}\", {keys} }}")
}

/// `[models."NAME"]` with its deployments, then `extra`: keys of the table (`strategy = …`), then
/// its sub-tables (written with [`sub`]).
fn model(name: &str, deployments: &[String], extra: &str) -> String {
    format!(
        "[models.\"{name}\"]\ndeployments = [{}]\n{extra}\n",
        deployments.join(", ")
    )
}

/// A sub-table of a model: `[models."NAME".TABLE]` and its lines.
fn sub(name: &str, table: &str, lines: &str) -> String {
    format!("[models.\"{name}\".{table}]\n{lines}\n")
}

async fn start(up: &MockUpstream, models: &[String]) -> Sluice {
    Sluice::start(&format!("{}{}", provider(up), models.concat())).await
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A whole answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    id: String,
    route: Option<String>,
    retry_after: Option<String>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.text))
            .to_string()
    }

    fn events(&self) -> Vec<(Option<String>, String)> {
        sse_events(&self.text)
    }

    /// Asserts a normal OpenAI stream: 200, JSON chunks with some content, `[DONE]` last, no
    /// error event. Returns the content.
    fn assert_normal_stream(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text);
        let events = self.events();
        assert_eq!(
            events.last().map(|(_, d)| d.as_str()),
            Some("[DONE]"),
            "{events:#?}"
        );
        let mut content = String::new();
        for (_, d) in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d:?} ({e})"));
            assert!(v.get("error").is_none(), "error event in {events:#?}");
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                content.push_str(c);
            }
        }
        assert!(!content.is_empty(), "{events:#?}");
        content
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn post(http: &reqwest::Client, s: &Sluice, model: &str, stream: bool) -> reqwest::Response {
    http.post(s.url("/v1/chat/completions"))
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream
        }))
        .send()
        .await
        .expect("POST /v1/chat/completions")
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let id = request_id(&resp);
    let route = header(&resp, "x-sluice-route");
    let retry_after = header(&resp, "retry-after");
    let text = resp.text().await.expect("body");
    Answer {
        status,
        id,
        route,
        retry_after,
        text,
    }
}

/// Sends a chat request for `model` and reads the whole answer.
async fn chat(http: &reqwest::Client, s: &Sluice, model: &str, stream: bool) -> Answer {
    answer(post(http, s, model, stream).await).await
}

/// Sends a plain request and expects 200.
async fn chat_ok(http: &reqwest::Client, s: &Sluice, model: &str) -> Answer {
    let a = chat(http, s, model, false).await;
    assert_eq!(a.status, 200, "{}", a.text);
    a
}

async fn admin_get(s: &Sluice, path: &str) -> String {
    let resp = client().get(s.url(path)).send().await.expect("GET");
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.text().await.expect("body")
}

/// The `/api/deployments` entry of a deployment.
async fn deployment(s: &Sluice, group: &str, id: &str) -> Value {
    let v: Value = serde_json::from_str(&admin_get(s, "/api/deployments").await).expect("JSON");
    v["deployments"]
        .as_array()
        .expect("deployments")
        .iter()
        .find(|d| d["group"] == group && d["id"] == id)
        .unwrap_or_else(|| panic!("no deployment {group}/{id} in {v:#}"))
        .clone()
}

async fn breaker_state(s: &Sluice, group: &str, id: &str) -> String {
    deployment(s, group, id).await["breaker"]["state"]
        .as_str()
        .expect("breaker.state")
        .to_string()
}

/// The value of the `/metrics` sample `name{…}` whose labels include every one of `labels`.
async fn metric(s: &Sluice, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = admin_get(s, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn reload(s: &Sluice) -> (u16, Value) {
    let resp = client()
        .post(s.url("/api/config/reload"))
        .send()
        .await
        .expect("POST /api/config/reload");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("reload answers JSON"))
}

/// One entry of a record's `attempt_log`.
#[derive(Debug, Clone, PartialEq)]
struct Attempt {
    group: String,
    deployment: String,
    outcome: String,
    error_code: Option<String>,
    started_ms: f64,
    latency_ms: f64,
}

fn attempt_log(rec: &Value) -> Vec<Attempt> {
    rec["attempt_log"]
        .as_array()
        .unwrap_or_else(|| panic!("attempt_log in {rec:#}"))
        .iter()
        .map(|a| Attempt {
            group: a["group"].as_str().expect("group").to_string(),
            deployment: a["deployment"].as_str().expect("deployment").to_string(),
            outcome: a["outcome"].as_str().expect("outcome").to_string(),
            error_code: a["error_code"].as_str().map(str::to_string),
            started_ms: a["started_ms"].as_f64().expect("started_ms"),
            latency_ms: a["latency_ms"].as_f64().expect("latency_ms"),
        })
        .collect()
}

/// (group, deployment, outcome) of every attempt.
fn path(rec: &Value) -> Vec<(String, String, String)> {
    attempt_log(rec)
        .into_iter()
        .map(|a| (a.group, a.deployment, a.outcome))
        .collect()
}

fn step(group: &str, deployment: &str, outcome: &str) -> (String, String, String) {
    (group.into(), deployment.into(), outcome.into())
}

// ---------------------------------------------------------------------------------------------
// Failover and retries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn requests_succeed_while_any_deployment_is_healthy() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_500), dep(models::FAULT_503), dep("good")],
            "",
        )],
    )
    .await;
    let http = client();
    let mut failed_over = 0;
    for i in 0..40 {
        let stream = i >= 30;
        let a = chat(&http, &s, "m", stream).await;
        if stream {
            a.assert_normal_stream();
        } else {
            assert_eq!(a.status, 200, "{}", a.text);
            assert_eq!(a.json()["object"], "chat.completion");
        }
        let rec = s.record(&a.id).await;
        assert_eq!(rec["status"], "ok", "{rec:#}");
        let log = attempt_log(&rec);
        assert_eq!(rec["attempts"], log.len(), "{rec:#}");
        let (last, failed) = log.split_last().expect("at least one attempt");
        assert_eq!(
            (last.deployment.as_str(), last.outcome.as_str()),
            ("up/good", "ok"),
            "{rec:#}"
        );
        assert!(failed.len() <= 2, "{rec:#}");
        for f in failed {
            assert_eq!(f.outcome, "server_error", "{rec:#}");
            // A 503 is an overloaded upstream, a 500 any other failure.
            let want = if f.deployment == "up/fault-503" {
                "upstream_overloaded"
            } else {
                "upstream_error"
            };
            assert_eq!(f.error_code.as_deref(), Some(want), "{rec:#}");
            assert!(
                f.deployment == "up/fault-500" || f.deployment == "up/fault-503",
                "{rec:#}"
            );
        }
        if let [a, b] = failed {
            assert_ne!(
                a.deployment, b.deployment,
                "an untried deployment goes before a retry: {rec:#}"
            );
        }
        if !failed.is_empty() {
            failed_over += 1;
        }
        assert_eq!(
            a.route.as_deref(),
            Some(format!("group=m; deployment=up/good; attempts={}", log.len()).as_str())
        );
    }
    // Two of three deployments fail: some requests must have met them first.
    assert!(failed_over > 0);
    assert_eq!(up.count_for("good"), 40);
}

#[tokio::test]
async fn a_rate_limited_deployment_cools_down_while_another_serves() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model("m", &[dep(models::FAULT_429), dep("good")], "")],
    )
    .await;
    let http = client();
    let mut hit = None;
    for _ in 0..60 {
        let a = chat_ok(&http, &s, "m").await;
        if up.count_for(models::FAULT_429) > 0 {
            hit = Some(a);
            break;
        }
    }
    let a = hit.expect("the 429 deployment was never picked in 60 requests");
    // Right after its 429 (Retry-After: 1) the deployment cools down.
    let d = deployment(&s, "m", "up/fault-429").await;
    let cooling = d["cooling_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("cooling_secs right after a 429: {d:#}"));
    assert!(cooling > 0.0 && cooling <= 1.0, "{d:#}");
    // A 429 is not the deployment's fault: counted as a request, not a failure.
    assert_eq!(d["requests"], 1, "{d:#}");
    assert_eq!(d["failures"], 0, "{d:#}");
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-429", "rate_limited"),
            step("m", "up/good", "ok")
        ]
    );
}

#[tokio::test]
async fn a_lone_rate_limited_deployment_is_retried_after_its_retry_after() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_429)],
            &sub("m", "retries", "retries = 1"),
        )],
    )
    .await;
    let t = Instant::now();
    let a = chat(&client(), &s, "m", false).await;
    let took = t.elapsed();
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.error_code(), "upstream_rate_limited");
    assert!(a.retry_after.is_some(), "{a:?}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let rec = s.record(&a.id).await;
    assert_eq!(rec["attempts"], 2, "{rec:#}");
    let log = attempt_log(&rec);
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-429", "rate_limited"),
            step("m", "up/fault-429", "rate_limited")
        ]
    );
    let gap = log[1].started_ms - log[0].started_ms;
    assert!(
        gap >= 900.0,
        "the retry must wait for Retry-After: 1, waited {gap} ms: {rec:#}"
    );
    assert_eq!(up.count_for(models::FAULT_429), 2);
}

/// When a retry cannot come within `max_wait_secs` (a 429's cool-down), the fallback is taken at
/// once: the backoff was slept first, for nothing (2 s here, per request).
#[tokio::test]
async fn a_fallback_does_not_wait_for_a_backoff_that_leads_nowhere() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "m",
                &[dep(models::FAULT_429)],
                &format!(
                    "{}{}",
                    sub(
                        "m",
                        "retries",
                        "retries = 2\nbackoff_ms = 2000\nmax_wait_secs = 0"
                    ),
                    sub("m", "fallbacks", "rate_limited = [\"b\"]")
                ),
            ),
            model("b", &[dep("b-good")], ""),
        ],
    )
    .await;
    let a = chat_ok(&client(), &s, "m").await;
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-429", "rate_limited"),
            step("b", "up/b-good", "ok")
        ]
    );
    let log = attempt_log(&rec);
    let gap = log[1].started_ms - log[0].started_ms;
    assert!(gap < 500.0, "the fallback waited {gap} ms: {rec:#}");
}

/// With every breaker open and a fallback for the failure, requests go to the fallback at once
/// instead of waiting out the cool-down for a trial (5 s a request here).
#[tokio::test]
async fn open_breakers_send_requests_to_the_fallback_at_once() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "d",
                &[dep(models::FAULT_500)],
                &format!(
                    "{}{}{}",
                    sub("d", "retries", "retries = 0"),
                    sub(
                        "d",
                        "circuit_breaker",
                        "consecutive_failures = 1\ncooldown_secs = 5"
                    ),
                    sub("d", "fallbacks", "server_error = [\"b\"]")
                ),
            ),
            model("b", &[dep("b-good")], ""),
        ],
    )
    .await;
    let http = client();
    let a = chat_ok(&http, &s, "d").await;
    assert_eq!(path(&s.record(&a.id).await).len(), 2);
    assert_eq!(breaker_state(&s, "d", "up/fault-500").await, "open");
    let t = Instant::now();
    let a = chat_ok(&http, &s, "d").await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        path(&s.record(&a.id).await),
        vec![step("b", "up/b-good", "ok")]
    );
    assert_eq!(up.count_for(models::FAULT_500), 1);
}

// ---------------------------------------------------------------------------------------------
// Fallbacks by error class
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn context_window_errors_fall_back_without_retrying_the_group() {
    let up = MockUpstream::start().await;
    // Round robin starts at the first deployment, so the first request meets the fault first;
    // the group's second deployment would succeed if the group retried.
    let s = start(
        &up,
        &[
            model(
                "small",
                &[dep(models::FAULT_400_CONTEXT), dep("small-good")],
                &format!(
                    "strategy = \"round_robin\"\n{}",
                    sub(
                        "small",
                        "fallbacks",
                        "context_window_exceeded = [\"big\"]\nserver_error = [\"other\"]"
                    )
                ),
            ),
            model("big", &[dep("big-good")], ""),
            model("other", &[dep("other-good")], ""),
            model("alone", &[dep(models::FAULT_400_CONTEXT)], ""),
        ],
    )
    .await;
    let http = client();
    let a = chat_ok(&http, &s, "small").await;
    assert_eq!(
        a.route.as_deref(),
        Some("group=big; deployment=up/big-good; attempts=2")
    );
    let rec = s.record(&a.id).await;
    assert_eq!(rec["model"], "small");
    assert_eq!(
        path(&rec),
        vec![
            step("small", "up/fault-400-context", "context_window_exceeded"),
            step("big", "up/big-good", "ok")
        ]
    );
    assert_eq!(
        attempt_log(&rec)[0].error_code.as_deref(),
        Some("context_length_exceeded")
    );
    assert_eq!(up.count_for(models::FAULT_400_CONTEXT), 1);
    assert_eq!(up.count_for("small-good"), 0);
    assert_eq!(up.count_for("other-good"), 0);

    // Without a fallback the client gets the upstream's verdict, after one attempt.
    let a = chat(&http, &s, "alone", false).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.error_code(), "context_length_exceeded");
    let rec = s.record(&a.id).await;
    assert_eq!(rec["attempts"], 1, "{rec:#}");
}

#[tokio::test]
async fn content_policy_refusals_fall_back_without_retrying_the_group() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "strict",
                &[dep(models::FAULT_CONTENT_POLICY), dep("strict-good")],
                &format!(
                    "strategy = \"round_robin\"\n{}",
                    sub("strict", "fallbacks", "content_policy = [\"lenient\"]")
                ),
            ),
            model("lenient", &[dep("lenient-good")], ""),
        ],
    )
    .await;
    let http = client();
    let a = chat(&http, &s, "strict", true).await;
    a.assert_normal_stream();
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("strict", "up/fault-content-policy", "content_policy"),
            step("lenient", "up/lenient-good", "ok")
        ]
    );
    assert_eq!(
        attempt_log(&rec)[0].error_code.as_deref(),
        Some("content_policy_violation")
    );
    assert_eq!(up.count_for(models::FAULT_CONTENT_POLICY), 1);
    assert_eq!(up.count_for("strict-good"), 0);
}

#[tokio::test]
async fn a_deployment_that_refuses_sluices_key_is_failed_over_and_counted_against() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "m",
                &[dep(models::FAULT_401), dep("good")],
                "strategy = \"round_robin\"",
            ),
            model(
                "lone",
                &[dep(models::FAULT_401)],
                &format!(
                    "{}{}",
                    sub("lone", "retries", "retries = 1\nbackoff_ms = 10"),
                    sub("lone", "fallbacks", "default = [\"other\"]")
                ),
            ),
            model("other", &[dep("other-good")], ""),
        ],
    )
    .await;
    let http = client();
    // A revoked key on one deployment is that deployment's fault: the request goes on to the
    // next one and succeeds.
    let a = chat(&http, &s, "m", false).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-401", "server_error"),
            step("m", "up/good", "ok")
        ]
    );
    assert_eq!(
        attempt_log(&rec)[0].error_code.as_deref(),
        Some("upstream_auth_failed")
    );
    // With no other deployment, the group's retries and then its fallbacks are used.
    let b = chat(&http, &s, "lone", false).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let rec = s.record(&b.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("lone", "up/fault-401", "server_error"),
            step("lone", "up/fault-401", "server_error"),
            step("other", "up/other-good", "ok")
        ]
    );
    // The failures count against the deployment's breaker.
    for (group, failures) in [("m", 1), ("lone", 2)] {
        let d = deployment(&s, group, "up/fault-401").await;
        assert_eq!(d["breaker"]["window_failures"], failures, "{d:#}");
    }
}

/// A virtual key limited to some models is never served by a fallback model outside its list:
/// the fallback is skipped and the client gets the failure; a key allowed the fallback gets it.
#[tokio::test]
async fn fallbacks_a_key_may_not_use_are_skipped() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "cheap",
                &[dep(models::FAULT_500)],
                &sub("cheap", "fallbacks", "default = [\"dear\"]"),
            ),
            model("dear", &[dep("dear-good")], ""),
        ],
    )
    .await;
    let key_for = |models: Value| {
        let s = &s;
        async move {
            s.create_key(json!({"name": "k", "models": models})).await["key"]
                .as_str()
                .expect("key")
                .to_string()
        }
    };
    let limited = key_for(json!(["cheap"])).await;
    let both = key_for(json!(["cheap", "dear"])).await;
    let send = |key: String| {
        let s = &s;
        async move {
            answer(
                client()
                    .post(s.url("/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(
                        &json!({"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}),
                    )
                    .send()
                    .await
                    .expect("POST"),
            )
            .await
        }
    };
    let a = send(limited).await;
    assert_eq!(a.status, 502, "{}", a.text);
    let rec = s.record(&a.id).await;
    assert!(
        path(&rec).iter().all(|(group, _, _)| group == "cheap"),
        "{rec:#}"
    );
    assert_eq!(up.count_for("dear-good"), 0);

    let b = send(both).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let rec = s.record(&b.id).await;
    assert_eq!(
        path(&rec).last().map(|p| p.0.as_str()),
        Some("dear"),
        "{rec:#}"
    );
    assert_eq!(up.count_for("dear-good"), 1);
}

/// A fallback the request cannot take (its key may not use it) is no reason to leave a blocked
/// group at once: the request waits for the cool-down and retries, as without a fallback.
#[tokio::test]
async fn a_fallback_the_key_may_not_use_does_not_cut_the_wait_short() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "m",
                &[dep(models::FAULT_429)],
                &format!(
                    "{}{}",
                    sub("m", "retries", "retries = 1"),
                    sub("m", "fallbacks", "rate_limited = [\"b\"]")
                ),
            ),
            model("b", &[dep("b-good")], ""),
        ],
    )
    .await;
    let key = s.create_key(json!({"name": "k", "models": ["m"]})).await["key"]
        .as_str()
        .expect("key")
        .to_string();
    let a = answer(
        client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.text);
    let rec = s.record(&a.id).await;
    assert_eq!(rec["attempts"], 2, "{rec:#}");
    assert_eq!(up.count_for("b-good"), 0);
}

/// A fallback whose breakers are all open is no reason to give up the group's own retry: the
/// request waits out the 429's `Retry-After` as it would with no fallback, and when the group's
/// attempts are spent, the client hears the upstream's 429, not the blocked fallback's 503.
#[tokio::test]
async fn a_fallback_with_open_breakers_does_not_cut_the_wait_short_nor_hide_the_failure() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "m",
                &[dep(models::FAULT_429)],
                &format!(
                    "{}{}",
                    sub("m", "retries", "retries = 1"),
                    sub("m", "fallbacks", "rate_limited = [\"b\"]")
                ),
            ),
            model(
                "b",
                &[dep(models::FAULT_500)],
                &format!(
                    "{}{}",
                    sub("b", "retries", "retries = 0"),
                    sub(
                        "b",
                        "circuit_breaker",
                        "consecutive_failures = 1\ncooldown_secs = 60"
                    )
                ),
            ),
        ],
    )
    .await;
    let http = client();
    assert_eq!(chat(&http, &s, "b", false).await.status, 502);
    assert_eq!(breaker_state(&s, "b", "up/fault-500").await, "open");
    let a = chat(&http, &s, "m", false).await;
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.error_code(), "upstream_rate_limited", "{}", a.text);
    let rec = s.record(&a.id).await;
    assert_eq!(rec["error_code"], "upstream_rate_limited", "{rec:#}");
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-429", "rate_limited"),
            step("m", "up/fault-429", "rate_limited")
        ]
    );
    assert_eq!(up.count_for(models::FAULT_500), 1);
}

/// An upstream's failure is what the client hears when the fallback could not be tried at all:
/// a 500 stays a 502 `upstream_error`, not the fallback's `no_healthy_deployment`.
#[tokio::test]
async fn a_fallback_that_cannot_be_tried_leaves_the_upstreams_error() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "m",
                &[dep(models::FAULT_500)],
                &format!(
                    "{}{}",
                    sub("m", "retries", "retries = 0"),
                    sub("m", "fallbacks", "server_error = [\"b\"]")
                ),
            ),
            model(
                "b",
                &[dep(models::FAULT_503)],
                &format!(
                    "{}{}",
                    sub("b", "retries", "retries = 0"),
                    sub(
                        "b",
                        "circuit_breaker",
                        "consecutive_failures = 1\ncooldown_secs = 60"
                    )
                ),
            ),
        ],
    )
    .await;
    let http = client();
    assert_eq!(chat(&http, &s, "b", false).await.status, 503);
    assert_eq!(breaker_state(&s, "b", "up/fault-503").await, "open");
    for stream in [false, true] {
        let a = chat(&http, &s, "m", stream).await;
        assert_eq!(a.status, 502, "{}", a.text);
        assert_eq!(a.error_code(), "upstream_error", "{}", a.text);
        let rec = s.record(&a.id).await;
        assert_eq!(rec["error_code"], "upstream_error", "{rec:#}");
        assert_eq!(path(&rec), vec![step("m", "up/fault-500", "server_error")]);
    }
}

/// A key allowed a complexity model may be served by any of its tiers, a tier's fallback to
/// another tier included.
#[tokio::test]
async fn a_complexity_keys_tier_falls_back_to_another_tier() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "small",
                &[dep(models::FAULT_500)],
                &sub("small", "fallbacks", "default = [\"strong\"]"),
            ),
            model("strong", &[dep("strong-good")], ""),
            format!(
                "[models.\"auto\"]\nstrategy = \"complexity\"\n{}",
                sub(
                    "auto",
                    "complexity",
                    "tiers = [{ name = \"small\", model = \"small\", max_score = 0.35 }, { name = \"strong\", model = \"strong\" }]"
                )
            ),
        ],
    )
    .await;
    let key = s.create_key(json!({"name": "k", "models": ["auto"]})).await["key"]
        .as_str()
        .expect("key")
        .to_string();
    let a = answer(
        client()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "auto", "messages": [{"role": "user", "content": "hi there, thanks!"}]}))
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec).last().map(|p| p.0.as_str()),
        Some("strong"),
        "{rec:#}"
    );
    // The complexity model shows its tiers, and no retries, timeouts or fallbacks of its own.
    let all: Value = serde_json::from_str(&admin_get(&s, "/api/deployments").await).unwrap();
    let auto = (all["models"].as_array().unwrap().iter())
        .find(|m| m["model"] == "auto")
        .expect("auto");
    assert_eq!(auto["tiers"].as_array().map(Vec::len), Some(2), "{auto:#}");
    for absent in ["retries", "timeouts", "fallbacks"] {
        assert!(auto[absent].is_null(), "{auto:#}");
    }
    let small = (all["models"].as_array().unwrap().iter())
        .find(|m| m["model"] == "small")
        .expect("small");
    assert!(small["retries"].is_object(), "{small:#}");
}

// ---------------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------------

/// A client that stops reading a stream (its connection open, its receive window full) is cut
/// off after `server.client_stall_secs`: the deployment's in-flight slot comes back and the
/// record says the client left. The stream was only polled as fast as the client read, so it
/// held everything until the client closed, its timeouts never firing.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let up = MockUpstream::start().await;
    let s = Sluice::start_opts(crate::harness::Opts {
        config: &format!("{}{}", provider(&up), model("m", &[dep(models::ECHO)], "")),
        server_extra: "client_stall_secs = 1",
        ..Default::default()
    })
    .await;
    // The echo model streams a chunk per word: tens of megabytes, far more than the sockets
    // hold.
    let words = "word ".repeat(200_000);
    let body = json!({"model": "m", "stream": true,
                      "messages": [{"role": "user", "content": words}]})
    .to_string();
    let url = s.url("/v1/chat/completions");
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    // Never read: the stream fills the buffers, then stalls.
    let started = Instant::now();
    loop {
        let d = deployment(&s, "m", "up/echo").await;
        if d["requests"] == 1 && d["in_flight"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the stalled stream still holds its slot: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list: Value = serde_json::from_str(&admin_get(&s, "/api/requests?limit=1").await).unwrap();
    let rec = &list["data"][0];
    assert_eq!(rec["error_code"], "client_closed_request", "{rec:#}");
    drop(tcp);
}

#[tokio::test]
async fn a_hanging_deployment_times_out_per_attempt() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[
            model(
                "hang",
                &[dep(models::FAULT_HANG)],
                &format!(
                    "{}{}",
                    sub("hang", "timeouts", "total_secs = 1"),
                    sub("hang", "retries", "retries = 0")
                ),
            ),
            model(
                "m",
                &[dep(models::FAULT_HANG), dep("good")],
                &format!(
                    "strategy = \"round_robin\"\n{}",
                    sub("m", "timeouts", "total_secs = 1")
                ),
            ),
        ],
    )
    .await;
    let http = client();
    let t = Instant::now();
    let a = chat(&http, &s, "hang", false).await;
    let took = t.elapsed();
    assert_eq!(a.status, 504, "{}", a.text);
    assert_eq!(a.error_code(), "upstream_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "a 1 s attempt timeout answered after {took:?}"
    );
    let rec = s.record(&a.id).await;
    assert_eq!(path(&rec), vec![step("hang", "up/fault-hang", "timeout")]);

    // With a healthy deployment beside it the request succeeds after the timeout.
    let t = Instant::now();
    let a = chat_ok(&http, &s, "m").await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-hang", "timeout"),
            step("m", "up/good", "ok")
        ]
    );
}

#[tokio::test]
async fn a_stream_without_a_first_token_fails_over_invisibly() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_HANG), dep("good")],
            &format!(
                "strategy = \"round_robin\"\n{}",
                sub("m", "timeouts", "first_token_secs = 1")
            ),
        )],
    )
    .await;
    let t = Instant::now();
    let a = chat(&client(), &s, "m", true).await;
    let took = t.elapsed();
    a.assert_normal_stream();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(
        a.route.as_deref(),
        Some("group=m; deployment=up/good; attempts=2")
    );
    let rec = s.record(&a.id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-hang", "timeout"),
            step("m", "up/good", "ok")
        ]
    );
}

#[tokio::test]
async fn a_stream_that_stalls_after_its_role_chunk_fails_over_on_the_idle_timeout() {
    // The upstream sends the role chunk, then only keep-alive comments: the provider's own idle
    // timer (30 s here) sees bytes; the model's stream_idle_secs sees no chunk.
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_STALL), dep("good")],
            &format!(
                "strategy = \"round_robin\"\n{}",
                sub("m", "timeouts", "stream_idle_secs = 1")
            ),
        )],
    )
    .await;
    let t = Instant::now();
    let a = chat(&client(), &s, "m", true).await;
    let took = t.elapsed();
    a.assert_normal_stream();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let rec = s.record(&a.id).await;
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-stall", "timeout"),
            step("m", "up/good", "ok")
        ]
    );
}

/// The wait for the first chunk is the first-token limit's, not `stream_idle_secs`': a model that
/// thinks 1.5 s before its first chunk is not cut by a 1 s idle limit.
#[tokio::test]
async fn stream_idle_secs_leaves_the_wait_for_the_first_chunk_alone() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_LATE_FIRST)],
            &format!(
                "{}{}",
                sub("m", "timeouts", "stream_idle_secs = 1"),
                sub("m", "retries", "retries = 0")
            ),
        )],
    )
    .await;
    let t = Instant::now();
    let a = chat(&client(), &s, "m", true).await;
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    a.assert_normal_stream();
    let rec = s.record(&a.id).await;
    assert_eq!(path(&rec), vec![step("m", "up/fault-late-first", "ok")]);
}

#[tokio::test]
async fn a_streams_total_time_counts_from_the_start_of_its_attempt() {
    // 2 s to open, then two words a second: the 3 s total ends it a second after it opened, not
    // three seconds after.
    let words = "one two three four five six seven eight nine ten ".repeat(3);
    let s = Sluice::start(&format!(
        "[providers.slow]\ntype = \"mock\"\nmode = \"fixed\"\ntext = \"{words}\"\n\
         latency_ms = 2000\ntokens_per_second = 2\n{}",
        model(
            "m",
            &["{ provider = \"slow\", model = \"x\" }".to_string()],
            &format!(
                "{}{}",
                sub("m", "timeouts", "total_secs = 3"),
                sub("m", "retries", "retries = 0")
            ),
        )
    ))
    .await;
    let t = Instant::now();
    let a = chat(&client(), &s, "m", true).await;
    let took = t.elapsed();
    assert_eq!(a.status, 200, "{}", a.text);
    let (_, last) = a.events().last().cloned().expect("events");
    let last: Value = serde_json::from_str(&last).expect("error event is JSON");
    assert_eq!(last["error"]["code"], "upstream_timeout", "{}", a.text);
    assert!(took >= Duration::from_millis(2900), "took {took:?}");
    // Counting from the opening would have run to 5 s.
    assert!(took < Duration::from_millis(4500), "took {took:?}");
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_broken_stream_before_content_fails_over_invisibly() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_BAD_SSE), dep("good")],
            "strategy = \"round_robin\"",
        )],
    )
    .await;
    let a = chat(&client(), &s, "m", true).await;
    a.assert_normal_stream();
    let rec = s.record(&a.id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(
        path(&rec),
        vec![
            step("m", "up/fault-bad-sse", "server_error"),
            step("m", "up/good", "ok")
        ]
    );
}

#[tokio::test]
async fn a_stream_cut_after_content_ends_with_an_error_event() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_CUT), dep("good")],
            "strategy = \"round_robin\"",
        )],
    )
    .await;
    let a = chat(&client(), &s, "m", true).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let events = a.events();
    assert!(
        events.iter().all(|(_, d)| d != "[DONE]"),
        "a broken stream must not end with [DONE]: {events:#?}"
    );
    let (_, last) = events.last().expect("events");
    let last: Value = serde_json::from_str(last).expect("error event is JSON");
    assert!(last["error"]["code"].is_string(), "{events:#?}");
    assert!(
        events.len() >= 2,
        "content came before the error: {events:#?}"
    );
    let rec = s.record(&a.id).await;
    assert_eq!(rec["status"], "error", "{rec:#}");
    assert_eq!(rec["attempts"], 1, "{rec:#}");
    // Content had reached the client: no failover mid-stream.
    assert_eq!(up.count_for("good"), 0);
    // The attempt that opened fine and then broke is a failed one, on the record and for the
    // deployment's breaker.
    assert_eq!(path(&rec), vec![step("m", "up/fault-cut", "server_error")]);
    let d = deployment(&s, "m", "up/fault-cut").await;
    assert_eq!(d["breaker"]["window_requests"], 1, "{d:#}");
    assert_eq!(d["breaker"]["window_failures"], 1, "{d:#}");
    // A stream that ends well counts once, as a success.
    let b = chat(&client(), &s, "m", true).await;
    b.assert_normal_stream();
    let d = deployment(&s, "m", "up/good").await;
    assert_eq!(d["breaker"]["window_requests"], 1, "{d:#}");
    assert_eq!(d["breaker"]["window_failures"], 0, "{d:#}");
}

/// A streamed attempt's latency on the record is its whole time, to the stream's end, not the
/// time its stream took to open.
#[tokio::test]
async fn a_streamed_attempts_latency_is_its_whole_time() {
    let up = MockUpstream::start().await;
    let s = start(&up, &[model("m", &[dep(models::SLOW_STREAM)], "")]).await;
    let a = chat(&client(), &s, "m", true).await;
    a.assert_normal_stream();
    let rec = s.record(&a.id).await;
    let log = attempt_log(&rec);
    assert_eq!(log.len(), 1, "{rec:#}");
    let whole = rec["latency_ms"].as_f64().expect("latency");
    // 40 chunks 50 ms apart.
    assert!(log[0].latency_ms >= 1_500.0, "{rec:#}");
    assert!(
        log[0].started_ms + log[0].latency_ms <= whole + 1.0,
        "{rec:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Circuit breakers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn breakers_open_on_failures_and_close_after_a_successful_probe() {
    let up = MockUpstream::start().await;
    // The cooldown is long enough for the "stays open" checks to run on a slow machine; they
    // are skipped (not failed) if the machine was slower still.
    let s = start(
        &up,
        &[model(
            "m",
            &[dep("flaky"), dep("good")],
            &sub(
                "m",
                "circuit_breaker",
                "min_requests = 4\nerror_rate = 0.5\nconsecutive_failures = 3\ncooldown_secs = 3",
            ),
        )],
    )
    .await;
    let http = client();
    up.set_fault("flaky", Some(models::FAULT_500));
    // Three failures in a row open it; every failed request is served by "good".
    for _ in 0..60 {
        chat_ok(&http, &s, "m").await;
        if up.count_for("flaky") >= 3 {
            break;
        }
    }
    assert_eq!(up.count_for("flaky"), 3, "flaky was picked too rarely");
    let d = deployment(&s, "m", "up/flaky").await;
    let seen = Instant::now();
    assert_eq!(d["breaker"]["state"], "open", "{d:#}");
    let opened_times = d["breaker"]["opened_times"].as_u64().expect("opened_times");
    assert!(opened_times >= 1, "{d:#}");
    let retry_in = d["breaker"]["retry_in_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("retry_in_secs while open: {d:#}"));
    assert!(retry_in > 0.0 && retry_in <= 3.0, "{d:#}");
    let half_open_at = seen + Duration::from_secs_f64(retry_in);
    assert_eq!(
        metric(
            &s,
            "sluice_deployment_breaker_state",
            &[("model", "m"), ("deployment", "up/flaky")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &s,
            "sluice_deployment_breaker_state",
            &[("model", "m"), ("deployment", "up/good")]
        )
        .await,
        Some(0.0)
    );
    assert!(
        metric(
            &s,
            "sluice_attempts_total",
            &[
                ("model", "m"),
                ("deployment", "up/flaky"),
                ("outcome", "server_error")
            ]
        )
        .await
        .is_some_and(|v| v >= 3.0)
    );

    // While open, the deployment gets no traffic.
    let before = up.count_for("flaky");
    for _ in 0..10 {
        chat_ok(&http, &s, "m").await;
    }
    if Instant::now() + Duration::from_millis(200) < half_open_at {
        assert_eq!(
            up.count_for("flaky"),
            before,
            "an open breaker let requests through"
        );
        assert_eq!(breaker_state(&s, "m", "up/flaky").await, "open");
    } else {
        eprintln!("machine too slow: the breaker's cooldown passed during the open-state checks");
    }

    // Healthy again: after the cooldown the breaker is half-open and a probe closes it.
    up.set_fault("flaky", None);
    tokio::time::sleep_until((half_open_at + Duration::from_millis(200)).into()).await;
    assert_eq!(breaker_state(&s, "m", "up/flaky").await, "half_open");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut state = String::new();
    while Instant::now() < deadline {
        chat_ok(&http, &s, "m").await;
        state = breaker_state(&s, "m", "up/flaky").await;
        if state == "closed" {
            break;
        }
    }
    assert_eq!(state, "closed", "the breaker never closed");
    assert!(up.count_for("flaky") > before);
    assert_eq!(
        metric(
            &s,
            "sluice_deployment_breaker_state",
            &[("model", "m"), ("deployment", "up/flaky")]
        )
        .await,
        Some(0.0)
    );
}

#[tokio::test]
async fn a_trial_the_client_cancels_soon_gives_its_slot_back_at_once() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep("flaky")],
            &format!(
                "{}{}",
                sub(
                    "m",
                    "circuit_breaker",
                    "consecutive_failures = 1\ncooldown_secs = 4"
                ),
                sub("m", "retries", "retries = 0")
            ),
        )],
    )
    .await;
    let http = client();
    // Opens the breaker, waits until it is half-open, then sends a trial to a hanging
    // deployment whose client gives up after `patience`, and waits for its record.
    let cancelled_trial = |patience: Duration, user: &'static str| {
        let (s, up, http) = (&s, &up, &http);
        async move {
            up.set_fault("flaky", Some(models::FAULT_500));
            assert_eq!(chat(http, s, "m", false).await.status, 502);
            assert_eq!(breaker_state(s, "m", "up/flaky").await, "open");
            let deadline = Instant::now() + Duration::from_secs(10);
            while breaker_state(s, "m", "up/flaky").await != "half_open" {
                assert!(
                    Instant::now() < deadline,
                    "the breaker never went half-open"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            up.set_fault("flaky", Some(models::FAULT_HANG));
            let impatient = reqwest::Client::builder()
                .timeout(patience)
                .build()
                .unwrap();
            let sent = Instant::now();
            let r = impatient
                .post(s.url("/v1/chat/completions"))
                .json(&json!({"model": "m", "user": user, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await;
            assert!(r.is_err(), "the client gives up before the answer");
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let page = s.list(&format!("user={user}")).await;
                if let Some(rec) = page["data"].as_array().and_then(|a| a.first()) {
                    assert_eq!(rec["status"], "cancelled", "{rec}");
                    break;
                }
                assert!(Instant::now() < deadline, "no cancelled record");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(breaker_state(s, "m", "up/flaky").await, "half_open");
            up.set_fault("flaky", None);
            sent
        }
    };
    // Cancelled within the deployment's usual time (at least 1 s): the trial taught nothing,
    // and the next request may try the deployment at once (not after the 4 s cooldown).
    cancelled_trial(Duration::from_millis(300), "soon").await;
    let a = chat(&http, &s, "m", false).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(breaker_state(&s, "m", "up/flaky").await, "closed");
    // Cancelled after that, it may be hanging: its slot stays taken until the cooldown, so the
    // next request is not sent into the same hang.
    let sent = cancelled_trial(Duration::from_millis(1500), "late").await;
    let a = chat(&http, &s, "m", false).await;
    if sent.elapsed() < Duration::from_millis(3800) {
        assert_eq!(a.status, 503, "{}", a.text);
        assert_eq!(a.error_code(), "no_healthy_deployment");
    } else {
        eprintln!("machine too slow: the trial's slot expired before the check");
    }
}

#[tokio::test]
async fn a_trial_stream_closes_the_breaker_once_it_opens() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::SLOW_STREAM)],
            &sub(
                "m",
                "circuit_breaker",
                "consecutive_failures = 1\ncooldown_secs = 0.5",
            ),
        )],
    )
    .await;
    let http = client();
    up.set_fault(models::SLOW_STREAM, Some(models::FAULT_500));
    assert_eq!(chat(&http, &s, "m", false).await.status, 502);
    assert_eq!(breaker_state(&s, "m", "up/slow-stream").await, "open");
    up.set_fault(models::SLOW_STREAM, None);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(breaker_state(&s, "m", "up/slow-stream").await, "half_open");
    // The trial is a stream of 40 tokens over ~2 s. Its answer's headers come with the first
    // token: by then the trial has shown the deployment answers, and the breaker is closed while
    // the stream still runs (were the trial settled at the stream's end, a longer stream would
    // outlast its probe slot and let more trials in).
    let resp = post(&http, &s, "m", true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(breaker_state(&s, "m", "up/slow-stream").await, "closed");
    let a = answer(resp).await;
    let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
    assert_eq!(a.assert_normal_stream(), expected);
    let d = deployment(&s, "m", "up/slow-stream").await;
    assert_eq!(d["breaker"]["state"], "closed", "{d:#}");
    // The stream's end counts as one request in the closed breaker's window.
    assert_eq!(d["breaker"]["window_requests"], 1, "{d:#}");
}

/// A deployment that cannot serve a request (it refuses it before sending: `n > 1` to an Anthropic
/// deployment) hands it to one that can, without a retry spent; and as the half-open trial the
/// refusal shows nothing about the deployment's health, so the breaker stays unclosed. It used
/// to end the request with 422 and close the breaker of a dead upstream.
#[tokio::test]
async fn a_deployment_that_cannot_serve_a_request_hands_it_on() {
    let up = MockUpstream::start().await;
    let claude = format!(
        "[providers.claude]\ntype = \"anthropic\"\nbase_url = \"{}\"\napi_key = \"k\"\n",
        up.base_url()
    );
    let s = Sluice::start(&format!(
        "{}{claude}{}",
        provider(&up),
        model(
            "m",
            &[
                format!(
                    "{{ provider = \"claude\", model = \"{}\", input_cost_per_mtok = 1, output_cost_per_mtok = 1 }}",
                    models::FAULT_500
                ),
                dep_with(
                    models::ECHO,
                    "input_cost_per_mtok = 9, output_cost_per_mtok = 9",
                ),
            ],
            &format!(
                "strategy = \"cost\"\n{}{}",
                sub("m", "retries", "retries = 0"),
                sub(
                    "m",
                    "circuit_breaker",
                    "consecutive_failures = 1\ncooldown_secs = 0.3"
                ),
            ),
        )
    ))
    .await;
    let claude_id = format!("claude/{}", models::FAULT_500);
    let echo_id = format!("up/{}", models::ECHO);
    let http = client();
    // Retries 0 and the dead Claude deployment first (the cheaper): it fails and its breaker
    // opens (no retry is left for the echo deployment).
    let a = chat(&http, &s, "m", false).await;
    assert_eq!(a.status, 502, "{}", a.text);
    assert_eq!(breaker_state(&s, "m", &claude_id).await, "open");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Half-open now: the next request is its trial, and it asks for two choices.
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "n": 2
        }))
        .send()
        .await
        .expect("POST");
    let a = answer(resp).await;
    assert_eq!(a.status, 200, "served by the echo deployment: {}", a.text);
    let log = attempt_log(&s.record(&a.id).await);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].deployment, claude_id);
    assert_eq!(log[0].error_code.as_deref(), Some("unsupported_parameter"));
    assert_eq!(log[1].deployment, echo_id);
    assert_eq!(log[1].outcome, "ok", "{log:?}");
    assert_ne!(
        breaker_state(&s, "m", &claude_id).await,
        "closed",
        "a refusal before sending is no trial of the upstream"
    );
    // A request no deployment can serve is refused with the reason.
    let only_claude = Sluice::start(&format!(
        "{claude}{}",
        model(
            "c",
            &[format!(
                "{{ provider = \"claude\", model = \"{}\" }}",
                models::ECHO
            )],
            ""
        )
    ))
    .await;
    let resp = http
        .post(only_claude.url("/v1/chat/completions"))
        .json(&json!({"model": "c", "messages": [{"role": "user", "content": "hi"}], "n": 2}))
        .send()
        .await
        .expect("POST");
    let a = answer(resp).await;
    assert_eq!(a.status, 422, "{}", a.text);
    assert_eq!(a.error_code(), "unsupported_parameter");
}

#[tokio::test]
async fn no_healthy_deployment_when_every_breaker_is_open() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_500), dep(models::FAULT_503)],
            &sub(
                "m",
                "circuit_breaker",
                "consecutive_failures = 1\ncooldown_secs = 60",
            ),
        )],
    )
    .await;
    let http = client();
    // The first request opens both breakers.
    let a = chat(&http, &s, "m", false).await;
    // The answer is the last attempt's failure: the 500's or the 503's.
    assert!(
        (a.status, a.error_code()) == (502, "upstream_error".into())
            || (a.status, a.error_code()) == (503, "upstream_overloaded".into()),
        "{}",
        a.text
    );
    for id in ["up/fault-500", "up/fault-503"] {
        assert_eq!(breaker_state(&s, "m", id).await, "open");
    }
    let calls = up.request_count();
    for stream in [false, true] {
        let a = chat(&http, &s, "m", stream).await;
        assert_eq!(a.status, 503, "{}", a.text);
        assert_eq!(a.error_code(), "no_healthy_deployment");
        let retry: u64 = a
            .retry_after
            .as_deref()
            .expect("retry-after")
            .parse()
            .expect("retry-after seconds");
        assert!((1..=60).contains(&retry), "{a:?}");
        let rec = s.record(&a.id).await;
        assert_eq!(rec["attempts"], 0, "{rec:#}");
        assert_eq!(rec["error_code"], "no_healthy_deployment", "{rec:#}");
    }
    assert_eq!(
        up.request_count(),
        calls,
        "open breakers sent nothing upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// Balancing strategies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn weighted_balancing_follows_the_weights() {
    const N: usize = 600;
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep_with("w-a", "weight = 3"), dep_with("w-b", "weight = 1")],
            "",
        )],
    )
    .await;
    let http = client();
    let statuses: Vec<u16> = futures::stream::iter(0..N)
        .map(|_| {
            let http = &http;
            let s = &s;
            async move { post(http, s, "m", false).await.status().as_u16() }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
    let (a, b) = (up.count_for("w-a"), up.count_for("w-b"));
    assert_eq!(a + b, N);
    let share = a as f64 / N as f64;
    // The standard deviation is under 0.018: 0.08 is more than four of them.
    assert!(
        (share - 0.75).abs() <= 0.08,
        "w-a got {a} of {N} ({share:.3}), expected about 0.75"
    );
}

#[tokio::test]
async fn round_robin_takes_turns_exactly() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep("rr-a"), dep("rr-b"), dep("rr-c")],
            "strategy = \"round_robin\"",
        )],
    )
    .await;
    let http = client();
    for _ in 0..90 {
        chat_ok(&http, &s, "m").await;
    }
    let order: Vec<String> = up
        .requests()
        .iter()
        .filter_map(|r| r.body["model"].as_str().map(str::to_string))
        .collect();
    let expected: Vec<String> = (0..90)
        .map(|i| ["rr-a", "rr-b", "rr-c"][i % 3].to_string())
        .collect();
    assert_eq!(order, expected);
}

#[tokio::test]
async fn least_busy_avoids_the_deployment_with_a_stream_in_flight() {
    let up = MockUpstream::start().await;
    // Two deployments of the same slow upstream model, told apart by their ids.
    let s = start(
        &up,
        &[model(
            "m",
            &[
                dep_with(models::SLOW_STREAM, "id = \"A\""),
                dep_with(models::SLOW_STREAM, "id = \"B\""),
            ],
            "strategy = \"least_busy\"",
        )],
    )
    .await;
    let http = client();
    let deployment_of = |resp: &reqwest::Response| {
        let route = header(resp, "x-sluice-route").expect("x-sluice-route");
        route
            .split("; ")
            .find_map(|p| p.strip_prefix("deployment="))
            .expect("deployment=")
            .to_string()
    };
    // The first stream is held open (~2 s) while the second is routed.
    let first = post(&http, &s, "m", true).await;
    assert_eq!(first.status(), 200);
    let first_dep = deployment_of(&first);
    let second = post(&http, &s, "m", true).await;
    assert_eq!(second.status(), 200);
    let second_dep = deployment_of(&second);
    assert_ne!(
        first_dep, second_dep,
        "the second stream went to the busy deployment"
    );
    for resp in [first, second] {
        let content = answer(resp).await.assert_normal_stream();
        assert!(content.contains("tok39"), "{content}");
    }
}

#[tokio::test]
async fn cost_strategy_sends_everything_to_the_cheapest() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[
                dep_with(
                    "pricey",
                    "input_cost_per_mtok = 5.0, output_cost_per_mtok = 15.0",
                ),
                dep_with(
                    "cheap",
                    "input_cost_per_mtok = 0.1, output_cost_per_mtok = 0.4",
                ),
                dep_with(
                    "mid",
                    "input_cost_per_mtok = 1.0, output_cost_per_mtok = 2.0",
                ),
            ],
            "strategy = \"cost\"",
        )],
    )
    .await;
    let http = client();
    for _ in 0..20 {
        chat_ok(&http, &s, "m").await;
    }
    assert_eq!(up.count_for("cheap"), 20);
    assert_eq!(up.request_count(), 20);
}

#[tokio::test]
async fn latency_strategy_prefers_the_fast_deployment() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep(models::FAULT_SLOW), dep("quick")],
            "strategy = \"latency\"",
        )],
    )
    .await;
    let http = client();
    // Warm up until both have a latency sample.
    for _ in 0..20 {
        if up.count_for(models::FAULT_SLOW) > 0 && up.count_for("quick") > 0 {
            break;
        }
        chat_ok(&http, &s, "m").await;
    }
    assert!(up.count_for(models::FAULT_SLOW) > 0 && up.count_for("quick") > 0);
    let before = up.count_for("quick");
    for _ in 0..40 {
        chat_ok(&http, &s, "m").await;
    }
    let fast = up.count_for("quick") - before;
    assert!(
        fast >= 28,
        "only {fast} of 40 requests went to the fast deployment"
    );
    let d = deployment(&s, "m", "up/fault-slow").await;
    assert!(
        d["latency_ewma_ms"].as_f64().is_some_and(|l| l >= 250.0),
        "{d:#}"
    );
    assert!(
        d["latency_sampled_secs_ago"]
            .as_u64()
            .is_some_and(|a| a < 30),
        "{d:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// Capacity
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_deployment_at_its_rpm_is_skipped() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep_with("capped", "rpm = 5"), dep("free")],
            "",
        )],
    )
    .await;
    let http = client();
    for _ in 0..20 {
        chat_ok(&http, &s, "m").await;
    }
    let capped = up.count_for("capped");
    assert!(
        (1..=5).contains(&capped),
        "capped (rpm = 5) got {capped} of 20"
    );
    assert_eq!(up.count_for("free"), 20 - capped);
    let d = deployment(&s, "m", "up/capped").await;
    assert_eq!(d["rpm"]["limit"], 5, "{d:#}");
    assert_eq!(d["rpm"]["used"], capped, "{d:#}");
}

#[tokio::test]
async fn a_full_group_answers_429_with_retry_after() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "m",
            &[dep_with("only", "rpm = 3")],
            &sub("m", "retries", "max_wait_secs = 0"),
        )],
    )
    .await;
    let http = client();
    for _ in 0..3 {
        chat_ok(&http, &s, "m").await;
    }
    let t = Instant::now();
    let a = chat(&http, &s, "m", false).await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "max_wait_secs = 0 must not wait"
    );
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.error_code(), "rate_limit_exceeded");
    let retry: u64 = a
        .retry_after
        .as_deref()
        .expect("retry-after")
        .parse()
        .expect("retry-after seconds");
    assert!((1..=60).contains(&retry), "{a:?}");
    let rec = s.record(&a.id).await;
    assert_eq!(rec["attempts"], 0, "{rec:#}");
    assert_eq!(up.count_for("only"), 3);
}

// ---------------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_adapter_is_sent_as_the_upstream_model() {
    let up = MockUpstream::start().await;
    let s = start(
        &up,
        &[model(
            "support",
            &[dep_with("llama-base", "adapter = \"support-bot@v3\"")],
            "",
        )],
    )
    .await;
    let a = chat_ok(&client(), &s, "support").await;
    assert_eq!(up.count_for("support-bot@v3"), 1);
    assert_eq!(up.count_for("llama-base"), 0);
    assert_eq!(
        a.route.as_deref(),
        Some("group=support; deployment=up/llama-base+support-bot@v3; attempts=1")
    );
    let rec = s.record(&a.id).await;
    assert_eq!(rec["deployment"], "support-bot@v3", "{rec:#}");
    assert_eq!(rec["provider"], "up", "{rec:#}");
    let d = deployment(&s, "support", "up/llama-base+support-bot@v3").await;
    assert_eq!(d["adapter"], "support-bot@v3", "{d:#}");
    assert_eq!(d["model"], "llama-base", "{d:#}");
}

#[test]
fn config_check_rejects_an_adapter_on_a_non_openai_provider() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://./sluice.db\"\n\
         [providers.claude]\ntype = \"anthropic\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n\
         [models.support]\ndeployments = [{ provider = \"claude\", model = \"claude-3-5-haiku-latest\", adapter = \"support-bot@v3\" }]\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&file)
        .current_dir(dir.path())
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ADMIN_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("models.support.deployments[0].adapter"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------------------------------

/// Replaces `old` (a part of the running configuration file) with `new`.
fn rewrite(s: &Sluice, old: &str, new: &str) {
    let file = s.dir().join("sluice.toml");
    let text = std::fs::read_to_string(&file).expect("read config");
    assert!(text.contains(old), "{old:?} not in {text}");
    std::fs::write(&file, text.replacen(old, new, 1)).expect("write config");
}

#[tokio::test]
async fn reload_swaps_the_router_and_keeps_it_on_a_bad_file() {
    let up = MockUpstream::start().await;
    let m_one = model("m", &[dep("one")], "");
    let s = start(&up, std::slice::from_ref(&m_one)).await;
    let http = client();
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("one"), 1);

    let m_two = format!(
        "{}{}",
        model("m", &[dep("two")], ""),
        model("n", &[dep("enn")], "")
    );
    rewrite(&s, &m_one, &m_two);
    let (status, v) = reload(&s).await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["reloaded"], true, "{v:#}");
    // Which replica reloaded (only the one that took the call does).
    let replica = v["replica"].as_str().expect("replica");
    assert!(
        replica.ends_with(&format!(":{}", s.pid())),
        "{replica} (pid {})",
        s.pid()
    );
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("two"), 1);
    assert_eq!(up.count_for("one"), 1);
    chat_ok(&http, &s, "n").await;
    assert_eq!(up.count_for("enn"), 1);

    // An unknown key: 400 naming it, and the running configuration stays.
    let bad = format!(
        "{}{}",
        model("m", &[dep("three")], "bogus_key = 1"),
        model("n", &[dep("enn")], "")
    );
    rewrite(&s, &m_two, &bad);
    let (status, v) = reload(&s).await;
    assert_eq!(status, 400, "{v:#}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("bogus_key"), "{message}");
    assert!(message.contains("models.m"), "{message}");
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("two"), 2);
    assert_eq!(up.count_for("three"), 0);
    assert_eq!(deployment(&s, "m", "up/two").await["model"], "two");

    // The file emptied (truncated by an editor about to write it): no model left would answer
    // every request 404, so it is refused and the running configuration stays.
    let path = s.dir().join("sluice.toml");
    let whole = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(&path, "").expect("empty config");
    let (status, v) = reload(&s).await;
    assert_eq!(status, 400, "{v:#}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("configures no models"), "{message}");
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("two"), 3);
    std::fs::write(&path, whole).expect("restore config");

    // The file gone: said so, with no start-up hint, and the running configuration stays.
    std::fs::remove_file(&path).expect("remove config");
    let (status, v) = reload(&s).await;
    assert_eq!(status, 400, "{v:#}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("no longer exists"), "{message}");
    assert!(!message.contains("--config"), "{message}");
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("two"), 4);
}

#[tokio::test]
async fn a_reload_keeps_what_unchanged_deployments_learnt() {
    let up = MockUpstream::start().await;
    let m = model(
        "m",
        &[dep(models::FAULT_500)],
        &sub(
            "m",
            "circuit_breaker",
            "consecutive_failures = 1\ncooldown_secs = 60",
        ),
    );
    let s = start(&up, std::slice::from_ref(&m)).await;
    let http = client();
    assert_eq!(chat(&http, &s, "m", false).await.status, 502);
    assert_eq!(breaker_state(&s, "m", "up/fault-500").await, "open");
    // Adding another model leaves `m` and its provider as they were: the breaker stays open and
    // nothing more goes upstream.
    rewrite(&s, &m, &format!("{m}{}", model("n", &[dep("enn")], "")));
    let (status, v) = reload(&s).await;
    assert_eq!(status, 200, "{v:#}");
    let calls = up.request_count();
    let d = deployment(&s, "m", "up/fault-500").await;
    assert_eq!(d["breaker"]["state"], "open", "{d:#}");
    assert_eq!(d["requests"], 1, "{d:#}");
    let a = chat(&http, &s, "m", false).await;
    assert_eq!(a.error_code(), "no_healthy_deployment", "{}", a.text);
    assert_eq!(up.request_count(), calls);
    chat_ok(&http, &s, "n").await;
    // Changing the breaker's settings starts the deployment afresh.
    let fresh = model(
        "m",
        &[dep(models::FAULT_500)],
        &sub(
            "m",
            "circuit_breaker",
            "consecutive_failures = 2\ncooldown_secs = 60",
        ),
    );
    rewrite(&s, &m, &fresh);
    let (status, v) = reload(&s).await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(breaker_state(&s, "m", "up/fault-500").await, "closed");
}

#[tokio::test]
async fn sighup_reloads_the_configuration() {
    let up = MockUpstream::start().await;
    let m_one = model("m", &[dep("one")], "");
    let s = start(&up, std::slice::from_ref(&m_one)).await;
    let http = client();
    chat_ok(&http, &s, "m").await;
    rewrite(&s, &m_one, &model("m", &[dep("two")], ""));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.count_for("two") == 0 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        chat_ok(&http, &s, "m").await;
    }
    // Once reloaded, "m" stays on the new deployment.
    let one = up.count_for("one");
    for _ in 0..3 {
        chat_ok(&http, &s, "m").await;
    }
    assert_eq!(up.count_for("one"), one);
    // The reload is in the audit log, by the signal.
    let log: Value = http
        .get(s.url("/api/audit"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = log["data"].as_array().expect("entries");
    assert!(
        entries.iter().any(|e| e["actor"] == "sighup"
            && e["action"] == "config.reload"
            && e["outcome"] == "ok"),
        "{log:#}"
    );
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_old_router() {
    let up = MockUpstream::start().await;
    let m_slow = model("m", &[dep(models::SLOW_STREAM)], "");
    let s = start(&up, std::slice::from_ref(&m_slow)).await;
    let http = client();
    // The answer's headers come with the first token; 39 more follow over ~2 s.
    let resp = post(&http, &s, "m", true).await;
    assert_eq!(resp.status(), 200);
    rewrite(&s, &m_slow, &model("m", &[dep("two")], ""));
    let (status, v) = reload(&s).await;
    assert_eq!(status, 200, "{v:#}");
    let a = answer(resp).await;
    let content = a.assert_normal_stream();
    let expected: String = (0..40).map(|i| format!("tok{i} ")).collect();
    assert_eq!(content, expected);
    let rec = s.record(&a.id).await;
    assert_eq!(rec["status"], "ok", "{rec:#}");
    assert_eq!(rec["deployment"], models::SLOW_STREAM, "{rec:#}");
    chat_ok(&http, &s, "m").await;
    assert_eq!(up.count_for("two"), 1);
}

// ---------------------------------------------------------------------------------------------
// x-sluice-route
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_route_header_names_group_and_deployment() {
    let up = MockUpstream::start().await;
    let s = start(&up, &[model("m", &[dep("good")], "")]).await;
    let http = client();
    for stream in [false, true] {
        let a = chat(&http, &s, "m", stream).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(
            a.route.as_deref(),
            Some("group=m; deployment=up/good; attempts=1"),
            "stream: {stream}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Active health checks
// ---------------------------------------------------------------------------------------------

/// Health checks probe deployments with no user traffic: an unreachable upstream's breaker opens
/// and requests avoid it from the first one; a reachable one is probed with `GET /v1/models`.
#[tokio::test]
async fn active_health_checks_open_the_breaker_of_an_unreachable_deployment() {
    let up = MockUpstream::start().await;
    // A port nothing listens on: bind one, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let config = format!(
        "{}[providers.dead]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:{dead_port}/v1\"\napi_key = \"k\"\ntimeouts = {{ connect_secs = 1, request_secs = 2 }}\n{}{}{}",
        provider(&up),
        model(
            "m",
            &[
                dep("good"),
                "{ provider = \"dead\", model = \"gone\", weight = 1000 }".to_string()
            ],
            "",
        ),
        sub("m", "health_check", "interval_secs = 0.1\ntimeout_secs = 1"),
        sub(
            "m",
            "circuit_breaker",
            "consecutive_failures = 2\ncooldown_secs = 60"
        ),
    );
    let s = Sluice::start(&config).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = deployment(&s, "m", "dead/gone").await;
        if d["breaker"]["state"] == "open" {
            assert_eq!(d["health"]["ok"], false, "{d:#}");
            assert!(d["health"]["error"].is_string(), "{d:#}");
            assert_eq!(d["requests"], 0, "opened by health checks alone: {d:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead deployment's breaker never opened: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let good = deployment(&s, "m", "up/good").await;
    assert_eq!(good["health"]["ok"], true, "{good:#}");
    assert_eq!(good["breaker"]["state"], "closed", "{good:#}");
    assert!(
        up.requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == "/v1/models"),
        "the healthy upstream was probed with GET /v1/models"
    );
    // Weight 1000 would send nearly everything to the dead deployment; its open breaker sends
    // every request to the good one, on the first attempt.
    let http = client();
    for _ in 0..10 {
        let a = chat_ok(&http, &s, "m").await;
        let rec = s.record(&a.id).await;
        assert_eq!(rec["attempts"], 1, "{rec:#}");
        assert_eq!(rec["provider"], "up", "{rec:#}");
    }
}
