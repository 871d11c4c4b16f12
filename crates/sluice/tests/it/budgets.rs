//! Budgets and usage end to end: a key's daily budget refuses requests with 429
//! `insufficient_quota` once the worst case no longer fits, concurrent requests never overshoot,
//! a second replica on the same store starts from the stored spend, `[budgets]` covers users and
//! teams, and `/api/usage` and `sluice usage` report the spend.

use serde_json::{Value, json};

use crate::harness::{BIN, Opts, Sluice};

/// Every token costs $0.01 (input and output) on `pricey`.
const PRICED: &str = r#"
[providers.mock]
type = "mock"

[models.pricey]
deployments = [{ provider = "mock", model = "pricey", input_cost_per_mtok = 10000.0, output_cost_per_mtok = 10000.0 }]
"#;

async fn create_key(s: &Sluice, spec: Value) -> (String, String) {
    let v = s.create_key(spec).await;
    (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

/// "a b c d" → 4 words: the mock answers the last user message, and reports whitespace words as
/// tokens.
async fn chat(s: &Sluice, key: &str, words: usize, user: Option<&str>) -> (u16, Value) {
    let text = vec!["w"; words].join(" ");
    let mut body = json!({"model": "pricey", "max_tokens": 20,
                          "messages": [{"role": "user", "content": text}]});
    if let Some(u) = user {
        body["user"] = json!(u);
    }
    post_chat(s, key, &body).await
}

/// Sends a chat completion body with a key: the status and the JSON answer.
async fn post_chat(s: &Sluice, key: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("chat");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn usage(s: &Sluice, query: &str) -> Value {
    let resp = reqwest::get(s.url(&format!("/api/usage?{query}")))
        .await
        .expect("GET /api/usage");
    assert_eq!(resp.status(), 200, "/api/usage?{query}");
    resp.json().await.unwrap()
}

/// Waits until the log holds `n` records of the key (the writer batches).
async fn wait_records(s: &Sluice, key_id: &str, n: u64) -> Value {
    let start = std::time::Instant::now();
    loop {
        let u = usage(s, &format!("key={key_id}&group_by=none")).await;
        if u["total"]["requests"].as_u64() == Some(n) {
            return u;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "expected {n} records: {u:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_key_budget_is_never_overshot_and_survives_a_restart() {
    let s = Sluice::start(PRICED).await;
    let (key, id) = create_key(
        &s,
        json!({"name": "capped", "budget": {"daily_usd": 1.0}, "owner": {"team": "search"}}),
    )
    .await;
    // Each request: 10 prompt + 10 completion tokens = $0.20; its worst case (19 prompt bytes
    // + 8 per message, plus max_tokens 20 = 47 tokens) = $0.47. So requests go through while
    // the spend is at most $0.53: at $0, $0.20 and $0.40.
    let mut ok = 0;
    let refused = loop {
        let (status, body) = chat(&s, &key, 10, None).await;
        match status {
            200 => ok += 1,
            429 => break body,
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(ok < 10, "the budget never stopped the key");
    };
    assert_eq!(
        refused["error"]["code"], "insufficient_quota",
        "{refused:#}"
    );
    assert_eq!(refused["error"]["type"], "insufficient_quota");
    let msg = refused["error"]["message"].as_str().unwrap();
    assert!(msg.contains("daily budget of $1 ($0.60 spent)"), "{msg}");
    let u = wait_records(&s, &id, ok + 1).await;
    let spent = u["total"]["cost_usd"].as_f64().unwrap();
    assert!(spent <= 1.0 + 1e-9, "spent {spent} over the budget");
    assert!(spent > 1.0 - 0.47, "refused too early at {spent}");
    assert_eq!(
        ok, 3,
        "three requests fit under $1.00 with a worst case of $0.47"
    );

    // A second replica on the same store starts from the stored spend.
    let s2 = Sluice::start_opts(Opts {
        config: PRICED,
        store_url: Some(s.store_url.clone()),
        ..Opts::default()
    })
    .await;
    // Keys reach the replica through the store within a second.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let (status, body) = chat(&s2, &key, 10, None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    // Spent, not merely held by requests in flight: the SDKs are told not to retry, and when
    // trying again makes sense (the next UTC day).
    let ten_words = ["w"; 10].join(" ");
    let resp = reqwest::Client::new()
        .post(s2.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "pricey", "max_tokens": 20,
                      "messages": [{"role": "user", "content": ten_words}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let midnight = 86_400 - chrono::Utc::now().timestamp() as u64 % 86_400;
    assert!(
        wait.abs_diff(midnight) <= 5,
        "{wait} s vs {midnight} s to midnight"
    );

    wait_records(&s, &id, ok + 3).await;

    // Usage by key and team, by model and day.
    let by_key = usage(&s, "group_by=key,team").await;
    let row = by_key["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == id.as_str())
        .unwrap_or_else(|| panic!("{by_key:#}"));
    assert_eq!(row["team"], "search");
    assert_eq!(row["requests"], 6, "3 served and 3 refused: {row}");
    assert_eq!(row["errors"], 3);
    assert_eq!(row["prompt_tokens"], 30);
    let by_day = usage(&s, "group_by=model,day").await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(by_day["data"][0]["model"], "pricey", "{by_day:#}");
    assert_eq!(by_day["data"][0]["day"], today.as_str());
    let bad = reqwest::get(s.url("/api/usage?group_by=week"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // The CLI reads the same from the store.
    let out = std::process::Command::new(BIN)
        .args([
            "usage",
            "--store",
            &s.store_url,
            "--group-by",
            "key",
            "--json",
        ])
        .output()
        .expect("sluice usage");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("usage json");
    assert_eq!(v["total"]["requests"], 6, "{v:#}");
    assert_eq!(v["object"], "usage", "the shape of GET /api/usage: {v:#}");
    let table = std::process::Command::new(BIN)
        .args(["usage", "--store", &s.store_url, "-g", "team,model"])
        .output()
        .expect("sluice usage");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("search") && text.contains("pricey") && text.contains("TOTAL"),
        "{text}"
    );
    let wrong = std::process::Command::new(BIN)
        .args(["usage", "--store", &s.store_url, "-g", "week"])
        .output()
        .expect("sluice usage");
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("`week`"));
}

#[tokio::test]
async fn concurrent_requests_do_not_overshoot_a_budget() {
    let s = Sluice::start(PRICED).await;
    let (key, id) = create_key(&s, json!({"name": "burst", "budget": {"total_usd": 1.5}})).await;
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (k, base) = (key.clone(), s.base.clone());
        tasks.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(k)
                .json(&json!({"model": "pricey", "max_tokens": 20,
                              "messages": [{"role": "user", "content": "w w w w w w w w w w"}]}))
                .send()
                .await
                .expect("chat");
            resp.status().as_u16()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        ok >= 3,
        "at least three $0.47 worst cases fit in $1.50: {ok}"
    );
    let u = wait_records(&s, &id, 24).await;
    let spent = u["total"]["cost_usd"].as_f64().unwrap();
    assert!(spent <= 1.5 + 1e-9, "{ok} served, spent {spent} over $1.50");
}

#[tokio::test]
async fn user_and_team_budgets_from_the_config() {
    let config = format!(
        "{PRICED}\n[budgets]\nper_user = {{ daily_usd = 0.5 }}\nteams = {{ ml = {{ monthly_usd = 100.0 }} }}\n"
    );
    let s = Sluice::start(&config).await;
    let (key, _) = create_key(&s, json!({"name": "ml-svc", "owner": {"team": "ml"}})).await;
    // alice: the first request ($0.47 worst case) fits in $0.50; after it ($0.20 spent) the
    // second does not.
    assert_eq!(chat(&s, &key, 10, Some("alice")).await.0, 200);
    let (status, body) = chat(&s, &key, 10, Some("alice")).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("user `alice`"),
        "{body}"
    );
    // bob has his own budget.
    assert_eq!(chat(&s, &key, 10, Some("bob")).await.0, 200);
    // A request's own metadata cannot move its spend to another team (or off its own).
    for meta in [r#"{"team":"other"}"#, "{}"] {
        let resp = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-sluice-metadata", meta)
            .json(
                &json!({"model": "pricey", "max_tokens": 20, "user": "carol",
                          "metadata": {"team": "other"},
                          "messages": [{"role": "user", "content": "w"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let start = std::time::Instant::now();
    let teams = loop {
        let u = usage(&s, "group_by=team").await;
        if u["total"]["requests"] == 5 {
            break u;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5), "{u:#}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let rows = teams["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{teams:#}");
    assert_eq!(rows[0]["team"], "ml");
    assert_eq!(rows[0]["requests"], 5);
    // At most 128 choices.
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(
            &json!({"model": "pricey", "n": 4294967295u32, "max_tokens": 4294967295u32,
                      "messages": [{"role": "user", "content": "w"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

/// A request a budget refuses counts against no rate limit, in process and in Redis: a key out
/// of budget kept hearing `insufficient_quota` until its refusals had used its rpm, then heard
/// `rate_limit_exceeded` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_budget_refuses_uses_no_rate_limit() {
    let redis = if sluice_testkit::redis::redis_available() {
        Some(tokio::task::block_in_place(sluice_testkit::redis::TempRedis::start).expect("redis"))
    } else {
        assert_ne!(
            std::env::var("SLUICE_REQUIRE_REDIS").as_deref(),
            Ok("1"),
            "redis-server is required (SLUICE_REQUIRE_REDIS=1) but was not found"
        );
        None
    };
    let mut setups = vec![PRICED.to_string()];
    if let Some(r) = &redis {
        setups.push(format!("{PRICED}\n[state]\nredis_url = \"{}\"\n", r.url()));
    }
    for config in setups {
        let s = Sluice::start(&config).await;
        // A worst case of about $0.21 never fits in $0.01.
        let (key, _) = create_key(
            &s,
            json!({"name": "poor", "rpm": 3, "tpm": 1000, "budget": {"total_usd": 0.01}}),
        )
        .await;
        for i in 0..6 {
            let (status, body) = chat(&s, &key, 1, None).await;
            assert_eq!(status, 429, "{body}");
            assert_eq!(
                body["error"]["code"], "insufficient_quota",
                "request {i}: {body} ({config})"
            );
        }
    }
}

/// A structured-output schema and the legacy `functions` list are prompt the upstream bills:
/// the worst case counts them, so one request cannot spend many times a key's budget.
#[tokio::test]
async fn a_budget_counts_a_response_format_and_functions_in_the_worst_case() {
    let s = Sluice::start(PRICED).await;
    let (key, _) = create_key(&s, json!({"name": "k", "budget": {"total_usd": 1.0}})).await;
    let long = "x".repeat(20_000);
    let send = |extra: Value| {
        let (s, key) = (&s, &key);
        async move {
            let mut body = json!({"model": "pricey", "max_tokens": 1,
                                  "messages": [{"role": "user", "content": "w"}]});
            for (k, v) in extra.as_object().expect("object") {
                body[k] = v.clone();
            }
            post_chat(s, key, &body).await
        }
    };
    let schema = json!({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": long}}}});
    let functions = json!({"functions": [{"name": "f", "description": long,
                                          "parameters": {"type": "object"}}]});
    for extra in [schema, functions] {
        let (status, body) = send(extra).await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("request too large"), "{message}");
    }
    let (status, body) = send(json!({})).await;
    assert_eq!(status, 200, "{body}");
}

/// A request with no `max_tokens` sent to an Anthropic deployment goes upstream with a cap of
/// 4096: the worst case counts that, not a lower `default_max_tokens`.
#[tokio::test]
async fn an_anthropic_deployments_own_cap_is_the_worst_case_without_max_tokens() {
    let up = sluice_testkit::MockUpstream::start().await;
    let config = format!(
        "[providers.claude]\ntype = \"anthropic\"\nbase_url = \"{}\"\napi_key = \"k\"\n\
         [models.claude]\ndeployments = [{{ provider = \"claude\", model = \"echo\", input_cost_per_mtok = 10000.0, output_cost_per_mtok = 10000.0 }}]\n\
         [budgets]\ndefault_max_tokens = 16\n",
        up.base_url()
    );
    let s = Sluice::start(&config).await;
    let (key, _) = create_key(&s, json!({"name": "k", "budget": {"total_usd": 1.0}})).await;
    // 16 tokens would fit in $1 at $0.01 a token; 4096 do not.
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": "w"}]});
    let (status, answer) = post_chat(&s, &key, &body).await;
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["code"], "insufficient_quota", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(message.contains("request too large"), "{message}");
    // With a cap of its own it fits.
    let mut capped = body.clone();
    capped["max_tokens"] = json!(16);
    let (status, answer) = post_chat(&s, &key, &capped).await;
    assert_eq!(status, 200, "{answer}");
}
