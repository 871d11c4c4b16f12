//! Bad input gets the right OpenAI-style error and status; never a 500.

use serde_json::{Value, json};

use crate::harness::{Opts, Sluice, request_id};
use crate::openai_api::MOCK;

async fn post_raw(s: &Sluice, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value, String) {
    let resp = reqwest::Client::new()
        .post(s.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let id = request_id(&resp);
    let v: Value = resp.json().await.expect("error bodies are JSON");
    (status, v, id)
}

fn assert_error(v: &Value, code: &str) {
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
}

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_400_with_the_parameter() {
    let s = Sluice::start(MOCK).await;
    let (st, v, id) = post_raw(&s, "/v1/chat/completions", "{\"model\": \"mock-echo\", ").await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_json");
    let rec = s.record(&id).await;
    assert_eq!(rec["status"], "error");
    assert_eq!(rec["http_status"], 400);
    assert_eq!(rec["error_code"], "invalid_json");

    let (st, v, _) = post_raw(
        &s,
        "/v1/chat/completions",
        r#"{"model": "mock-echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
    )
    .await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_request");
    assert_eq!(v["error"]["param"], "temperature", "{v}");

    let (st, v, _) = post_raw(&s, "/v1/chat/completions", r#"{"model": "mock-echo"}"#).await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("messages"),
        "{v}"
    );

    let (st, v, _) = post_raw(
        &s,
        "/v1/chat/completions",
        r#"{"model": "mock-echo", "messages": []}"#,
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "messages");

    let (st, v, _) = post_raw(&s, "/v1/chat/completions", "").await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_json");

    let (st, v, _) = post_raw(
        &s,
        "/v1/embeddings",
        r#"{"model": "mock-echo", "input": 42}"#,
    )
    .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test]
async fn huge_bodies_are_413() {
    let s = Sluice::start_opts(Opts {
        config: MOCK,
        server_extra: "max_body_bytes = 65536",
        ..Opts::default()
    })
    .await;
    let big = "x".repeat(100_000);
    let body =
        json!({"model": "mock-echo", "messages": [{"role": "user", "content": big}]}).to_string();
    let (st, v, id) = post_raw(&s, "/v1/chat/completions", body).await;
    assert_eq!(st, 413);
    assert_error(&v, "payload_too_large");
    assert_eq!(s.record(&id).await["http_status"], 413);
    // A chunked body with no content-length is cut off too.
    let chunks = futures::stream::iter(
        (0..20).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 8192]))),
    );
    let (st, v, _) = post_raw(
        &s,
        "/v1/chat/completions",
        reqwest::Body::wrap_stream(chunks),
    )
    .await;
    assert_eq!(st, 413, "{v}");
    // A body far larger than a socket holds, with its length announced (as the SDKs send it):
    // the client still gets the 413, not a reset connection while it uploads.
    let huge = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x".repeat(8 << 20)}]})
        .to_string();
    let (st, v, _) = post_raw(&s, "/v1/chat/completions", huge).await;
    assert_eq!(st, 413, "{v}");
    assert_error(&v, "payload_too_large");
}

#[tokio::test]
async fn refusals_before_the_body_is_read_reach_a_client_still_uploading() {
    let s = Sluice::start(MOCK).await;
    let huge = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x".repeat(8 << 20)}]})
        .to_string();
    // An unknown route: the JSON 404, not a reset connection.
    let (st, v, _) = post_raw(&s, "/v1/responses", huge.clone()).await;
    assert_eq!(st, 404, "{v}");
    assert_error(&v, "not_found");
    // A request not meant for this machine (no admin key): the 403.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("host", "evil.example:4141")
        .header("content-type", "application/json")
        .body(huge.clone())
        .send()
        .await
        .expect("an answer, not a reset connection");
    assert_eq!(r.status(), 403);
    // A bad attribution header, refused before the body is read: the 400.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("x-sluice-metadata", "[]")
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("an answer, not a reset connection");
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn compressed_bodies_are_415() {
    let s = Sluice::start(MOCK).await;
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f_u8, 0x8b, 0x08, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let v: Value = resp.json().await.unwrap();
    assert_error(&v, "unsupported_media_type");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("gzip"),
        "{v}"
    );
}

#[tokio::test]
async fn unknown_models_routes_and_methods() {
    let s = Sluice::start(MOCK).await;
    let (st, v, id) = post_raw(
        &s,
        "/v1/chat/completions",
        r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}"#,
    )
    .await;
    assert_eq!(st, 404);
    assert_error(&v, "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mock-echo, priced")
    );
    assert_eq!(s.record(&id).await["model"], "gpt-9");

    let http = reqwest::Client::new();
    let r = http.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    request_id(&r);
    assert_error(&r.json().await.unwrap(), "not_found");
    let r = http
        .get(s.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_error(&r.json().await.unwrap(), "method_not_allowed");
    // On an Anthropic route, in Anthropic's shape (as its 404s).
    let r = http.get(s.url("/v1/messages")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body:#}");
    assert!(body["error"]["message"].is_string(), "{body:#}");
    let r = http.get(s.url("/v1/models/gpt-9")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(s.url("/v1/models/mock-echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A path id that is not UTF-8 is a JSON 400 like any other bad input.
    for path in ["/v1/models/%FF", "/api/requests/%FF", "/api/keys/%FF"] {
        let r = http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let body: Value = r.json().await.expect("a JSON error");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}: {body}");
    }
    // An Anthropic SDK gets it in Anthropic's shape.
    let r = http
        .get(s.url("/v1/models/%FF"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("a JSON error");
    assert_eq!(
        (&body["type"], &body["error"]["type"]),
        (&json!("error"), &json!("invalid_request_error")),
        "{body}"
    );
    // The same without the /v1 prefix (an SDK given the bare base URL).
    let r = http.get(s.url("/models/mock-echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], "mock-echo");
    let r = http
        .post(s.url("/messages"))
        .json(&json!({"model": "mock-echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "message");
}

#[tokio::test]
async fn upstream_rate_limits_carry_retry_after_and_bad_headers_are_400() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "[mock:error=429]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(&r.json().await.unwrap(), "upstream_rate_limited");

    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "[mock:error=500]"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);

    let r = http
        .post(s.url("/v1/chat/completions"))
        .header("x-sluice-metadata", "not json")
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Attribution headers in raw UTF-8 are read; other bytes (Latin-1) are refused, not ignored.
    let r = http
        .post(s.url("/v1/chat/completions"))
        .header(
            "x-sluice-user",
            reqwest::header::HeaderValue::from_bytes("José".as_bytes()).unwrap(),
        )
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    assert_eq!(s.record(&id).await["user"], "José");
    let r = http
        .post(s.url("/v1/chat/completions"))
        .header(
            "x-sluice-user",
            reqwest::header::HeaderValue::from_bytes(b"Jos\xe9").unwrap(),
        )
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("x-sluice-user") && m.contains("UTF-8")),
        "{v}"
    );
}

#[tokio::test]
async fn random_garbage_never_yields_a_500() {
    let s = Sluice::start(MOCK).await;
    let bodies: Vec<&[u8]> = vec![
        b"null",
        b"[]",
        b"\"string\"",
        b"{\"model\": 5}",
        b"{\"model\": \"mock-echo\", \"messages\": [{}]}",
        b"{\"model\": \"mock-echo\", \"messages\": [{\"role\": \"user\", \"content\": 5}]}",
        b"{\"model\": \"mock-echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"n\": 0}",
        b"{\"model\": \"mock-echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": 7}",
        b"\xff\xfe\x00garbage",
        b"{\"model\": \"mock-echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": -1}",
    ];
    for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/messages"] {
        for b in &bodies {
            let r = reqwest::Client::new()
                .post(s.url(path))
                .body(b.to_vec())
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            assert!(
                (400..500).contains(&st),
                "{path} {:?} → {st}",
                String::from_utf8_lossy(b)
            );
            let v: Value = r.json().await.expect("JSON error body");
            assert!(v["error"].is_object(), "{v}");
        }
    }
}

#[tokio::test]
async fn browsers_of_the_configured_origins_may_call_the_api() {
    let s = Sluice::start_opts(Opts {
        config: MOCK,
        server_extra: "cors_origins = [\"https://app.example.com\"]",
        admin_key: Some("sk-admin-cors"),
        ..Opts::default()
    })
    .await;
    let http = reqwest::Client::new();
    // The preflight carries no key, and is answered before any key check.
    let r = http
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-stainless-os",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert!(
        allowed.contains("authorization") && allowed.contains("x-stainless-os"),
        "{allowed}"
    );
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    // The call itself: the page may read the answer and Sluice's headers.
    let r = http
        .post(s.url("/v1/chat/completions"))
        .header("origin", "https://app.example.com")
        .bearer_auth("sk-admin-cors")
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    // Another site's page gets no grant.
    let r = http
        .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn an_open_gateway_answers_only_requests_meant_for_this_machine() {
    // No admin key: the local user is an admin, so other sites and names are refused.
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let chat = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]});
    let refused = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.expect("JSON error");
        (
            status,
            v["error"]["code"].as_str().unwrap_or_default().to_string(),
        )
    };
    // DNS rebinding: the gateway reached under another name.
    let r = http
        .post(s.url("/api/keys"))
        .header("host", "evil.example:4141")
        .json(&json!({"name": "x", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused(r).await, (403, "forbidden".to_string()));
    // A reverse proxy forwarding requests from elsewhere under this machine's name.
    for proxy in ["x-forwarded-for", "forwarded", "x-real-ip", "via"] {
        let r = http
            .post(s.url("/api/keys"))
            .header(proxy, "203.0.113.9")
            .json(&json!({"name": "x", "role": "admin"}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused(r).await, (403, "forbidden".to_string()), "{proxy}");
    }
    // nginx's default proxy_pass adds no such header, but speaks HTTP/1.0; health checks pass.
    let r = http
        .post(s.url("/api/keys"))
        .version(reqwest::Version::HTTP_10)
        .json(&json!({"name": "x", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused(r).await, (403, "forbidden".to_string()));
    let r = http
        .get(s.url("/health"))
        .version(reqwest::Version::HTTP_10)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A page of another site posting to it.
    let r = http
        .post(s.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(chat.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused(r).await, (403, "forbidden".to_string()));
    let r = http
        .post(s.url("/v1/chat/completions"))
        .header("sec-fetch-site", "cross-site")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // On the Anthropic routes the refusal is in Anthropic's shape.
    let r = http
        .post(s.url("/v1/messages"))
        .header("host", "evil.example:4141")
        .json(&json!({"model": "mock-echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    // The refusal at the admin API's door is in the audit log.
    let audit = s.get_json("/api/audit").await;
    assert!(
        audit["data"].as_array().is_some_and(|entries| entries
            .iter()
            .any(|e| e["action"] == "denied"
                && e["target"] == "POST /api/keys"
                && e["outcome"] == "forbidden")),
        "{audit:#}"
    );
    // Local clients, and pages served from this machine, are answered; every answer carries the
    // request id under the names the SDKs read.
    for origin in [
        None,
        Some("http://localhost:3000"),
        Some("http://127.0.0.1:4141"),
    ] {
        let mut rb = http.post(s.url("/v1/chat/completions")).json(&chat);
        if let Some(o) = origin {
            rb = rb.header("origin", o);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200, "{origin:?}");
        let id = request_id(&r);
        assert_eq!(r.headers()["x-request-id"].to_str().unwrap(), id);
    }
    let r = http
        .post(s.url("/v1/messages"))
        .json(&json!({"model": "mock-echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["request-id"],
        r.headers()["x-sluice-request-id"]
    );
}

/// The Anthropic SDK's `models.list()` and `models.retrieve()` (requests with
/// `anthropic-version`) get Anthropic's shape and paging; other clients OpenAI's.
#[tokio::test]
async fn anthropic_clients_list_models_in_anthropics_shape() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    // (status, body) of a GET, as the Anthropic SDK sends it or not.
    let get = |path: &str, anthropic: bool| {
        let mut rb = http.get(s.url(path));
        if anthropic {
            rb = rb.header("anthropic-version", "2023-06-01");
        }
        async move {
            let r = rb.send().await.expect("GET");
            (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
        }
    };
    let ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = get("/v1/models", true).await;
    assert_eq!(ids(&all), ["mock-echo", "priced", "unmetered"], "{all:#}");
    assert_eq!(all["data"][0]["type"], "model");
    assert_eq!(all["data"][0]["display_name"], "mock-echo");
    assert!(
        all["data"][0]["created_at"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{all:#}"
    );
    let paging = |v: &Value| {
        (
            v["has_more"].clone(),
            v["first_id"].clone(),
            v["last_id"].clone(),
        )
    };
    assert_eq!(
        paging(&all),
        (json!(false), json!("mock-echo"), json!("unmetered"))
    );
    let (_, page) = get("/v1/models?limit=2&beta=true", true).await;
    assert_eq!(
        paging(&page),
        (json!(true), json!("mock-echo"), json!("priced"))
    );
    let (_, next) = get("/v1/models?limit=2&after_id=priced", true).await;
    assert_eq!(
        (ids(&next), &next["has_more"]),
        (vec!["unmetered".to_string()], &json!(false))
    );
    let (_, before) = get("/v1/models?limit=1&before_id=unmetered", true).await;
    assert_eq!(
        (ids(&before), &before["has_more"]),
        (vec!["priced".to_string()], &json!(true))
    );
    let (status, bad) = get("/v1/models?limit=0", true).await;
    assert_eq!((status, &bad["type"]), (400, &json!("error")));

    let (_, one) = get("/v1/models/priced", true).await;
    assert_eq!(
        (&one["type"], &one["id"]),
        (&json!("model"), &json!("priced")),
        "{one:#}"
    );
    let (status, missing) = get("/v1/models/claude-9", true).await;
    assert_eq!(status, 404);
    assert_eq!(
        (&missing["type"], &missing["error"]["type"]),
        (&json!("error"), &json!("not_found_error")),
        "{missing:#}"
    );
    // Without the header: OpenAI's shape.
    assert_eq!(get("/v1/models", false).await.1["object"], "list");
    // Refused at the door (a request for another host), in Anthropic's shape too.
    let r = http
        .get(s.url("/v1/models"))
        .header("anthropic-version", "2023-06-01")
        .header("host", "evil.example:4141")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "error");
}
