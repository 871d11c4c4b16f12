//! The command line: `config check` and `logs`.

use std::process::Command;

use serde_json::json;

use crate::harness::{BIN, Sluice, request_id};
use crate::openai_api::MOCK;

fn run(args: &[&str], dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ADMIN_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_reports_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[server]\nlisten = \"127.0.0.1:4141\"\n[store]\nurl = \"sqlite://./sluice-data/sluice.db\"\n[providers.upstream]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:18080/v1\"\napi_key = \"env::UPSTREAM_KEY\"\n[models.\"bench-model\"]\ndeployments = [{ provider = \"upstream\", model = \"gpt-4o-mini\" }]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&good)
        .env("UPSTREAM_KEY", "k")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));

    // Without the secret the same file fails, naming the key and the variable.
    let (code, _, err) = run(
        &["config", "check", "--config", good.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: providers.upstream.api_key:"),
        "{err}"
    );
    assert!(err.contains("UPSTREAM_KEY"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[models.x]\ndeployments = [{ provider = \"nope\", model = \"m\" }]\n",
    )
    .unwrap();
    let (code, _, err) = run(
        &["config", "check", "--config", bad.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: models.x.deployments[0].provider: no provider `nope`"),
        "{err}"
    );

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[server]\nlisten = \"127.0.0.1:1\"\nmax_body = 3\n").unwrap();
    let (code, _, err) = run(
        &["config", "check", "--config", typo.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("server") && err.contains("max_body"), "{err}");

    let (code, _, err) = run(
        &["config", "check", "--config", "/nonexistent.toml"],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");

    // No file at all: the embedded default is valid.
    let (code, out, _) = run(&["config", "check"], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains("embedded default"), "{out}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .env("SLUICE__SERVER__LISTEN", "127.0.0.1:5999")
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen 127.0.0.1:5999"));
}

#[tokio::test]
async fn logs_prints_the_request_log() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (model, user) in [("mock-echo", "ann"), ("priced", "bob"), ("gpt-9", "ann")] {
        let r = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": model, "user": user, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        ids.push(request_id(&r));
    }
    s.record(&ids[2]).await;
    let store = s.store_url.clone();
    let dir = s.dir().to_path_buf();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run(
            &["logs", "--json", "--store", &store, "--user", "ann"],
            &dir,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["id"], ids[0].as_str(), "oldest first");
    assert_eq!(lines[1]["id"], ids[2].as_str());
    assert_eq!(lines[1]["error_code"], "model_not_found");

    let store = s.store_url.clone();
    let dir = s.dir().to_path_buf();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        run(&["logs", "--store", &store, "--status", "error"], &dir)
    })
    .await
    .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains(&ids[2]) && !out.contains(&ids[0]), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["logs"], dir.path());
    assert_eq!(code, 2);
    assert!(
        err.contains("no request log") && err.contains("hint:"),
        "{err}"
    );
}

const COMPLEXITY: &str = r#"
[providers.mock]
type = "mock"

[models."small"]
deployments = [{ provider = "mock", model = "gpt-4o-mini" }]

[models."strong"]
deployments = [{ provider = "mock", model = "gpt-4o" }]

[models."auto"]
strategy = "complexity"

[models."auto".complexity]
tiers = [
  { name = "small", model = "small", max_score = 0.35 },
  { name = "strong", model = "strong" },
]
"#;

/// Complexity routing end to end: the header, the record's decision and savings, `route
/// explain` and `route report`.
#[tokio::test]
async fn complexity_routing_explain_and_report() {
    let s = Sluice::start(COMPLEXITY).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for (prompt, tier) in [
        ("hi there, thanks!", "small"),
        (
            "Write a Rust function that parses this JSON and fix the borrow checker error:\n```rust\nfn main() { let v = vec![1]; let r = &v; drop(v); println!(\"{:?}\", r); }\n```",
            "strong",
        ),
    ] {
        let resp = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "auto", "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let route = resp
            .headers()
            .get("x-sluice-route")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(route.contains(&format!("tier={tier}")), "{prompt}: {route}");
        assert!(route.contains(&format!("group={tier}")), "{route}");
        let id = request_id(&resp);
        let rec = s.record(&id).await;
        assert_eq!(rec["model"], "auto", "{rec:#}");
        assert_eq!(rec["route"]["tier"], tier, "{rec:#}");
        assert!(
            rec["route"]["features"]
                .as_array()
                .is_some_and(|f| f.len() >= 5),
            "{rec:#}"
        );
        let saved = rec["route"]["saved_usd"].as_f64().expect("saved_usd");
        if tier == "small" {
            assert!(
                saved > 0.0,
                "a small-tier answer is cheaper than gpt-4o: {rec:#}"
            );
        } else {
            assert!(saved.abs() < 1e-12, "{rec:#}");
        }
        ids.push(id);
    }

    let cfg = s.dir().join("sluice.toml");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = run(&["route", "explain", "--config", cfg, "hello!"], s.dir());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("small"), "{out}");
    for feature in [
        "length",
        "code",
        "math",
        "reasoning",
        "domain",
        "depth",
        "small_talk",
    ] {
        assert!(out.contains(feature), "explain names `{feature}`: {out}");
    }
    let (code, out, err) = run(
        &[
            "route",
            "explain",
            "--config",
            cfg,
            "--json",
            "Prove that sqrt(2) is irrational, step by step.",
        ],
        s.dir(),
    );
    assert_eq!(code, 0, "{err}");
    let decision: serde_json::Value = serde_json::from_str(&out).expect("JSON decision");
    assert!(decision["score"].as_f64().is_some(), "{decision:#}");

    let (code, out, err) = run(&["route", "report", "--config", cfg], s.dir());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("small") && out.contains("strong") && out.contains("saved"),
        "{out}"
    );

    // A model that is not complexity-routed gets a clear one-line error with a hint.
    let (code, _, err) = run(
        &[
            "route", "explain", "--config", cfg, "--model", "small", "hi",
        ],
        s.dir(),
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: model `small` uses strategy"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}
