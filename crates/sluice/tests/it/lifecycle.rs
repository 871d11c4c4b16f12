//! Start-up rules and graceful shutdown: SIGTERM mid-load loses no accepted request.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use sluice_testkit::TempPostgres;

use crate::harness::{BIN, Opts, Sluice, request_id};

const SLOW_MOCK: &str = r#"
[providers.mock]
type = "mock"
latency_ms = 20
tokens_per_second = 400

[models."mock-echo"]
deployments = [{ provider = "mock", model = "mock-echo" }]
"#;

/// Drives `s` with 16 concurrent clients, sends SIGTERM after `before_kill` responses, and returns
/// the ids of every response that came back (any status).
async fn load_then_sigterm(s: &mut Sluice, before_kill: usize) -> Vec<String> {
    let done = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let http = http.clone();
        let url = s.url("/v1/chat/completions");
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..400 {
                let stream = (w + i) % 2 == 0;
                let r = http
                    .post(&url)
                    .json(&json!({
                        "model": "mock-echo",
                        "stream": stream,
                        "messages": [{"role": "user", "content": format!("worker {w} request {i} goes here")}]
                    }))
                    .send()
                    .await;
                let Ok(r) = r else { break };
                let id = request_id(&r);
                let ok = r.text().await.is_ok();
                if ok {
                    ids.push(id);
                    done.fetch_add(1, Ordering::SeqCst);
                } else {
                    break;
                }
            }
            ids
        }));
    }
    while done.load(Ordering::SeqCst) < before_kill {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.sigterm();
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(30)));
    assert!(
        status.success(),
        "sluice exited with {status}; stderr:\n{}",
        s.stderr()
    );
    ids
}

async fn assert_all_stored(store_url: &str, ids: &[String]) {
    let store = sluice_store::open(store_url, 2).await.expect("open store");
    let total = store.count().await.unwrap();
    assert!(
        total >= ids.len() as u64,
        "{total} records for {} answered requests",
        ids.len()
    );
    let mut missing = Vec::new();
    for id in ids {
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        if store.get(uuid).await.unwrap().is_none() {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} answered requests have no record: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "request ids are unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_loses_no_record_sqlite() {
    let mut s = Sluice::start(SLOW_MOCK).await;
    let ids = load_then_sigterm(&mut s, 150).await;
    assert!(ids.len() >= 150);
    let stdout = s.stdout().join("\n");
    assert!(stdout.contains("request records written"), "{stdout}");
    // Once the server has finished its requests, nothing else holds the log queue open: the
    // writer drains at once instead of waiting out its patience for senders that never finish.
    let stderr = s.stderr();
    assert!(
        !stderr.contains("requests still running at shutdown"),
        "{stderr}"
    );
    // The store was closed: everything is in the database file, no write-ahead log is left.
    let db = s.store_url.strip_prefix("sqlite://").expect("a sqlite url");
    let wal = std::path::PathBuf::from(format!("{db}-wal"));
    assert!(!wal.exists(), "{} is left after shutdown", wal.display());
    assert_all_stored(&s.store_url.clone(), &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_loses_no_record_postgres() {
    if !sluice_testkit::postgres_available() {
        assert_ne!(
            std::env::var("SLUICE_REQUIRE_PG").as_deref(),
            Ok("1"),
            "PostgreSQL is required (SLUICE_REQUIRE_PG=1) but initdb/pg_ctl were not found"
        );
        eprintln!("skipping: PostgreSQL server binaries not found");
        return;
    }
    let pg = tokio::task::block_in_place(TempPostgres::start).expect("start postgres");
    let url = tokio::task::block_in_place(|| pg.create_database("sigterm_e2e")).expect("create db");
    let mut s = Sluice::start_opts(Opts {
        config: SLOW_MOCK,
        store_url: Some(url.clone()),
        ..Opts::default()
    })
    .await;
    let ids = load_then_sigterm(&mut s, 150).await;
    assert_all_stored(&url, &ids).await;
}

#[test]
fn public_bind_without_admin_key_refuses_to_start() {
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--store",
            "sqlite::memory:",
        ])
        .env_remove("SLUICE_ADMIN_KEY")
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    assert!(err.contains("hint: export SLUICE_ADMIN_KEY"), "{err}");
}

#[tokio::test]
async fn admin_key_guards_v1_and_api() {
    let s = Sluice::start_opts(Opts {
        config: SLOW_MOCK,
        admin_key: Some("sk-admin-test"),
        ..Opts::default()
    })
    .await;
    let http = reqwest::Client::new();
    let body = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]});
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let r = http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth("sk-admin-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    // Anthropic SDKs send x-api-key.
    let r = http
        .post(s.url("/v1/messages"))
        .header("x-api-key", "sk-admin-test")
        .json(&json!({"model": "mock-echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(s.url("/api/requests")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(s.record(&id).await["status"], "ok");
}

#[tokio::test]
async fn a_client_leaving_a_plain_request_is_recorded_as_cancelled() {
    let s = Sluice::start(
        "[providers.slow]\ntype = \"mock\"\nlatency_ms = 3000\n[models.slow]\ndeployments = [{ provider = \"slow\", model = \"slow\", input_cost_per_mtok = 1000.0, output_cost_per_mtok = 1000.0 }]\n",
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "slow", "user": "leaver", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(r.is_err(), "the client gives up before the answer");
    // The record appears well before the mock would have answered.
    let start = std::time::Instant::now();
    loop {
        let page = s.list("user=leaver").await;
        if let Some(rec) = page["data"].as_array().and_then(|a| a.first()) {
            assert_eq!(rec["status"], "cancelled", "{rec}");
            assert_eq!(rec["http_status"], 499);
            assert_eq!(rec["error_code"], "client_closed_request");
            // The provider call the disconnect cut short is on the record, with its time.
            let attempts = rec["attempt_log"].as_array().expect("attempt_log");
            assert_eq!(attempts.len(), 1, "{rec}");
            assert_eq!(attempts[0]["deployment"], "slow/slow", "{rec}");
            assert_eq!(attempts[0]["outcome"], "cancelled", "{rec}");
            let ms = attempts[0]["latency_ms"].as_f64().expect("latency_ms");
            assert!((200.0..3000.0).contains(&ms), "{rec}");
            // The upstream had the prompt: it is counted and charged, and nothing more.
            let prompt = rec["prompt_tokens"].as_u64().expect("prompt_tokens");
            assert!(prompt > 0, "{rec}");
            assert_eq!(rec["completion_tokens"], 0, "{rec}");
            // Estimated from its size (four bytes a token): "hi" and the role framing.
            assert_eq!(rec["usage_source"], "estimate", "{rec}");
            let cost = rec["cost_usd"].as_f64().expect("cost_usd");
            assert!((cost - prompt as f64 * 1000.0 / 1e6).abs() < 1e-9, "{rec}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_millis(2500),
            "no cancelled record"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A client that goes away while still sending its body leaves a record too (cancelled, 499),
/// with what it could say of itself: the key's user here, the request's id.
#[tokio::test]
async fn a_client_leaving_during_its_body_upload_is_recorded_as_cancelled() {
    use tokio::io::AsyncWriteExt;
    let s = Sluice::start(SLOW_MOCK).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\nx-sluice-user: uploader\r\n\r\n{{\"model\": \"mock-echo\", \"messages\": ["
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sock);
    let start = std::time::Instant::now();
    loop {
        let page = s.list("user=uploader").await;
        if let Some(rec) = page["data"].as_array().and_then(|a| a.first()) {
            assert_eq!(rec["status"], "cancelled", "{rec}");
            assert_eq!(rec["http_status"], 499, "{rec}");
            assert_eq!(rec["error_code"], "client_closed_request", "{rec}");
            assert_eq!(rec["endpoint"], "chat.completions", "{rec}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no record for the client that left during its upload"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A body that breaks its own framing is the client's mistake, not its leaving: a 400.
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nx-sluice-user: garbler\r\n\r\n5\r\n{{\"mod\r\nzz\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-sluice-request-id: "))
        .expect("a request id");
    let rec = s.record(id.trim()).await;
    assert_eq!(rec["status"], "error", "{rec}");
    assert_eq!(rec["http_status"], 400, "{rec}");
    assert_eq!(rec["user"], "garbler", "{rec}");
}

/// Requests still running when the shutdown grace period ends are ended then — a plain one with
/// a 503, a stream with an error event — and each still gets its record (cancelled, 503
/// `service_unavailable` as its client was told), written before the request log is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_running_past_the_grace_period_still_get_records() {
    let mut s = Sluice::start_opts(Opts {
        config: r#"
[providers.slow]
type = "mock"
latency_ms = 60000

[providers.trickle]
type = "mock"
tokens_per_second = 2

[models."slow"]
deployments = [{ provider = "slow", model = "slow" }]

[models."trickle"]
deployments = [{ provider = "trickle", model = "trickle" }]
"#,
        env: vec![("SLUICE__SERVER__SHUTDOWN_GRACE_SECS", "1".to_string())],
        ..Opts::default()
    })
    .await;
    let http = reqwest::Client::new();
    let plain = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
        .send();
    let plain = tokio::spawn(plain);
    let mut stream = http
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "trickle", "stream": true,
                      "messages": [{"role": "user", "content": "one two three four five six seven eight nine ten eleven twelve"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stream_id = request_id(&stream);
    // The stream is under way.
    let first = stream.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.sigterm();

    let plain = plain.await.unwrap().expect("an answer");
    assert_eq!(plain.status(), 503);
    let plain_id = request_id(&plain);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");
    let mut rest = String::new();
    while let Ok(Some(c)) = stream.chunk().await {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        rest.contains("\"error\"") && rest.contains("shutting down") && !rest.contains("[DONE]"),
        "{rest}"
    );
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(20)));
    assert!(status.success(), "{status}; stderr:\n{}", s.stderr());

    let store = sluice_store::open(&s.store_url, 2)
        .await
        .expect("open store");
    for id in [&plain_id, &stream_id] {
        let rec = store
            .get(uuid::Uuid::parse_str(id).unwrap())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no record for {id}; stderr:\n{}", s.stderr()));
        assert_eq!(rec.status.as_str(), "cancelled", "{id}");
        // Ended by the shutdown, as the client was told: not a client that left.
        assert_eq!(rec.http_status, 503, "{id}");
        assert_eq!(
            rec.error_code.as_deref(),
            Some("service_unavailable"),
            "{id}"
        );
    }
}

/// A second stop signal during the grace period ends the requests still running at once, as
/// the period's end would (cancelled records, a 503 to the client), instead of being ignored
/// until the period is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_signal_ends_the_grace_period() {
    let mut s = Sluice::start_opts(Opts {
        config: "[providers.slow]\ntype = \"mock\"\nlatency_ms = 60000\n[models.\"slow\"]\ndeployments = [{ provider = \"slow\", model = \"slow\" }]\n",
        env: vec![
            ("SLUICE__SERVER__SHUTDOWN_GRACE_SECS", "120".to_string()),
            ("SLUICE_LOG", "info".to_string()),
        ],
        ..Opts::default()
    })
    .await;
    let plain = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}))
        .send();
    let plain = tokio::spawn(plain);
    // The request is with the upstream.
    let mut in_flight = false;
    for _ in 0..200 {
        let metrics = s.metrics().await;
        if metrics
            .lines()
            .any(|l| l.starts_with("sluice_deployment_in_flight{") && l.ends_with(" 1"))
        {
            in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(in_flight);
    s.sigterm();
    // The shutdown has begun (and listens for a second signal); a repeat within a second is
    // the same stop, so the second comes after it.
    for _ in 0..200 {
        if s.stderr()
            .contains("a second Ctrl-C or SIGTERM ends them now")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.sigterm();
    let plain = plain.await.unwrap().expect("an answer");
    assert_eq!(plain.status(), 503);
    let id = request_id(&plain);
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(20)));
    assert!(status.success(), "{status}; stderr:\n{}", s.stderr());
    let store = sluice_store::open(&s.store_url, 2)
        .await
        .expect("open store");
    let rec = store
        .get(uuid::Uuid::parse_str(&id).unwrap())
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(rec.status.as_str(), "cancelled");
}

/// `[store] spill_path` names the spill file: records a gateway left there while its store was
/// down are written to the store when the next one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_spill_file_is_written_back_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("volume/records.jsonl");
    std::fs::create_dir_all(spill.parent().unwrap()).unwrap();
    let mut rec =
        sluice_core::record::RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
    rec.model = "spilled-model".into();
    std::fs::write(
        &spill,
        format!("{}\n", serde_json::to_string(&rec).unwrap()),
    )
    .unwrap();
    let s = Sluice::start_opts(Opts {
        config: SLOW_MOCK,
        store_extra: &format!("spill_path = {:?}", spill.display().to_string()),
        ..Opts::default()
    })
    .await;
    let got = s.record(&rec.id.to_string()).await;
    assert_eq!(got["model"], "spilled-model", "{got:#}");
    assert!(!spill.exists(), "the spill file is consumed");
}
