//! The command line: `config check`, `logs` and `keys`.

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

/// Environment variables that are not UTF-8 are not taken for unset: `SLUICE_CONFIG` names its
/// file whatever its bytes (the embedded default was checked and served instead), and an admin
/// key that is not UTF-8 is an error (the API ran open while the operator thought it guarded).
#[cfg(unix)]
#[test]
fn env_values_that_are_not_utf8_are_not_ignored() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"\xff.toml");
    std::fs::write(dir.path().join(name), "[server]\nlisten = \"bad\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .env("SLUICE_CONFIG", name)
        .env_remove("SLUICE_ADMIN_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("server.listen"), "the file was read: {err}");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .current_dir(dir.path())
        .env_remove("SLUICE_CONFIG")
        .env("SLUICE_ADMIN_KEY", std::ffi::OsStr::from_bytes(b"sec\xff"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SLUICE_ADMIN_KEY is not valid UTF-8"), "{err}");
}

/// `sluice demo` with its temporary directory in `tmp`, and its output's lines.
fn spawn_demo(
    tmp: &std::path::Path,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("TMPDIR", tmp)
        .env_remove("SLUICE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// `sluice demo | head -3` leaves no temporary store behind (the quiet exit on the closed pipe
/// skipped its removal).
#[test]
fn a_demo_cut_short_by_its_reader_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, mut lines) = spawn_demo(tmp.path());
    for _ in 0..3 {
        lines.next().expect("a line").unwrap();
    }
    drop(lines);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A demo stopped half way (Ctrl-C, SIGTERM) leaves no temporary store behind either.
#[test]
fn a_demo_stopped_half_way_leaves_nothing_behind() {
    // The exit status a process stopped by the signal gives (128 + its number).
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let (mut child, mut lines) = spawn_demo(tmp.path());
        lines.next().expect("a line").unwrap();
        let killed = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        drop(lines);
        let status = child.wait().unwrap();
        // Stopped by the signal, or (a fast machine) done before it came.
        assert!(
            status.code() == Some(code) || status.code() == Some(0),
            "{signal}: {status}"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "{signal}: {left:?}");
    }
}

/// `models list` on an empty directory shows nothing it cannot know: a model not pulled has no
/// quantization (the embedding model showed `f32`).
#[test]
fn models_not_pulled_show_no_quantization() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let (code, out, err) = run(
        &["models", "list", "--dir", models.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains("not pulled")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    for row in rows {
        let cells: Vec<&str> = row.split_whitespace().collect();
        // name, kind, "not", "pulled", size, quant, path
        assert_eq!(cells[4..6], ["-", "-"], "{row}");
    }
}

/// A command that only reads refuses a SQLite file that is not a Sluice store, and leaves it as
/// it was (it added Sluice's tables to it).
#[test]
fn read_commands_leave_other_databases_alone() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.db");
    std::fs::write(&other, b"").unwrap();
    let store = format!("sqlite://{}", other.display());
    for args in [
        vec!["logs", "--store", &store],
        vec!["usage", "--store", &store],
        vec!["keys", "--store", &store, "list"],
        vec!["route", "report", "--store", &store],
    ] {
        let (code, _, err) = run(&args, dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("is not a Sluice store"), "{args:?}: {err}");
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 0, "{args:?}");
    }
}

/// `logs` refuses a period that ends before it starts (it answered "no requests match"), and
/// `usage` names the flag of such an error once.
#[test]
fn a_period_that_ends_before_it_starts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let (code, _, err) = run(
        &["logs", "--store", &store, "--since", "2h", "--until", "3h"],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--until must be after --since"), "{err}");
    // An empty period too (each bound was read at its own now).
    let (code, _, err) = run(
        &["logs", "--store", &store, "--since", "1h", "--until", "1h"],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(
        &["usage", "--store", &store, "--since", "1d", "--until", "2d"],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.matches("--until").count(), 1, "{err}");
    // A start after now, with no end: the period up to now is empty.
    let (code, _, err) = run(
        &["usage", "--store", &store, "--since", "9999-12-31"],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--since is in the future"), "{err}");
}

/// `keys create` checks its flags before it warns about models, and prints the name as the
/// other commands do (escaped); with `--store` and no configuration file it does not compare the
/// models with the embedded default's.
#[test]
fn keys_create_checks_flags_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("k.db").display());
    // With a configuration file, whose models a key's are compared with: the bad flag is
    // refused before any warning.
    let with_file = tempfile::tempdir().unwrap();
    std::fs::write(with_file.path().join("sluice.toml"), MOCK).unwrap();
    let (code, _, err) = run(
        &[
            "keys", "--store", &store, "create", "--name", "x", "--models", "",
        ],
        with_file.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert!(err.contains("--models"), "{err}");
    let (code, out, err) = run(
        &[
            "keys", "--store", &store, "create", "--name", "a\nb", "--models", "my-model",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(a\\nb)"), "{out}");
    assert!(
        !err.contains("warning"),
        "no configuration to compare with: {err}"
    );
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("config OK"), "{stdout}");
    assert!(!stdout.contains("no price"), "{stdout}");

    // A deployment the price table does not know is named: it would cost $0 and pass budgets.
    let unpriced = dir.path().join("unpriced.toml");
    std::fs::write(
        &unpriced,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("model = \"gpt-4o-mini\"", "model = \"my-own-model\""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--config"])
        .arg(&unpriced)
        .env("UPSTREAM_KEY", "k")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("note: no price for bench-model/upstream/my-own-model"),
        "{stdout}"
    );

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

    let cors = dir.path().join("cors.toml");
    std::fs::write(
        &cors,
        "[server]\ncors_origins = [\"https://app.example.com/path\"]\n",
    )
    .unwrap();
    let (code, _, err) = run(
        &["config", "check", "--config", cors.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: server.cors_origins:") && err.contains("/path"),
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

/// Every configuration error is one line naming the key and where its value came from.
#[test]
fn config_errors_name_the_key_and_its_origin_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str, env: &[(&str, &str)]| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["config", "check", "--config"])
            .arg(&path)
            .current_dir(dir.path())
            .env_remove("SLUICE_CONFIG")
            .env_remove("SLUICE_ADMIN_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        err
    };
    // A TOML syntax error: one line, no source snippet.
    let err = check("syntax.toml", "[server\nlisten = 1\n", &[]);
    assert!(
        err.starts_with("error: TOML parse error at line 1") && err.contains("(in "),
        "{err}"
    );
    // Inside a provider's table: the key itself, not just the table.
    let err = check(
        "provider.toml",
        "[providers.p]\ntype = \"openai\"\ntimeouts = { connect_secs = \"x\" }\n",
        &[],
    );
    assert!(
        err.starts_with("error: providers.p.timeouts.connect_secs: invalid type"),
        "{err}"
    );
    let err = check(
        "weights.toml",
        "[providers.l]\ntype = \"local\"\npath = \"/x\"\nweights = \"q4\"\n",
        &[],
    );
    assert!(
        err.starts_with("error: providers.l.weights: unknown value `q4`; expected one of `auto`"),
        "{err}"
    );
    // A value from the environment names its variable; a secret read as a number says what to do.
    let err = check(
        "env.toml",
        "[providers.p]\ntype = \"openai\"\n",
        &[("SLUICE__PROVIDERS__P__API_KEY", "12345")],
    );
    assert!(
        err.contains("providers.p.api_key: a secret must be a string"),
        "{err}"
    );
    assert!(
        err.contains("(from the environment variable SLUICE__PROVIDERS__P__API_KEY)"),
        "{err}"
    );
    // A variable under an unknown key is named whole, not by the key it made.
    let err = check(
        "servr.toml",
        "[server]\nlisten = \"127.0.0.1:4141\"\n",
        &[("SLUICE__SERVR__LISTEN", "127.0.0.1:1")],
    );
    assert!(
        err.starts_with("error: servr: unknown key `servr`")
            && err
                .trim_end()
                .ends_with("(from the environment variable SLUICE__SERVR__LISTEN)"),
        "{err}"
    );
    // A list item's key path reads as in later checks (`deployments[0]`), and the file as named.
    let err = check(
        "item.toml",
        "[providers.p]\ntype = \"mock\"\n[models.a]\ndeployments = [{ provider = \"p\", model = \"x\", wieght = 1 }]\n",
        &[],
    );
    assert!(
        err.starts_with("error: models.a.deployments[0].wieght: unknown key `wieght`"),
        "{err}"
    );
    let item = dir.path().join("item.toml");
    assert!(
        err.trim_end()
            .ends_with(&format!("(in {})", item.display())),
        "{err}"
    );
    // A model named by a number is a name, not a position.
    let err = check(
        "numbered.toml",
        "[providers.p]\ntype = \"mock\"\n[models.2024]\ndeployments = [{ provider = \"p\", model = \"x\", wieght = 1 }]\n",
        &[],
    );
    assert!(
        err.starts_with("error: models.2024.deployments[0].wieght: unknown key"),
        "{err}"
    );
    // Errors found after parsing name the file too.
    let err = check("listen.toml", "[server]\nlisten = \"nowhere\"\n", &[]);
    assert!(err.starts_with("error: server.listen:"), "{err}");
    assert!(err.trim_end().ends_with("listen.toml)"), "{err}");
    // … unless the value came from a variable or a flag: then that is named (the file was).
    let err = check(
        "fine.toml",
        "[server]\nlisten = \"127.0.0.1:4141\"\n",
        &[("SLUICE__SERVER__LISTEN", "abc")],
    );
    assert!(
        err.trim_end()
            .ends_with("(from the environment variable SLUICE__SERVER__LISTEN)"),
        "{err}"
    );
    let (code, _, err) = run(
        &[
            "serve",
            "--config",
            dir.path().join("fine.toml").to_str().unwrap(),
            "--listen",
            "127.0.0.1:99999",
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.lines()
            .next()
            .unwrap_or_default()
            .ends_with("(from --listen)"),
        "{err}"
    );
}

/// A new key's secret is printed once: if it cannot be, the command fails and says how to
/// recover, instead of exiting 0 with the secret lost.
#[test]
fn a_secret_that_cannot_be_printed_is_an_error() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/keys.db", dir.path().display());
    let out = Command::new(BIN)
        .args(["keys", "create", "--name", "lost", "--store", &store])
        .current_dir(dir.path())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: writing to stdout"), "{err}");
    assert!(err.contains("sluice keys revoke"), "{err}");
    // Other output to a full disk is an error too, not a silent success.
    let out = Command::new(BIN)
        .args(["keys", "list", "--store", &store])
        .current_dir(dir.path())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
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
    // Nothing matches: it says so (and `--json` stays empty); a count out of range is refused.
    let store = s.store_url.clone();
    let dir = s.dir().to_path_buf();
    let (none, none_json, zero) = tokio::task::spawn_blocking(move || {
        (
            run(&["logs", "--store", &store, "--user", "nobody"], &dir),
            run(
                &["logs", "--json", "--store", &store, "--user", "nobody"],
                &dir,
            ),
            run(&["logs", "--store", &store, "-n", "0"], &dir),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        (none.0, none.1.trim()),
        (0, "no requests match these filters")
    );
    assert_eq!((none_json.0, none_json.1.as_str()), (0, ""));
    assert_eq!(zero.0, 2);
    assert!(zero.2.contains("1..=1000"), "{}", zero.2);
    // Paging back: a full page says how to see older records, and --before shows them.
    let store = s.store_url.clone();
    let dir = s.dir().to_path_buf();
    let first = ids[1].clone();
    let (page, back, until) = tokio::task::spawn_blocking(move || {
        (
            run(&["logs", "--store", &store, "-n", "2"], &dir),
            run(&["logs", "--store", &store, "--before", &first], &dir),
            run(
                &[
                    "logs",
                    "--store",
                    &store,
                    "--until",
                    "2000-01-01T00:00:00Z",
                    "--before",
                    &first,
                ],
                &dir,
            ),
        )
    })
    .await
    .unwrap();
    assert_eq!(page.0, 0, "{}", page.2);
    assert!(
        page.1.contains(&ids[1]) && page.1.contains(&ids[2]) && !page.1.contains(&ids[0]),
        "{}",
        page.1
    );
    assert!(
        page.2.contains(&format!("--before {}", ids[1])),
        "{}",
        page.2
    );
    assert_eq!(back.0, 0, "{}", back.2);
    assert!(
        back.1.contains(&ids[0]) && !back.1.contains(&ids[1]),
        "{}",
        back.1
    );
    assert_eq!(
        (until.0, until.1.trim()),
        (0, "no requests match these filters")
    );

    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["logs"], dir.path());
    assert_eq!(code, 2);
    assert!(
        err.contains("no request log") && err.contains("hint:"),
        "{err}"
    );
    // The reports refuse a store that is not there too, and create none.
    let missing = format!("sqlite://{}/none/x.db", dir.path().display());
    for args in [
        vec!["usage", "--store", missing.as_str()],
        vec!["route", "report", "--store", missing.as_str()],
    ] {
        let (code, _, err) = run(&args, dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("no request log"), "{args:?}: {err}");
    }
    assert!(!dir.path().join("none").exists());
}

const COMPLEXITY: &str = r#"
[providers.mock]
type = "mock"

[models."small"]
deployments = [{ provider = "mock", model = "gpt-4o-mini" }]

# The strong tier's price is that of the deployment that serves it (not the first listed).
[models."strong"]
deployments = [
  { provider = "mock", model = "gpt-4o", id = "rare", weight = 0, input_cost_per_mtok = 100.0, output_cost_per_mtok = 100.0 },
  { provider = "mock", model = "gpt-4o", id = "usual" },
]

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
    // Rows name their complexity model (tiers of different models were merged by name).
    assert!(out.starts_with("model"), "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("auto ")),
        "{out}"
    );

    let (code, out, err) = run(&["route", "report", "--config", cfg, "--json"], s.dir());
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let tiers = report["tiers"].as_array().expect("tiers");
    assert!(tiers.iter().all(|t| t["model"] == "auto"), "{report:#}");
    let requests: u64 = tiers.iter().filter_map(|t| t["requests"].as_u64()).sum();
    assert_eq!(
        report["total"]["requests"].as_u64(),
        Some(requests),
        "{report:#}"
    );
    assert_eq!(requests, ids.len() as u64, "{report:#}");

    // A model that is not complexity-routed gets a clear one-line error with a hint, from
    // explain and report alike.
    for args in [
        &[
            "route", "explain", "--config", cfg, "--model", "small", "hi",
        ][..],
        &["route", "report", "--config", cfg, "--model", "small"][..],
    ] {
        let (code, _, err) = run(args, s.dir());
        assert_eq!(code, 2, "{args:?}");
        assert!(
            err.starts_with("error: model `small` uses strategy"),
            "{err}"
        );
        assert!(err.contains("hint:"), "{err}");
    }
    // A model neither configured nor in the log is a misspelling, not an empty report.
    let (code, _, err) = run(
        &["route", "report", "--config", cfg, "--model", "atuo"],
        s.dir(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: no model `atuo` in the configuration or the log"),
        "{err}"
    );
    assert!(
        err.contains("hint: models routed by complexity: auto"),
        "{err}"
    );
    // A configuration that does not load: said with why route needs it, --store or not.
    std::fs::write(s.dir().join("broken.toml"), "[server\n").unwrap();
    let (code, _, err) = run(
        &[
            "route",
            "report",
            "--config",
            "broken.toml",
            "--store",
            &s.store_url,
        ],
        s.dir(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("error: TOML parse error") && err.contains("hint: `sluice route` reads"),
        "{err}"
    );
}

/// Values a client chose are printed with their control characters escaped: a user id cannot
/// forge a line of `sluice logs` or send escape codes to the terminal. `logs` and `usage` with
/// `--store` do not read the configuration, so an error in it does not stop them.
#[tokio::test]
async fn logs_escape_what_clients_sent_and_read_a_named_store_whatever_the_config() {
    let s = Sluice::start(crate::openai_api::MOCK).await;
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"model": "mock-echo", "user": "eve\n2026-01-01 FAKE \u{1b}[31mRED",
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.record(&request_id(&resp)).await;
    let store = format!("sqlite://{}", s.dir().join("sluice.db").display());
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("sluice.toml"), "[server]\nlisen = 1\n").unwrap();
    let (code, out, err) = run(&["logs", "--store", &store], broken.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        2,
        "the header, then one record on one line: {out}"
    );
    assert!(out.starts_with("STARTED (UTC)"), "{out}");
    assert!(
        out.contains("user=eve\\n2026-01-01 FAKE \\u{1b}[31mRED"),
        "{out}"
    );
    assert!(!out.contains('\u{1b}'), "{out:?}");
    let (code, out, err) = run(&["usage", "--store", &store, "-g", "user"], broken.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains('\u{1b}') && out.contains("eve\\n2026"),
        "{out:?}"
    );
    // Without --store the configuration is needed, and its error says how to get past it.
    let (code, _, err) = run(&["logs"], broken.path());
    assert_eq!(code, 2);
    assert!(err.starts_with("error: server.lisen"), "{err}");
    assert!(err.contains("or name the store with --store"), "{err}");
}

/// A password in the store URL is never printed: `config check` and a store that cannot be
/// opened show it as `***`.
#[test]
fn store_passwords_are_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[store]\nurl = \"postgres://app:hunter2@127.0.0.1:1/sluice\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["config", "check"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("postgres://app:***@127.0.0.1:1/sluice"),
        "{out}"
    );
    let (code, out, err) = run(&["logs"], dir.path());
    assert_eq!(code, 2);
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    assert!(err.contains("postgres://app:***@"), "{err}");
}

/// `sluice keys`: create, list, show, rotate and revoke virtual keys straight in the store.
#[test]
fn keys_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/s.db", dir.path().display());
    // The configuration of the gateways here, whose models a new key's are compared with.
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[providers.mock]\ntype = \"mock\"\n[models.\"mock-echo\"]\ndeployments = [{ provider = \"mock\", model = \"mock-echo\" }]\n",
    )
    .unwrap();
    let keys = |args: &[&str]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", &store]);
        run(&all, dir.path())
    };

    // No store yet: an empty list, and no file made by looking.
    let (code, out, err) = keys(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no keys"), "{out}");
    assert!(!dir.path().join("s.db").exists());

    let (code, out, err) = keys(&[
        "create",
        "--name",
        "ci bot",
        "--team",
        "search",
        "--models",
        "gpt-4o-mini,mock-echo",
        "--rpm",
        "60",
        "--budget-daily",
        "5",
        "--expires",
        "30d",
        "--metadata",
        r#"{"ticket": "OPS-1"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    // A model no configuration here serves is created, with a warning naming it.
    assert!(
        err.contains("warning: the configuration has no model `gpt-4o-mini`"),
        "{err}"
    );
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-sluice-"))
        .unwrap_or_else(|| panic!("no key in {out}"))
        .to_string();
    assert!(out.contains("will not be shown again"), "{out}");
    let id = key["sk-sluice-".len()..][..16].to_string();
    assert!(out.contains(&id), "{out}");

    // --json: the key once more in a document, for scripts.
    let (code, out, err) = keys(&["create", "--name", "other", "--json"]);
    assert_eq!(code, 0, "{err}");
    let other: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(other["key"].as_str().unwrap().starts_with("sk-sluice-"));
    assert_eq!(other["name"], "other");
    assert_eq!(other["status"], "active");
    let other_id = other["id"].as_str().unwrap().to_string();
    assert!(other.get("hash").is_none(), "{other}");

    let (code, out, err) = keys(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id) && out.contains("ci bot"), "{out}");
    assert!(out.contains(&other_id) && out.contains("other"), "{out}");
    assert!(
        out.contains("team=search") && out.contains("rpm=60"),
        "{out}"
    );
    assert!(!out.contains("sk-sluice-"), "list never shows a key: {out}");
    let (code, out, _) = keys(&["list", "--json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed["object"], "list", "the shape of GET /api/keys");
    assert_eq!(
        listed["data"].as_array().map(Vec::len),
        Some(2),
        "{listed:#}"
    );
    assert_eq!(listed["data"][0]["id"], other_id.as_str(), "newest first");
    assert!(!out.contains("sk-sluice-"), "{out}");

    let (code, out, err) = keys(&["show", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["name"], "ci bot");
    assert_eq!(shown["owner"]["team"], "search");
    assert_eq!(shown["models"], json!(["gpt-4o-mini", "mock-echo"]));
    assert_eq!(shown["rpm"], 60);
    assert_eq!(shown["budget"]["daily_usd"], 5.0);
    assert_eq!(shown["metadata"]["ticket"], "OPS-1");
    assert!(shown["expires_at"].is_string(), "{shown:#}");
    assert_eq!(shown["status"], "active");
    assert!(shown.get("key").is_none() && shown.get("hash").is_none());
    let (code, out, _) = keys(&["show", &id]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ci bot") && !out.contains("sk-sluice-"),
        "{out}"
    );
    // The whole key stands for its id, and its secret is never repeated (it was, in the
    // error); a string shaped otherwise is refused without echoing it.
    let (code, out, err) = keys(&["show", &key]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ci bot") && !out.contains(&key), "{out}");
    let (code, _, err) = keys(&["show", "sk-sluice-nothex-secretpart"]);
    assert_ne!(code, 0);
    assert!(
        !err.contains("secretpart") && err.contains("hint:"),
        "{err}"
    );

    let (code, out, err) = keys(&["rotate", &id]);
    assert_eq!(code, 0, "{err}");
    let rotated = out
        .split_whitespace()
        .find(|w| w.starts_with("sk-sluice-"))
        .unwrap_or_else(|| panic!("no key in {out}"));
    assert!(rotated.starts_with(&format!("sk-sluice-{id}-")), "{out}");
    assert_ne!(rotated, key);

    let (code, _, err) = keys(&["revoke", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = keys(&["list"]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.contains(&id)).expect("revoked row");
    assert!(row.contains("revoked"), "{out}");
    let row = out.lines().find(|l| l.contains(&other_id)).expect("row");
    assert!(row.contains("active") && row.contains("client"), "{out}");

    // Each change is in the audit log, by the command line.
    let audit = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let stores = sluice_store::open_all(&store, 1).await.unwrap();
        stores.audit.list_audit(100).await.unwrap()
    });
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|e| (e.action.as_str(), e.target.as_deref().unwrap_or("")))
        .collect();
    for want in [
        ("keys.create", id.as_str()),
        ("keys.create", other_id.as_str()),
        ("keys.rotate", id.as_str()),
        ("keys.revoke", id.as_str()),
    ] {
        assert!(actions.contains(&want), "{want:?} in {actions:?}");
    }
    assert!(audit.iter().all(|e| e.actor == "cli" && e.outcome == "ok"));

    // Revoking or rotating again, or an unknown id: one line and a hint, status 2.
    for args in [
        ["revoke", id.as_str()],
        ["rotate", id.as_str()],
        ["revoke", "0000000000000000"],
        ["show", "0000000000000000"],
    ] {
        let (code, _, err) = keys(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains("hint:"), "{args:?}: {err}");
    }
    // The refused changes are in the audit log too, as the API's failed writes are.
    let audit = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let stores = sluice_store::open_all(&store, 1).await.unwrap();
        stores.audit.list_audit(100).await.unwrap()
    });
    let failed: Vec<(&str, &str)> = audit
        .iter()
        .filter(|e| e.action == "failed" && e.actor == "cli")
        .map(|e| (e.target.as_deref().unwrap_or(""), e.outcome.as_str()))
        .collect();
    for want in [
        (format!("keys revoke {id}"), "revoked"),
        (format!("keys rotate {id}"), "revoked"),
        ("keys revoke 0000000000000000".to_string(), "not_found"),
    ] {
        assert!(
            failed.contains(&(want.0.as_str(), want.1)),
            "{want:?} in {failed:?}"
        );
    }

    // Bad command lines.
    let (code, _, err) = keys(&["create"]);
    assert_eq!(code, 2);
    assert!(err.contains("--name"), "{err}");
    let (code, _, err) = keys(&["create", "--name", "x", "--rpm", "0"]);
    assert_eq!(code, 2);
    // Errors name the flag given, not the API's field.
    assert!(
        err.starts_with("error: --rpm: a limit must be at least 1"),
        "{err}"
    );
    for (flag, value, says) in [
        ("--metadata", "[1]", "--metadata: must be a JSON object"),
        ("--metadata", "{", "--metadata is not valid JSON"),
        (
            "--expires",
            "2001-01-01T00:00:00Z",
            "--expires: 2001-01-01T00:00:00Z is in the past",
        ),
        ("--expires", "-5d", "--expires"),
        (
            "--budget-total",
            "-1",
            "--budget-total: must be a non-negative",
        ),
        (
            "--max-parallel",
            "0",
            "--max-parallel: a limit must be at least 1",
        ),
    ] {
        let (code, _, err) = keys(&["create", "--name", "x", flag, value]);
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(says),
            "{flag} {value}: {err}"
        );
    }
    let (_, out, _) = keys(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        listed["data"].as_array().map(Vec::len),
        Some(2),
        "refused keys are not stored"
    );

    // The store of the configuration file, without --store.
    std::fs::write(
        dir.path().join("sluice.toml"),
        format!("[store]\nurl = \"{store}\"\n"),
    )
    .unwrap();
    let (code, out, err) = run(&["keys", "list"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&id) && out.contains(&other_id), "{out}");
}

#[test]
fn serve_names_the_deployments_it_cannot_price() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sluice.toml"),
        "[providers.up]\ntype = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key = \"k\"\n\
         [models.\"fast\"]\ndeployments = [{ provider = \"up\", model = \"gpt-4o-mini-2024-07-18\" }]\n\
         [models.\"mini\"]\ndeployments = [{ provider = \"up\", model = \"o1-mini\" }]\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "sqlite::memory:",
        ])
        .current_dir(dir.path())
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ADMIN_KEY")
        .env("SLUICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let note = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take(20)
        .find(|l| l.contains("no price"));
    let _ = child.kill();
    let _ = child.wait();
    let note = note.expect("a note naming the unpriced deployments");
    // o1-mini is not priced as o1; a dated snapshot of gpt-4o-mini is priced.
    assert!(note.contains("mini (o1-mini)"), "{note}");
    assert!(!note.contains("fast"), "{note}");
}

#[test]
fn sighup_does_not_stop_a_server_on_the_embedded_default() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ADMIN_KEY")
        .env("SLUICE_MODELS_DIR", &models)
        .env("SLUICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("listening on"));
    assert!(started, "the server did not start");
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    signal("-HUP");
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the server"
    );
    signal("-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_reader_that_stops_early_ends_the_output_quietly() {
    let s = Sluice::start(MOCK).await;
    let http = reqwest::Client::new();
    let long = "many words ".repeat(400);
    let mut last = String::new();
    for _ in 0..60 {
        let r = http
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": long}]}))
            .send()
            .await
            .unwrap();
        last = request_id(&r);
    }
    s.record(&last).await;
    let store = s.store_url.clone();
    let dir = s.dir().to_path_buf();
    // Far more than a pipe holds; the reader takes one line and closes it (`| head -1`).
    let (code, err) = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(BIN)
            .args(["logs", "--json", "-n", "60", "--store", &store])
            .current_dir(&dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.starts_with('{'), "{first}");
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `demo` and `models` read no configuration: a `--config` is refused, not silently ignored,
/// and their help does not offer one.
#[test]
fn commands_without_a_configuration_refuse_one() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["demo", "--help"][..],
        &["models", "--help"][..],
        &["models", "list", "--help"][..],
        &["models", "pull", "--help"][..],
    ] {
        let (code, out, err) = run(args, dir.path());
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!out.contains("--config"), "{args:?}: {out}");
    }
    let (_, out, _) = run(&["serve", "--help"], dir.path());
    assert!(out.contains("-c, --config"), "{out}");
    for args in [
        &["demo", "-c", "mine.toml"][..],
        &["models", "list", "--config", "mine.toml"][..],
        &["-c", "mine.toml", "models", "pull", "all"][..],
        &["models", "-c", "mine.toml", "list"][..],
    ] {
        let (code, _, err) = run(args, dir.path());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.starts_with("error: --config mine.toml does not apply here")
                && err.contains("hint:"),
            "{args:?}: {err}"
        );
    }
}

/// `store.spill_path` names a file: a directory is refused before anything could be spilled
/// into nothing.
#[test]
fn a_spill_path_that_is_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sluice.toml"),
        format!(
            "[store]\nspill_path = {:?}\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["config", "check", "-c", "sluice.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("spill_path") && err.contains("is a directory"),
        "{err}"
    );
}

/// A closed stderr (`sluice serve 2>&1 | head -3`, its reader gone) stops nothing: a command's
/// error still exits with its status, and the gateway logs into the void and goes on serving
/// (both panicked on the first write, the gateway at startup).
#[cfg(unix)]
#[tokio::test]
async fn a_closed_stderr_stops_nothing() {
    use std::io::{BufRead, BufReader};
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let out = Command::new(BIN)
        .args(["logs", "--status", "bogus", "--store", &store])
        .current_dir(dir.path())
        .stderr(closed())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    std::fs::write(
        dir.path().join("sluice.toml"),
        format!("[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"{store}\"\n{MOCK}"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "-c", "sluice.toml"])
        .current_dir(dir.path())
        .env_remove("SLUICE_ADMIN_KEY")
        .env("SLUICE_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(closed())
        .spawn()
        .unwrap();
    let mut base = None;
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(rest) = line.split("listening on ").nth(1) {
            base = Some(rest.trim().to_string());
            break;
        }
    }
    let Some(base) = base else {
        panic!("no listen address; exit {:?}", child.wait());
    };
    let status = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map(|r| r.status().as_u16());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(status.ok(), Some(200));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// A SQLite URL without a file (`sqlite:`, `sqlite://`) is refused by `config check` and the
/// read commands, with the key path: it passed the check, and `serve` then failed with a raw
/// "no such table" (each connection had a private temporary database).
#[test]
fn a_sqlite_url_without_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for url in ["sqlite:", "sqlite://"] {
        std::fs::write(
            dir.path().join("sluice.toml"),
            format!("[store]\nurl = \"{url}\"\n"),
        )
        .unwrap();
        let (code, _, err) = run(&["config", "check", "-c", "sluice.toml"], dir.path());
        assert_eq!(code, 2, "{url}: {err}");
        assert!(
            err.contains("store.url") && err.contains("names no file"),
            "{url}: {err}"
        );
        for args in [
            &["logs", "--store", url][..],
            &["usage", "--store", url][..],
            &["keys", "list", "--store", url][..],
        ] {
            let (code, _, err) = run(args, dir.path());
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(err.contains("names no file"), "{args:?}: {err}");
        }
    }
}

/// A configuration without models is said to refuse every request, by `config check` and at
/// `serve`'s start (both passed it in silence; only a reload refused it); a model or provider
/// name with control characters is refused, shown escaped (it reached the terminal raw).
#[tokio::test]
async fn names_and_missing_models_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.toml"), "").unwrap();
    let (code, out, err) = run(&["config", "check", "-c", "empty.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning: no models are configured"), "{out}");
    let s = Sluice::start("").await;
    // The banner's lines after the address arrive a moment later.
    let mut banner = String::new();
    for _ in 0..100 {
        banner = s.stdout().join("\n");
        if banner.contains("warning:") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        banner.contains("warning: no models are configured"),
        "{banner}"
    );

    for table in [
        "[models.\"a\\u001b]0;pwned\\u0007b\"]\ndeployments = [{ provider = \"mock\", model = \"x\" }]\n[providers.mock]\ntype = \"mock\"\n",
        "[providers.\"m\\u001bk\"]\ntype = \"mock\"\n",
    ] {
        std::fs::write(dir.path().join("ctl.toml"), table).unwrap();
        let (code, _, err) = run(&["config", "check", "-c", "ctl.toml"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("must be printable") && err.contains("\\u{1b}") && !err.contains('\u{1b}'),
            "{err}"
        );
    }
}

/// A spill file that cannot be written stops `serve` at its start with the key and a hint,
/// rather than losing the records of the first store outage.
#[test]
fn a_spill_path_that_cannot_be_written_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plain-file"), "").unwrap();
    std::fs::write(
        dir.path().join("sluice.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}\"\nspill_path = \"{}\"\n{MOCK}",
            dir.path().join("sluice.db").display(),
            dir.path().join("plain-file").join("spill.jsonl").display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&["serve", "-c", "sluice.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("store.spill_path: cannot write") && err.contains("hint:"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("probe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Errors that named the wrong thing: a `base_url` without a host (it showed `http:` and said
/// it must start with http://), one that is no URL (it showed a path the user never wrote), a
/// file that is not UTF-8 (no line, no hint), a key's owner flag (named by its API field).
#[test]
fn errors_name_what_the_user_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let provider = |base: &str| {
        format!("[providers.p]\ntype = \"openai\"\nbase_url = \"{base}\"\napi_key = \"k\"\n")
    };
    for (base, says) in [
        ("http://", "base_url: `http://` has no host"),
        (
            "http://exa mple.com/v1",
            "base_url: `http://exa mple.com/v1` is not a URL",
        ),
    ] {
        std::fs::write(dir.path().join("b.toml"), provider(base)).unwrap();
        let (code, _, err) = run(&["config", "check", "-c", "b.toml"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(says), "{base}: {err}");
    }
    std::fs::write(dir.path().join("latin1.toml"), b"# ok\n# caf\xe9\n").unwrap();
    let (code, _, err) = run(&["config", "check", "-c", "latin1.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not UTF-8 text (line 2") && err.contains("hint:"),
        "{err}"
    );
    let store = format!("sqlite://{}", dir.path().join("s.db").display());
    let team = "t".repeat(300);
    let (code, _, err) = run(
        &[
            "keys", "create", "--name", "n", "--team", &team, "--store", &store,
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with("error: --team: at most 256 bytes"), "{err}");
    let (code, _, err) = run(&["logs", "--store", &store, "--before", "nope"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`nope` is not a request id"), "{err}");
    // A port in use: the system's words and the likely cause.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    std::fs::write(dir.path().join("m.toml"), MOCK).unwrap();
    let (code, _, err) = run(
        &[
            "serve", "-c", "m.toml", "--listen", &addr, "--store", &store,
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr}: "))
            && err.contains("is another process using it?"),
        "{err}"
    );
}
