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
