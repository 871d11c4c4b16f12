//! Virtual keys end to end: `/api/keys`, authentication on `/v1` with them, model allow-lists,
//! attribution on the record, rotation, revocation, expiry, a second replica on the same store,
//! and the key never being stored.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Opts, Sluice, request_id};
use crate::openai_api::MOCK;

async fn create(s: &Sluice, spec: Value) -> Value {
    s.create_key(spec).await
}

/// A chat request with `key` (or none); returns (status, request id, body).
async fn chat(s: &Sluice, key: Option<&str>, model: &str) -> (u16, String, Value) {
    let mut rb = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let resp = rb.send().await.expect("chat");
    let status = resp.status().as_u16();
    let id = request_id(&resp);
    (status, id, resp.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// The bootstrap admin key of [`with_admin`].
const ADMIN: &str = "bootstrap-admin-key";

/// A gateway on the mock provider with the admin key [`ADMIN`].
async fn with_admin() -> Sluice {
    Sluice::start_opts(Opts {
        config: MOCK,
        admin_key: Some(ADMIN),
        ..Opts::default()
    })
    .await
}

/// A call with `key` (and a JSON body): its status and JSON answer (null when it has none).
async fn api(
    s: &Sluice,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method, s.url(path));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn virtual_keys_authenticate_attribute_and_expire() {
    let s = Sluice::start(MOCK).await;
    // With no key issued and no admin key, the local gateway is open: any key string passes.
    assert_eq!(chat(&s, Some("unused"), "mock-echo").await.0, 200);

    let created = create(
        &s,
        json!({"name": "search-svc", "models": ["mock-echo"],
               "owner": {"user": "alice", "team": "search"}, "rpm": 100,
               "metadata": {"env": "test"}}),
    )
    .await;
    let key = created["key"]
        .as_str()
        .expect("the key is shown once")
        .to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-sluice-"), "{key}");
    assert!(
        created.get("hash").is_none() && created.get("key_hash").is_none(),
        "{created:#}"
    );

    // Listing never shows the key.
    let list: Value = reqwest::get(s.url("/api/keys"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = list.to_string();
    assert!(
        text.contains(&id) && text.contains("search-svc"),
        "{list:#}"
    );
    assert!(
        !text.contains(&key),
        "the key leaks from the list: {list:#}"
    );
    // Each with its status, as `sluice keys list --json` shows it.
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["status"] == "active"),
        "{list:#}"
    );

    // Now keys are in force: none, or a foreign one, is refused.
    let (st, _, body) = chat(&s, None, "mock-echo").await;
    assert_eq!((st, code(&body)), (401, "invalid_api_key"), "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing API key"),
        "{body:#}"
    );
    let (st, _, body) = chat(&s, Some("unused"), "mock-echo").await;
    assert_eq!(st, 401, "{body:#}");
    let (st, _, body) = chat(&s, Some(&format!("{key}x")), "mock-echo").await;
    assert_eq!(st, 401, "a wrong secret: {body:#}");
    // The Anthropic SDK's routes answer in its shape, with its request-id header.
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let resp = reqwest::Client::new()
            .post(s.url(path))
            .json(&json!({"model": "mock-echo", "max_tokens": 5,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert!(resp.headers().contains_key("request-id"), "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            (body["type"].as_str(), body["error"]["type"].as_str()),
            (Some("error"), Some("authentication_error")),
            "{path}: {body:#}"
        );
    }

    // The key works, and the record is attributed to it.
    let (st, rid, body) = chat(&s, Some(&key), "mock-echo").await;
    assert_eq!(st, 200, "{body:#}");
    let rec = s.record(&rid).await;
    assert_eq!(rec["key_id"], id.as_str(), "{rec:#}");
    assert_eq!(rec["user"], "alice", "{rec:#}");
    assert_eq!(rec["metadata"]["team"], "search", "{rec:#}");
    let by_key = s.list(&format!("key={id}")).await;
    assert_eq!(
        by_key["data"].as_array().map(Vec::len),
        Some(1),
        "{by_key:#}"
    );

    // A key of a user speaks for that user whatever the request names (it spent another
    // user's budget); a key with no user takes the user the request names: the body's, and the
    // header's before that.
    let app = s
        .create_key(json!({"name": "app", "models": ["mock-echo"]}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let named = |key: &str, user: Option<&str>, header: Option<&str>| {
        let mut body =
            json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        let mut rb = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        if let Some(h) = header {
            rb = rb.header("x-sluice-user", h);
        }
        rb.send()
    };
    let r = named(&key, Some("bob"), Some("carol")).await.unwrap();
    assert_eq!(s.record(&request_id(&r)).await["user"], "alice");
    let r = named(&app, Some("bob"), None).await.unwrap();
    assert_eq!(s.record(&request_id(&r)).await["user"], "bob");
    // The auth scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let r = reqwest::Client::new()
            .post(s.url("/v1/chat/completions"))
            .header("authorization", format!("{scheme} {key}"))
            .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    // `/v1/models` lists what the key may use.
    let models: Value = reqwest::Client::new()
        .get(s.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["mock-echo"], "{models:#}");
    let hidden = reqwest::Client::new()
        .get(s.url("/v1/models/priced"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(hidden.status(), 404);
    let body: Value = hidden.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        !msg.contains("priced, ") && msg.ends_with("mock-echo"),
        "{msg}"
    );
    let r = named(&app, Some("bob"), Some("carol")).await.unwrap();
    assert_eq!(s.record(&request_id(&r)).await["user"], "carol");

    // The Anthropic route takes it as x-api-key.
    let resp = reqwest::Client::new()
        .post(s.url("/v1/messages"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "mock-echo", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The OpenAI SDKs' Azure clients send it as api-key, and name the model in the path.
    let azure = |model: &str| {
        reqwest::Client::new()
            .post(s.url(&format!(
                "/openai/deployments/{model}/chat/completions?api-version=2024-10-21"
            )))
            .header("api-key", &key)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(azure("mock-echo").await.unwrap().status(), 200);
    assert_eq!(azure("priced").await.unwrap().status(), 403);

    // A model outside the key's list is refused and recorded.
    let (st, rid, body) = chat(&s, Some(&key), "priced").await;
    assert_eq!((st, code(&body)), (403, "model_not_allowed"), "{body:#}");
    assert_eq!(s.record(&rid).await["error_code"], "model_not_allowed");

    // Rotation: the old key stops, the new one works, the id stays.
    let resp = reqwest::Client::new()
        .post(s.url(&format!("/api/keys/{id}/rotate")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rotated: Value = resp.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(rotated["id"], id.as_str());
    let (st, rid, body) = chat(&s, Some(&key), "mock-echo").await;
    assert_eq!(st, 401);
    // The old secret is told apart from a key that does not exist; its record names no key
    // (whoever sent it does not hold the key now).
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("rotated"), "{message}");
    assert!(s.record(&rid).await["key_id"].is_null());
    assert_eq!(chat(&s, Some(&new_key), "mock-echo").await.0, 200);

    // Revocation.
    let resp = reqwest::Client::new()
        .delete(s.url(&format!("/api/keys/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let revoked: Value = resp.json().await.unwrap();
    assert_eq!(revoked["status"], "revoked", "{revoked:#}");
    let (st, rid, body) = chat(&s, Some(&new_key), "mock-echo").await;
    assert_eq!(st, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body:#}"
    );
    // The refused request of a revoked key's holder is on the key's record.
    assert_eq!(s.record(&rid).await["key_id"], id.as_str());
    let again = reqwest::Client::new()
        .delete(s.url(&format!("/api/keys/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);

    // Expiry.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let short = create(&s, json!({"name": "short", "expires_at": soon})).await;
    let short_key = short["key"].as_str().unwrap().to_string();
    assert_eq!(chat(&s, Some(&short_key), "mock-echo").await.0, 200);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (st, _, body) = chat(&s, Some(&short_key), "mock-echo").await;
    assert_eq!(st, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body:#}"
    );
    // An expired key is not rotated into a secret that would be refused at once.
    let resp = reqwest::Client::new()
        .post(s.url(&format!(
            "/api/keys/{}/rotate",
            short["id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body:#}"
    );
    // A misspelt budget is refused, not taken for no budget.
    let resp = reqwest::Client::new()
        .post(s.url("/api/keys"))
        .json(&json!({"name": "b", "budget": {"daily": 5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Bad specs are clear 400s.
    let resp = reqwest::Client::new()
        .post(s.url("/api/keys"))
        .json(&json!({"name": "x", "rpm": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = reqwest::Client::new()
        .post(s.url("/api/keys"))
        .json(&json!({"nom": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Only hashes are stored: the secret part of no key is anywhere in the database files.
    for k in [&key, &new_key, &short_key] {
        // `sk-sluice-<id>-<secret>`: the secret is base64url, so it may hold `-` itself.
        let secret = k.splitn(4, '-').nth(3).unwrap();
        assert!(secret.len() >= 32, "{k}");
        for f in ["sluice.db", "sluice.db-wal"] {
            let bytes = std::fs::read(s.dir().join(f)).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a key's secret is in {f}"
            );
        }
    }
}

/// A failed admin write whose error is long (serde quotes the field the client sent) keeps its
/// body when it is audited (past 64 KiB it was cut to nothing), and a misspelt owner field is
/// refused (a key with `teams` stood outside its team's budget).
#[tokio::test]
async fn failed_admin_writes_keep_their_error() {
    let s = Sluice::start(MOCK).await;
    // Each write fails: 400 with its error in the body.
    let refused = |spec: Value| {
        let url = s.url("/api/keys");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&spec)
                .send()
                .await
                .expect("POST /api/keys");
            assert_eq!(r.status(), 400);
            r.json::<Value>().await.expect("the error body")
        }
    };
    let mut spec = serde_json::Map::new();
    spec.insert("name".into(), json!("x"));
    spec.insert("f".repeat(70_000), json!(1));
    let body = refused(Value::Object(spec)).await;
    assert_eq!(code(&body), "invalid_request", "{body:#}");
    let body = refused(json!({"name": "svc", "owner": {"teams": "ml"}})).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("teams")),
        "{body:#}"
    );
}

/// A key created on one replica works on another sharing the store within a second, and a
/// revocation on one is enforced by the other within a second.
#[tokio::test]
async fn keys_propagate_between_replicas() {
    let a = Sluice::start(MOCK).await;
    let b = Sluice::start_opts(Opts {
        config: MOCK,
        store_url: Some(a.store_url.clone()),
        ..Opts::default()
    })
    .await;
    let created = create(&a, json!({"name": "shared"})).await;
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();

    let until_status = |want: u16| {
        let b = &b;
        let key = key.clone();
        async move {
            let start = Instant::now();
            loop {
                let (st, _, _) = chat(b, Some(&key), "mock-echo").await;
                if st == want {
                    return start.elapsed();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "replica b never answered {want} (last {st})"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let took = until_status(200).await;
    assert!(
        took < Duration::from_secs(2),
        "the new key reached b after {took:?}"
    );

    let resp = reqwest::Client::new()
        .delete(a.url(&format!("/api/keys/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let took = until_status(401).await;
    assert!(
        took < Duration::from_secs(2),
        "the revocation reached b after {took:?}"
    );
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A key's rpm and max_parallel are enforced with 429s that say when to retry, and every answer
/// carries OpenAI's `x-ratelimit-*` headers.
#[tokio::test]
async fn key_limits_answer_429_with_retry_after_and_ratelimit_headers() {
    let config = format!(
        "{MOCK}\n[providers.slow]\ntype = \"mock\"\nlatency_ms = 600\n\n[models.\"slow\"]\ndeployments = [{{ provider = \"slow\", model = \"slow\" }}]\n"
    );
    let s = Sluice::start(&config).await;
    let limited = create(&s, json!({"name": "limited", "rpm": 3, "tpm": 100000})).await;
    let key = limited["key"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let send = |model: &'static str| {
        http.post(s.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    for want in ["2", "1", "0"] {
        let resp = send("mock-echo").await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            header(&resp, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests").as_deref(),
            Some(want)
        );
        assert_eq!(
            header(&resp, "x-ratelimit-limit-tokens").as_deref(),
            Some("100000")
        );
        assert!(header(&resp, "x-ratelimit-reset-requests").is_some());
    }
    let resp = send("mock-echo").await.unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = header(&resp, "retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(
        header(&resp, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let id = request_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "rate_limit_exceeded", "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 requests per minute")
    );
    assert_eq!(s.record(&id).await["error_code"], "rate_limit_exceeded");

    // max_parallel = 1: a second request while one is in flight is refused, then admitted.
    let single = create(&s, json!({"name": "single", "max_parallel": 1})).await;
    let one = single["key"].as_str().unwrap().to_string();
    let post = |k: String| {
        let http = http.clone();
        let url = s.url("/v1/chat/completions");
        async move {
            http.post(url)
                .bearer_auth(k)
                .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let first = tokio::spawn(post(one.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(post(one.clone()).await, 429, "a second request in flight");
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(post(one).await, 200, "the slot was released");

    // A request estimated at more than a whole minute's tokens would never fit: refused outright
    // (it used to pass whenever the window was empty), with no Retry-After to wait for and
    // `x-should-retry: false` for the SDKs.
    let small = create(&s, json!({"name": "small", "tpm": 100})).await;
    let small = small["key"].as_str().unwrap().to_string();
    let ask = |max_tokens: u32| {
        http.post(s.url("/v1/chat/completions"))
            .bearer_auth(&small)
            .json(&json!({"model": "mock-echo", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let resp = ask(500).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(header(&resp, "retry-after").is_none());
    assert_eq!(header(&resp, "x-should-retry").as_deref(), Some("false"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(code(&body), "rate_limit_exceeded", "{body:#}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("request too large") && message.contains("100 tokens per minute"),
        "{message}"
    );
    assert_eq!(ask(50).await.unwrap().status(), 200, "one that fits passes");
}

/// Roles on the admin API: admin does everything, developer manages its own keys, viewer reads;
/// client keys have no admin access; every admin action (and refusal) is in the audit log.
#[tokio::test]
async fn roles_gate_the_admin_api_and_actions_are_audited() {
    let s = with_admin().await;
    let admin = Some(ADMIN);
    let mk = |name: &str, role: Option<&str>| {
        let mut spec = json!({"name": name});
        if let Some(r) = role {
            spec["role"] = json!(r);
        }
        spec
    };
    let (st, viewer) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        admin,
        Some(mk("v", Some("viewer"))),
    )
    .await;
    assert_eq!(st, 201, "{viewer:#}");
    let viewer = viewer["key"].as_str().unwrap().to_string();
    let (_, dev) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        admin,
        Some(mk("d", Some("developer"))),
    )
    .await;
    let dev = dev["key"].as_str().unwrap().to_string();
    let (_, client) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        admin,
        Some(mk("c", None)),
    )
    .await;
    let client_id = client["id"].as_str().unwrap().to_string();
    let client = client["key"].as_str().unwrap().to_string();

    // No key, and a client key, get nothing from /api.
    assert_eq!(
        api(&s, reqwest::Method::GET, "/api/keys", None, None)
            .await
            .0,
        401
    );
    let (st, body) = api(&s, reqwest::Method::GET, "/api/keys", Some(&client), None).await;
    assert_eq!(st, 403, "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("client key")
    );

    // The viewer reads, and nothing else (HEAD is a read too).
    for (method, path) in [
        (reqwest::Method::GET, "/api/requests"),
        (reqwest::Method::HEAD, "/api/deployments"),
        (reqwest::Method::GET, "/api/keys"),
        (reqwest::Method::GET, "/api/deployments"),
    ] {
        let (st, _) = api(&s, method.clone(), path, Some(&viewer), None).await;
        assert_eq!(st, 200, "{method} {path}");
    }
    let (st, body) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        Some(&viewer),
        Some(mk("x", None)),
    )
    .await;
    assert_eq!(st, 403, "{body:#}");
    assert_eq!(
        api(
            &s,
            reqwest::Method::POST,
            "/api/config/reload",
            Some(&viewer),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        api(&s, reqwest::Method::GET, "/api/audit", Some(&viewer), None)
            .await
            .0,
        403
    );

    // The developer creates client keys and manages its own, not others'.
    let (st, own) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        Some(&dev),
        Some(mk("mine", None)),
    )
    .await;
    assert_eq!(st, 201, "{own:#}");
    let own_id = own["id"].as_str().unwrap().to_string();
    let (st, _) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        Some(&dev),
        Some(mk("boss", Some("admin"))),
    )
    .await;
    assert_eq!(st, 403, "a developer cannot mint role keys");
    let (st, _) = api(
        &s,
        reqwest::Method::POST,
        &format!("/api/keys/{own_id}/rotate"),
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, body) = api(
        &s,
        reqwest::Method::DELETE,
        &format!("/api/keys/{client_id}"),
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(st, 403, "{body:#}");
    assert_eq!(
        api(
            &s,
            reqwest::Method::DELETE,
            &format!("/api/keys/{own_id}"),
            Some(&dev),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        api(&s, reqwest::Method::GET, "/api/audit", Some(&dev), None)
            .await
            .0,
        403
    );

    // A write that fails is recorded with its error's code: revoking a key that is gone.
    let (st, _) = api(
        &s,
        reqwest::Method::DELETE,
        &format!("/api/keys/{own_id}"),
        admin,
        None,
    )
    .await;
    assert_eq!(st, 404);

    // The admin sees who did what.
    let (st, log) = api(&s, reqwest::Method::GET, "/api/audit", admin, None).await;
    assert_eq!(st, 200, "{log:#}");
    // A limit out of range is refused as `/api/requests` refuses it (it was quietly 100).
    for bad in ["0", "abc", "5000"] {
        let (st, body) = api(
            &s,
            reqwest::Method::GET,
            &format!("/api/audit?limit={bad}"),
            admin,
            None,
        )
        .await;
        assert_eq!(st, 400, "limit={bad}: {body:#}");
        assert_eq!(body["error"]["param"], "limit", "{body:#}");
    }
    let (st, two) = api(&s, reqwest::Method::GET, "/api/audit?limit=2", admin, None).await;
    assert_eq!(st, 200, "{two:#}");
    assert_eq!(two["data"].as_array().map(Vec::len), Some(2), "{two:#}");
    let entries = log["data"].as_array().expect("entries");
    let has = |actor_prefix: &str, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with(actor_prefix))
                && e["action"] == action
                && e["outcome"] == outcome
        })
    };
    assert!(has("admin-key", "keys.create", "ok"), "{log:#}");
    assert!(
        has("key:", "keys.create", "ok"),
        "the developer's creation: {log:#}"
    );
    assert!(has("key:", "keys.rotate", "ok"), "{log:#}");
    assert!(has("key:", "keys.revoke", "forbidden"), "{log:#}");
    assert!(has("key:", "keys.revoke", "ok"), "{log:#}");
    assert!(
        has("key:", "denied", "forbidden"),
        "the viewer's refused POST: {log:#}"
    );
    // Refusals at the door, and a developer's attempt at a role key, are recorded too.
    assert!(has("anonymous", "denied", "invalid_api_key"), "{log:#}");
    assert!(
        entries
            .iter()
            .any(|e| e["actor"] == format!("key:{client_id}")
                && e["action"] == "denied"
                && e["outcome"] == "forbidden"),
        "the client key's refused GET: {log:#}"
    );
    assert!(has("key:", "keys.create", "forbidden"), "{log:#}");
    assert!(
        entries.iter().any(|e| e["actor"] == "admin-key"
            && e["action"] == "failed"
            && e["target"] == format!("DELETE /api/keys/{own_id}")
            && e["outcome"] == "not_found"),
        "the failed revocation: {log:#}"
    );
    assert!(
        entries
            .iter()
            .all(|e| e["at"].is_string() && e["role"].is_string())
    );
}

/// `[limits]`: a model's rpm and a per-user rpm apply to every caller, keyed or not; a request
/// refused by one limit gives back what the others took.
#[tokio::test]
async fn model_user_and_global_limits() {
    let config = format!(
        "{MOCK}\n[limits]\nper_user = {{ rpm = 2 }}\nglobal = {{ rpm = 1000 }}\n[limits.models.\"priced\"]\nrpm = 3\n"
    );
    let s = Sluice::start(&config).await;
    let http = reqwest::Client::new();
    let send = |model: &'static str, user: Option<&'static str>| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        http.post(s.url("/v1/chat/completions")).json(&body).send()
    };
    // The model limit: 3 a minute, whoever asks.
    for _ in 0..3 {
        assert_eq!(send("priced", None).await.unwrap().status(), 200);
    }
    let resp = send("priced", None).await.unwrap();
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model `priced`"),
        "{body:#}"
    );
    // Another model is not affected.
    assert_eq!(send("mock-echo", None).await.unwrap().status(), 200);

    // Per user: 2 a minute for each user, separately.
    for _ in 0..2 {
        assert_eq!(
            send("mock-echo", Some("alice")).await.unwrap().status(),
            200
        );
    }
    let resp = send("mock-echo", Some("alice")).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(header(&resp, "retry-after").is_some());
    assert_eq!(send("mock-echo", Some("bob")).await.unwrap().status(), 200);
}

/// A developer's keys stay within its own key: no other models, no looser limits, budgets or
/// expiry, no other team; what the request leaves out is its own. A developer limited to one
/// model minted an unrestricted key for another team's budget.
#[tokio::test]
async fn a_developer_mints_only_keys_within_its_own() {
    let s = with_admin().await;
    async fn mint(s: &Sluice, key: &str, spec: Value) -> (u16, Value) {
        api(s, reqwest::Method::POST, "/api/keys", Some(key), Some(spec)).await
    }
    let expiry = "2099-01-01T00:00:00Z";
    let (st, dev) = mint(
        &s,
        ADMIN,
        json!({"name": "dev", "role": "developer", "models": ["mock-echo"], "rpm": 10,
               "budget": {"total_usd": 1.0}, "expires_at": expiry,
               "owner": {"team": "ads"}}),
    )
    .await;
    assert_eq!(st, 201, "{dev:#}");
    let dev = dev["key"].as_str().unwrap().to_string();
    // Left out: its own.
    let (st, minted) = mint(&s, &dev, json!({"name": "svc"})).await;
    assert_eq!(st, 201, "{minted:#}");
    assert_eq!(minted["models"], json!(["mock-echo"]), "{minted:#}");
    assert_eq!(minted["rpm"], 10, "{minted:#}");
    assert_eq!(minted["budget"]["total_usd"], 1.0, "{minted:#}");
    assert_eq!(minted["owner"]["team"], "ads", "{minted:#}");
    assert!(
        minted["expires_at"]
            .as_str()
            .is_some_and(|e| e.starts_with("2099"))
    );
    // Narrower: fine.
    let (st, body) = mint(
        &s,
        &dev,
        json!({"name": "n", "rpm": 5, "budget": {"total_usd": 0.5}}),
    )
    .await;
    assert_eq!(st, 201, "{body:#}");
    // Past its own: refused, naming what.
    for (spec, what) in [
        (json!({"name": "x", "models": ["other"]}), "model `other`"),
        (json!({"name": "x", "rpm": 100}), "rpm 100"),
        (
            json!({"name": "x", "budget": {"total_usd": 5.0}}),
            "budget.total_usd",
        ),
        (
            json!({"name": "x", "expires_at": "2100-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"name": "x", "owner": {"team": "search"}}),
            "team `search`",
        ),
        (
            json!({"name": "x", "owner": {"user": "alice"}}),
            "user `alice`",
        ),
    ] {
        let (st, body) = mint(&s, &dev, spec.clone()).await;
        assert_eq!(st, 403, "{spec}: {body:#}");
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(what), "{spec}: {msg}");
    }
}

/// Refusals cannot flood the logs: a role key's refused actions are audited ten a second at
/// most (a viewer pushed the real admin actions out of `/api/audit`'s reach), and requests with
/// a key this gateway never issued are recorded a hundred a second at most.
#[tokio::test]
async fn refusals_cannot_flood_the_audit_log_or_the_request_log() {
    let s = with_admin().await;
    let http = reqwest::Client::new();
    let get = |path: &'static str| api(&s, reqwest::Method::GET, path, Some(ADMIN), None);
    let (_, viewer) = api(
        &s,
        reqwest::Method::POST,
        "/api/keys",
        Some(ADMIN),
        Some(json!({"name": "v", "role": "viewer"})),
    )
    .await;
    let viewer = viewer["key"].as_str().unwrap().to_string();
    // Each burst is sent at once and timed alone, so that a slow machine cannot spread it
    // over enough seconds to pass unthrottled.
    let started = std::time::Instant::now();
    let refused = futures::future::join_all((0..60).map(|_| {
        http.delete(s.url("/api/keys/nope"))
            .bearer_auth(&viewer)
            .send()
    }))
    .await;
    // The limits count by wall-clock second: a burst shorter than a second may touch two.
    let viewer_secs = started.elapsed().as_secs() + 2;
    assert!(refused.iter().all(|r| r.as_ref().unwrap().status() == 403));
    let started = std::time::Instant::now();
    let unknown = futures::future::join_all((0..400).map(|_| {
        http.post(s.url("/v1/chat/completions"))
            .bearer_auth("sk-sluice-not-a-key")
            .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    }))
    .await;
    let unknown_secs = started.elapsed().as_secs() + 2;
    assert!(unknown.iter().all(|r| r.as_ref().unwrap().status() == 401));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, audit) = get("/api/audit?limit=1000").await;
    let denied = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "denied" && e["role"] == "viewer")
        .count() as u64;
    assert!(
        (1..60).contains(&denied) && denied <= 10 * viewer_secs,
        "{denied} in {viewer_secs} s"
    );
    let (_, records) = get("/api/requests?status=error&limit=1000").await;
    let n = records["data"].as_array().unwrap().len() as u64;
    assert!(
        (1..400).contains(&n) && n <= 100 * unknown_secs,
        "{n} in {unknown_secs} s"
    );
    // The metrics count every one of them all the same.
    let metrics = http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_errors_total{") && l.contains("invalid_api_key"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= 400.0, "{counted}: {metrics}");
}

/// A whole key pasted where the API takes a key's id stands for its id, and its secret lands in
/// no answer, audit entry or log line (a refused revocation kept the path, secret and all, in
/// the audit log); a path of any length is cut in the audit log.
#[tokio::test]
async fn a_whole_key_in_a_path_never_reaches_the_logs() {
    use reqwest::Method;
    let s = with_admin().await;
    let as_admin = |method: Method, path: String| {
        let s = &s;
        async move { api(s, method, &path, Some(ADMIN), None).await }
    };
    let key = s.create_key(json!({"name": "pasted"})).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = key.rsplit('-').next().unwrap().to_string();
    let (st, shown) = as_admin(Method::GET, format!("/api/keys/{key}")).await;
    assert_eq!(st, 200, "{shown}");
    assert_eq!(shown["name"], "pasted");
    // Gone, then revoked again by the whole key: a refusal, audited without the secret.
    let (st, _) = as_admin(Method::DELETE, format!("/api/keys/{key}")).await;
    assert_eq!(st, 200);
    let unknown = format!("sk-sluice-0123456789abcdef-{secret}");
    let (st, body) = as_admin(Method::DELETE, format!("/api/keys/{unknown}")).await;
    assert_eq!(st, 404, "{body}");
    assert!(!body.to_string().contains(&secret), "{body}");
    let rotate = format!("/api/keys/sk-sluice-nothex-{secret}/rotate");
    let (st, body) = as_admin(Method::POST, rotate).await;
    assert_eq!(st, 400, "{body}");
    assert!(!body.to_string().contains(&secret), "{body}");
    as_admin(Method::DELETE, format!("/api/keys/{}", "x".repeat(10_000))).await;
    let (_, log) = api(&s, reqwest::Method::GET, "/api/audit", Some(ADMIN), None).await;
    let entries = log["data"].as_array().expect("audit entries");
    assert!(
        entries.iter().any(|e| e["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("DELETE /api/keys/sk-sluice-0123456789abcdef-…"))),
        "{log:#}"
    );
    for e in entries {
        let target = e["target"].as_str().unwrap_or("");
        assert!(target.chars().count() <= 257, "{target}");
    }
    assert!(!log.to_string().contains(&secret), "{log:#}");
    assert!(!s.stderr().contains(&secret));
}

/// `/api/audit` and `/api/keys` read their query strings as the other endpoints do: an unknown
/// or repeated parameter is a 400 naming it (they were ignored, and a repeated `limit` took the
/// last value).
#[tokio::test]
async fn audit_and_key_lists_refuse_unknown_and_repeated_parameters() {
    let s = with_admin().await;
    for (path, param) in [
        ("/api/audit?bogus=1", "bogus"),
        ("/api/audit?limit=1&limit=1001", "limit"),
        ("/api/audit?limit=1001&limit=1", "limit"),
        ("/api/keys?limit=1", "limit"),
        ("/api/requests?limit=1&limit=2", "limit"),
    ] {
        let (st, body) = api(&s, reqwest::Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], param, "{path}: {body}");
    }
    let (st, _) = api(
        &s,
        reqwest::Method::GET,
        "/api/audit?limit=5",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(st, 200);
}

/// A key for a model the configuration does not serve is created (a later configuration may
/// serve it) with a warning in the answer, as `sluice keys create` gives one.
#[tokio::test]
async fn a_key_for_an_unserved_model_is_created_with_a_warning() {
    let s = with_admin().await;
    let made = s
        .create_key(json!({"name": "typo", "models": ["mock-echo", "mock-ecko"]}))
        .await;
    let warnings = made["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{made}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("no model `mock-ecko`"),
        "{made}"
    );
    let plain = s
        .create_key(json!({"name": "fine", "models": ["mock-echo"]}))
        .await;
    assert!(plain.get("warnings").is_none(), "{plain}");
}
