//! Starts the real `sluice` binary for end-to-end tests: a config in a temp dir, port 0, an
//! SQLite store in the same dir unless the test names another.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A running `sluice serve`.
pub struct Sluice {
    child: Option<Child>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub store_url: String,
    stdout: Arc<Mutex<Vec<String>>>,
    pub admin_key: Option<String>,
}

/// How to start one.
#[derive(Default)]
pub struct Opts<'a> {
    /// `[providers…]` and `[models…]` tables (and any other table but [server] and [store]).
    pub config: &'a str,
    /// Store URL; default SQLite in the temp dir.
    pub store_url: Option<String>,
    /// Extra `[store]` keys, e.g. `bodies = "none"`.
    pub store_extra: &'a str,
    /// Extra `[server]` keys.
    pub server_extra: &'a str,
    pub env: Vec<(&'a str, String)>,
    pub admin_key: Option<&'a str>,
}

impl Sluice {
    pub async fn start(config: &str) -> Sluice {
        Self::start_opts(Opts {
            config,
            ..Opts::default()
        })
        .await
    }

    pub async fn start_opts(opts: Opts<'_>) -> Sluice {
        let dir = tempfile::tempdir().expect("temp dir");
        let store_url = opts
            .store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("sluice.db").display()));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n{}\n[store]\nurl = \"{}\"\n{}\n{}",
            opts.server_extra, store_url, opts.store_extra, opts.config
        );
        let cfg = dir.path().join("sluice.toml");
        std::fs::write(&cfg, text).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .current_dir(dir.path())
            .env_remove("SLUICE_ADMIN_KEY")
            .env_remove("SLUICE_CONFIG")
            .env("SLUICE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file"),
            ));
        if let Some(k) = opts.admin_key {
            cmd.env("SLUICE_ADMIN_KEY", k);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let _ = tx.send(rest.trim().to_string());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                let err =
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                panic!("sluice did not start; stderr:\n{err}");
            }
        };
        Sluice {
            child: Some(child),
            base,
            dir,
            store_url,
            stdout: lines,
            admin_key: opts.admin_key.map(str::to_string),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("sluice did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn admin(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.admin_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// The stored record of a request, waiting for the log writer (up to 5 s).
    pub async fn record(&self, id: &str) -> Value {
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            let resp = self
                .admin(http.get(self.url(&format!("/api/requests/{id}"))))
                .send()
                .await
                .expect("GET record");
            if resp.status() == 200 {
                return resp.json().await.expect("record json");
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "record {id} never appeared (last status {})",
                resp.status()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `POST {path}` with a JSON body; returns the JSON answer, whatever its status.
    pub async fn post_json(&self, path: &str, body: &Value) -> Value {
        reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: the answer is not JSON: {e}"))
    }

    /// `POST /api/keys` with `spec` (as the admin when there is an admin key); returns the
    /// answer: the key (shown once), its id and its fields.
    pub async fn create_key(&self, spec: Value) -> Value {
        let resp = self
            .admin(reqwest::Client::new().post(self.url("/api/keys")))
            .json(&spec)
            .send()
            .await
            .expect("POST /api/keys");
        assert_eq!(resp.status(), 201, "create {spec}");
        resp.json().await.expect("key json")
    }

    /// The JSON answer of a `GET` of `path` (with the admin key when there is one).
    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.admin(reqwest::Client::new().get(self.url(path)))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// `GET /api/requests?{query}`.
    pub async fn list(&self, query: &str) -> Value {
        let http = reqwest::Client::new();
        self.admin(http.get(self.url(&format!("/api/requests?{query}"))))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("list json")
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The request id header of a response.
pub fn request_id(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-sluice-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-sluice-request-id on every response")
        .to_string()
}

/// Splits an SSE body into (event name, data) pairs.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (event, data)
        })
        .collect()
}

/// A config with one provider `up` of `kind` pointing at the mock upstream and models named
/// after the upstream's behaviours (`m-echo` → `echo`, `m-fault-500` → `fault-500`, …).
pub fn provider_config(kind: &str, upstream: &str, models: &[&str]) -> String {
    let provider = match kind {
        "openai" => format!(
            "[providers.up]\ntype = \"openai\"\nbase_url = \"{upstream}/v1\"\napi_key = \"test-key\"\ntimeouts = {{ request_secs = 2, stream_idle_secs = 2 }}\n"
        ),
        "azure" => format!(
            "[providers.up]\ntype = \"azure\"\nbase_url = \"{upstream}\"\napi_key = \"test-key\"\napi_version = \"2024-10-21\"\ntimeouts = {{ request_secs = 2, stream_idle_secs = 2 }}\n"
        ),
        "anthropic" => format!(
            "[providers.up]\ntype = \"anthropic\"\nbase_url = \"{upstream}\"\napi_key = \"test-key\"\ntimeouts = {{ request_secs = 2, stream_idle_secs = 2 }}\n"
        ),
        "gemini" => format!(
            "[providers.up]\ntype = \"gemini\"\nbase_url = \"{upstream}\"\napi_key = \"test-key\"\ntimeouts = {{ request_secs = 2, stream_idle_secs = 2 }}\n"
        ),
        other => panic!("unknown provider kind {other}"),
    };
    let mut out = provider;
    for m in models {
        out.push_str(&format!(
            "[models.\"m-{m}\"]\ndeployments = [{{ provider = \"up\", model = \"{m}\" }}]\nretries = {{ retries = 0 }}\n"
        ));
    }
    out
}
