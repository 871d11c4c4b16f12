//! Two `sluice serve` replicas sharing one real Redis and one real PostgreSQL: a global rpm limit
//! of N admits exactly N across both, a budget is not overshot, an answer cached by one is a hit
//! on the other, a key revoked on one is refused by the other within a second, a key's
//! max_parallel slot is free again once its answer is in; and when Redis
//! goes away, fail-open carries on with local limits (logged loudly) while fail-closed answers
//! 503 until it is back.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_testkit::TempPostgres;
use sluice_testkit::redis::TempRedis;

use crate::harness::{Opts, Sluice};

fn services_available() -> bool {
    let pg = sluice_testkit::postgres_available();
    let redis = sluice_testkit::redis::redis_available();
    if pg && redis {
        return true;
    }
    for (var, ok, what) in [
        ("SLUICE_REQUIRE_PG", pg, "PostgreSQL (initdb, pg_ctl)"),
        ("SLUICE_REQUIRE_REDIS", redis, "redis-server"),
    ] {
        assert!(
            ok || std::env::var(var).as_deref() != Ok("1"),
            "{what} is required ({var}=1) but was not found"
        );
    }
    eprintln!("skipping: PostgreSQL or Redis not installed");
    false
}

fn config(redis_url: &str, policy: &str) -> String {
    format!(
        r#"
[providers.mock]
type = "mock"

[models.limited]
deployments = [{{ provider = "mock", model = "limited" }}]

[models.pricey]
deployments = [{{ provider = "mock", model = "pricey", input_cost_per_mtok = 10000.0, output_cost_per_mtok = 10000.0 }}]

[limits.models.limited]
rpm = 10

[cache]
enabled = true
namespace = "global"

[state]
redis_url = "{redis_url}"
on_redis_failure = "{policy}"
"#
    )
}

async fn post(s: &Sluice, key: Option<&str>, body: &Value) -> (u16, Option<String>, Value) {
    let mut rb = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.expect("chat");
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-sluice-cache")
        .map(|v| v.to_str().unwrap().to_string());
    (status, cache, resp.json().await.unwrap_or(Value::Null))
}

/// `n` requests at once, spread over `nodes`; their statuses.
async fn burst(
    nodes: &[&Sluice],
    n: usize,
    key: Option<&str>,
    body: impl Fn(usize) -> Value,
) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut rb = reqwest::Client::new()
                .post(format!(
                    "{}/v1/chat/completions",
                    nodes[i % nodes.len()].base
                ))
                .json(&body(i));
            if let Some(k) = key {
                rb = rb.bearer_auth(k);
            }
            tokio::spawn(async move { rb.send().await.expect("chat").status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("request task"));
    }
    statuses
}

fn ask(model: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": text}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_limits_budgets_cache_and_keys_through_redis() {
    if !services_available() {
        return;
    }
    let mut redis = tokio::task::block_in_place(TempRedis::start).expect("start redis");
    let pg = tokio::task::block_in_place(TempPostgres::start).expect("start postgres");
    let url = tokio::task::block_in_place(|| pg.create_database("multinode")).expect("create db");
    let cfg = config(&redis.url(), "open");
    let opts = || Opts {
        config: &cfg,
        store_url: Some(url.clone()),
        ..Opts::default()
    };
    let a = Sluice::start_opts(opts()).await;
    let b = Sluice::start_opts(opts()).await;
    let nodes = [&a, &b];

    // 1. rpm = 10 on `limited`, 30 concurrent requests over both replicas: exactly 10 pass.
    let statuses = burst(&nodes, 30, None, |i| {
        ask("limited", &format!("request {i}"))
    })
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 20);

    // 2. A key with a $1.50 budget, 24 concurrent requests over both replicas.
    let created = a
        .create_key(json!({"name": "shared", "budget": {"total_usd": 1.5}}))
        .await;
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(800)).await; // the key reaches b through the store
    let statuses = burst(&nodes, 24, Some(&key), |i| {
        ask("pricey", &format!("w w w w w w w w w {i}"))
    })
    .await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 3, "three $0.47 worst cases fit in $1.50: {ok}");
    let start = Instant::now();
    let spent = loop {
        let u: Value = reqwest::get(a.url(&format!("/api/usage?key={key_id}&group_by=none")))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if u["total"]["requests"] == 24 {
            break u["total"]["cost_usd"].as_f64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{u:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        spent <= 1.5 + 1e-9,
        "{ok} served over two replicas spent {spent} > $1.50"
    );
    assert!(spent > 1.5 - 0.47 - 1e-9, "stopped too early at {spent}");

    // From here on a key is needed (keys exist now): one without a budget.
    let created = a.create_key(json!({"name": "plain"})).await;
    let plain = created["key"].as_str().unwrap().to_string();
    let plain = Some(plain.as_str());
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 3. An answer cached by a is a hit on b.
    let q = json!({"model": "pricey", "temperature": 0,
                   "messages": [{"role": "user", "content": "cache me"}]});
    let (status, cache, body) = post(&a, plain, &q).await;
    assert_eq!((status, cache.as_deref()), (200, Some("miss")), "{body}");
    let (status, cache, body) = post(&b, plain, &q).await;
    assert_eq!((status, cache.as_deref()), (200, Some("hit")), "{body}");
    // Cleared on a, it is gone from b's memory within a couple of seconds.
    let r = reqwest::Client::new()
        .delete(a.url("/api/cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared = Instant::now();
    loop {
        let (status, cache, body) = post(&b, plain, &q).await;
        assert_eq!(status, 200, "{body}");
        if cache.as_deref() == Some("miss") {
            break;
        }
        assert!(
            cleared.elapsed() < Duration::from_secs(3),
            "b still serves the cleared answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 4. A key revoked on a is refused by b within a second.
    let created = a.create_key(json!({"name": "doomed"})).await;
    let doomed = created["key"].as_str().unwrap().to_string();
    let doomed_id = created["id"].as_str().unwrap().to_string();
    let start = Instant::now();
    while post(&b, Some(&doomed), &ask("pricey", "hi")).await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the new key never reached b"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .delete(a.url(&format!("/api/keys/{doomed_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let revoked = Instant::now();
    loop {
        let (status, _, body) = post(&b, Some(&doomed), &ask("pricey", "hi")).await;
        if status == 401 {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("revoked"),
                "{body}"
            );
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "b still accepts a key revoked on a after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // 5. A key with max_parallel = 1 used one request at a time, plain and streamed: each answer
    // gives its slot back before it ends, so none is refused (the slot was given back in the
    // background, and the next request often found it still held).
    let created = a
        .create_key(json!({"name": "serial", "max_parallel": 1}))
        .await;
    let serial = created["key"].as_str().unwrap().to_string();
    // One connection, kept alive, as an SDK's: the next request follows the answer at once.
    let http = reqwest::Client::new();
    for i in 0..40 {
        let mut body = ask("pricey", &format!("one at a time {i}"));
        body["stream"] = json!(i % 2 == 1);
        let resp = http
            .post(a.url("/v1/chat/completions"))
            .bearer_auth(&serial)
            .json(&body)
            .send()
            .await
            .expect("chat");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("the whole answer");
        assert_eq!(status, 200, "request {i}: {text}");
    }

    // 6. Redis goes away. Fail-open (a and b): requests go on under local limits, logged
    // loudly. Fail-closed (c): 503 until Redis is back.
    let closed_cfg = config(&redis.url(), "closed");
    let c = Sluice::start_opts(Opts {
        config: &closed_cfg,
        store_url: Some(url.clone()),
        ..Opts::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        post(&c, plain, &ask("limited", "before")).await.0,
        429,
        "limited's minute is used up"
    );
    assert_eq!(post(&c, plain, &ask("pricey", "before")).await.0, 200);
    tokio::task::block_in_place(|| redis.stop());
    let (status, _, body) = post(&a, plain, &ask("pricey", "while down")).await;
    assert_eq!(status, 200, "fail-open: {body}");
    // Local limits apply meanwhile: a's own `limited` window saw only its own requests.
    let (status, _, _) = post(&a, plain, &ask("limited", "local")).await;
    assert!(status == 200 || status == 429, "{status}");
    let (status, _, body) = post(&c, plain, &ask("limited", "while down")).await;
    assert_eq!(status, 503, "fail-closed: {body}");
    assert_eq!(body["error"]["code"], "shared_state_unavailable", "{body}");
    let start = Instant::now();
    while !a.stderr().contains("FAILING OPEN") {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no loud log: {}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    let start = Instant::now();
    loop {
        let (status, _, _) = post(&c, plain, &ask("pricey", "after")).await;
        if status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "c never recovered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
