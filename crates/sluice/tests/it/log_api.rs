//! `/api/requests` and `/metrics`.

use serde_json::{Value, json};

use crate::harness::{Sluice, request_id};
use crate::openai_api::MOCK;

#[tokio::test]
async fn request_log_filters_and_pages() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..7 {
        let (model, user) = if i % 2 == 0 {
            ("mock-echo", "ann")
        } else {
            ("priced", "bob")
        };
        let content = if i == 6 { "[mock:error=503]" } else { "hello" };
        let r = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": model, "user": user, "messages": [{"role": "user", "content": content}]}))
            .send()
            .await
            .unwrap();
        ids.push(request_id(&r));
    }
    s.record(&ids[6]).await;
    let all = s.list("limit=100").await;
    let got: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.reverse();
    assert_eq!(got, want, "newest first");

    let ann = s.list("user=ann").await;
    assert_eq!(ann["data"].as_array().unwrap().len(), 4);
    let priced = s.list("model=priced").await;
    assert_eq!(priced["data"].as_array().unwrap().len(), 3);
    let errors = s.list("status=error").await;
    assert_eq!(errors["data"][0]["id"], ids[6].as_str());
    assert_eq!(errors["data"].as_array().unwrap().len(), 1);
    let recent = s.list("since=1h").await;
    assert_eq!(recent["data"].as_array().unwrap().len(), 7);
    // The window's start comes back as a time, to page with.
    let start = recent["since"].as_str().expect("since");
    let start = chrono::DateTime::parse_from_rfc3339(start).expect("RFC 3339");
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert!(
        (start.to_utc() - hour_ago).num_seconds().abs() < 60,
        "{start}"
    );
    let q = format!(
        "since={}",
        recent["since"].as_str().unwrap().replace('+', "%2B")
    );
    assert_eq!(s.list(&q).await["data"].as_array().unwrap().len(), 7);
    assert!(s.list("limit=1").await["since"].is_null());
    let future = s.list("since=2999-01-01T00:00:00Z").await;
    assert_eq!(future["data"].as_array().unwrap().len(), 0);

    // Paging walks everything once.
    let mut seen = Vec::new();
    let mut q = "limit=3".to_string();
    loop {
        let page = s.list(&q).await;
        for r in page["data"].as_array().unwrap() {
            seen.push(r["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] == true {
            q = format!("limit=3&before={}", page["next_before"].as_str().unwrap());
        } else {
            break;
        }
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(seen, want);

    for bad in [
        "status=maybe",
        "limit=0",
        "since=soon",
        "before=xyz",
        "colour=red",
        "limit=abc",
    ] {
        let r = http
            .get(s.url(&format!("/api/requests?{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.contains("deserialize"), "{bad}: {message}");
        if bad == "limit=abc" {
            assert_eq!(v["error"]["param"], "limit", "{v}");
        }
    }
    let r = http
        .get(s.url("/api/requests/not-an-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(s.url(&format!("/api/requests/{}", uuid::Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn metrics_count_requests_tokens_cost_and_latency() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    for content in ["one two", "three", "[mock:error=500]"] {
        let r = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "priced", "messages": [{"role": "user", "content": content}]}))
            .send()
            .await
            .unwrap();
        let _ = r.text().await;
    }
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "mock-echo", "stream": true, "messages": [{"role": "user", "content": "a b c"}]}))
        .send()
        .await
        .unwrap();
    let _ = r.text().await;
    let m = http.get(s.url("/metrics")).send().await.unwrap();
    // OpenMetrics, labelled as such.
    assert_eq!(
        m.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = m.text().await.unwrap();
    assert!(m.ends_with("# EOF\n"), "{m}");
    let has = |needle: &str| assert!(m.contains(needle), "missing `{needle}` in\n{m}");
    has(
        r#"sluice_requests_total{model="priced",provider="mock",endpoint="chat.completions",status="ok"} 2"#,
    );
    has(
        r#"sluice_requests_total{model="priced",provider="mock",endpoint="chat.completions",status="error"} 1"#,
    );
    has(r#"sluice_errors_total{model="priced",provider="mock",code="upstream_error"} 1"#);
    has(r#"sluice_tokens_total{model="priced",provider="mock",kind="completion"} 3"#);
    has(r#"sluice_request_duration_seconds_count{model="priced",provider="mock"} 3"#);
    has(r#"sluice_time_to_first_token_seconds_count{model="mock-echo",provider="mock"} 1"#);
    has("sluice_cost_usd_total{model=\"priced\",provider=\"mock\"}");
    for gauge in ["sluice_log_queue_records", "sluice_log_queue_bytes"] {
        has(&format!("# TYPE {gauge} gauge"));
        let sample = m
            .lines()
            .find_map(|l| l.strip_prefix(gauge)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {gauge} sample in\n{m}"));
        assert!(sample.trim().parse::<u64>().is_ok(), "{gauge}: {sample}");
    }
    // The writer's counts: the four requests' records are written (each request waits for its
    // record to be queued, not written: read again until they are).
    let mut written = 0;
    for _ in 0..100 {
        let m = http
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for name in [
            "sluice_log_records_spilled_total 0",
            "sluice_log_records_refused_total 0",
            "sluice_log_slow_batches_total",
        ] {
            assert!(m.contains(name), "missing `{name}` in\n{m}");
        }
        written = m
            .lines()
            .find_map(|l| l.strip_prefix("sluice_log_records_written_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no records-written sample in\n{m}"));
        if written >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(written >= 4, "{written}");
}

#[tokio::test]
async fn the_largest_page_still_says_when_more_follow() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let body = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]});
    let mut last = String::new();
    for chunk in 0..11 {
        let sends = (0..91).map(|_| http.post(s.url("/v1/chat/completions")).json(&body).send());
        for r in futures::future::join_all(sends).await {
            let r = r.unwrap();
            assert_eq!(r.status(), 200, "chunk {chunk}");
            last = request_id(&r);
        }
    }
    s.record(&last).await;
    // 1,001 records: a page of 1,000 has more after it, and the next page holds the last one.
    let start = std::time::Instant::now();
    let page = loop {
        let page = s.list("limit=1000").await;
        if page["has_more"] == true || start.elapsed() > std::time::Duration::from_secs(10) {
            break page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(page["data"].as_array().unwrap().len(), 1000);
    assert_eq!(page["has_more"], true, "1,001 records on a page of 1,000");
    let before = page["next_before"].as_str().expect("next_before");
    let rest = s.list(&format!("limit=1000&before={before}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["has_more"], false);
}
