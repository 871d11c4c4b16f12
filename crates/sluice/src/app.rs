//! `sluice serve`: builds every component from the validated config and runs the server until
//! SIGTERM/SIGINT, then drains in-flight requests and the request log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_core::record::{LogSink, LogStore};
use sluice_core::secret::Secret;
use sluice_gateway::{BodyMode, Gateway, Metrics};
use sluice_server::AppState;
use sluice_store::BodyModeConfig;
use sluice_store::writer::LogWriter;

use parking_lot::Mutex;
use sluice_gateway::state::{Shared, StateConfig};
use sluice_server::ServerConfig;
use sluice_store::StoreConfig;

use crate::config::{BuiltProviders, Config, Overrides, Source};

/// The admin key from `SLUICE_ADMIN_KEY`, if set. One that is not UTF-8 is an error, not
/// unset: the API would be open while the operator thinks a key guards it.
pub fn admin_key() -> anyhow::Result<Option<Secret>> {
    match std::env::var("SLUICE_ADMIN_KEY") {
        Ok(k) => Ok(Some(k.trim()).filter(|k| !k.is_empty()).map(Secret::new)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!(
            "SLUICE_ADMIN_KEY is not valid UTF-8\nhint: use printable characters (for example the output of `openssl rand -hex 32`)"
        ),
    }
}

/// Refuses to expose an unauthenticated gateway beyond this machine.
pub fn check_exposure(addr: SocketAddr, admin_key: &Option<Secret>) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() && admin_key.is_none() {
        bail!(
            "refusing to listen on {addr} without an admin key: the API would be open to the network\nhint: export SLUICE_ADMIN_KEY=<a long random secret> (clients then send it as their API key), or listen on 127.0.0.1"
        );
    }
    Ok(())
}

/// Where records go if the store stays unavailable: `store.spill_path`, else beside the SQLite
/// file, or under `./sluice-data/` for PostgreSQL.
pub fn spill_path(store: &sluice_store::StoreConfig) -> PathBuf {
    if let Some(p) = &store.spill_path {
        return p.clone();
    }
    let url = &store.url;
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .map(|p| p.split('?').next().unwrap_or(p))
        .filter(|p| !p.contains(":memory:"))
        && let Some(dir) = std::path::Path::new(path).parent()
    {
        return dir.join("spill.jsonl");
    }
    PathBuf::from("sluice-data").join("spill.jsonl")
}

/// Refuses a spill file that cannot be written, or whose directory cannot take new files (a
/// replay claims the file by a new name there): it is where request records go while the store
/// is down, and finding out then would lose them. Leaves no file behind that was not there
/// (the directories it creates stay).
fn check_spill_writable(path: &std::path::Path) -> Result<(), String> {
    let refused = |e: std::io::Error| {
        format!(
            "store.spill_path: cannot write `{}`: {e} (it takes request records while the store is down)\nhint: name a writable file with store.spill_path",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(refused)?;
    }
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(refused)?;
    }
    // A file of its own: another replica may be creating the spill file itself meanwhile.
    let mut probe = path.as_os_str().to_owned();
    probe.push(format!(".probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(refused)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Everything a running gateway is made of.
pub struct Running {
    pub state: Arc<AppState>,
    pub writer: LogWriter,
}

/// Re-reads the configuration file and swaps the gateway's router. Providers and deployments
/// whose configuration did not change are kept (a local model is not loaded again; breakers and
/// latency averages carry over).
pub struct Reloader {
    source: Source,
    overrides: Overrides,
    gateway: Arc<Gateway>,
    providers: Mutex<BuiltProviders>,
    started_with: (ServerConfig, StoreConfig, StateConfig, CacheFixed),
}

/// What of `[cache]` is fixed when the server starts: its memory bounds and `persist`.
type CacheFixed = (u64, u64, bool);

fn cache_fixed(c: &sluice_gateway::cache::CacheConfig) -> CacheFixed {
    (c.max_entries, c.max_bytes, c.persist)
}

impl sluice_server::Reload for Reloader {
    fn reload(&self) -> Result<String, String> {
        // One reload at a time; the lock also guards the providers kept from the last one.
        let mut providers = self.providers.lock();
        if let Source::File(p) = &self.source
            && !p.is_file()
        {
            return Err(format!(
                "config file `{}` {} (hint: put it back, then reload again)",
                p.display(),
                if p.is_dir() {
                    "is a directory now, not a file"
                } else {
                    "no longer exists"
                }
            ));
        }
        let raw = crate::config::load_raw(&self.source, &self.overrides)?;
        let old = self.gateway.router();
        let cfg = Config::from_raw_reusing(self.source.clone(), raw, Some((&providers, &old)))
            .map_err(|e| crate::config::in_source(e, &self.source, &self.overrides))?;
        let models: Vec<String> = cfg.router.names().map(str::to_string).collect();
        if models.is_empty() && old.names().next().is_some() {
            // An empty or half-written file (an editor that truncates before it writes, a
            // deploy tool racing the signal) would answer every request 404.
            return Err(format!(
                "{} configures no models, which would leave every request unanswered (hint: check the file is whole, then reload again)",
                match &self.source {
                    Source::File(p) => format!("config file `{}`", p.display()),
                    _ => "the configuration".to_string(),
                }
            ));
        }
        let restart = if cfg.server != self.started_with.0
            || cfg.store != self.started_with.1
            || cfg.state != self.started_with.2
            || cache_fixed(&cfg.router.cache) != self.started_with.3
        {
            "; [server], [store], [state] and [cache] max_entries, max_bytes and persist changes take effect at the next restart"
        } else {
            ""
        };
        *providers = cfg.providers;
        self.gateway.swap_router(cfg.router);
        tracing::info!(models = %models.join(","), "configuration reloaded");
        Ok(format!(
            "{} model{}: {}{restart}",
            models.len(),
            if models.len() == 1 { "" } else { "s" },
            models.join(", ")
        ))
    }
}

/// Opens the store, starts the log writer and builds the gateway.
pub async fn build(cfg: Config, admin_key: Option<Secret>) -> anyhow::Result<Running> {
    build_with(cfg, admin_key, None).await
}

/// Same, with the overrides to apply again on reload.
pub async fn build_with(
    cfg: Config,
    admin_key: Option<Secret>,
    overrides: Option<Overrides>,
) -> anyhow::Result<Running> {
    let stores = sluice_store::open_all(&cfg.store.url, cfg.store.max_connections)
        .await
        .with_context(|| {
            format!(
                "opening the store at {}",
                crate::display::redact_url(&cfg.store.url)
            )
        })?;
    let store: Arc<dyn LogStore> = stores.log.clone();
    let key_store = stores.keys.clone();
    let audit = stores.audit.clone();
    let keys = sluice_server::keys::KeyCache::load(key_store)
        .await
        .with_context(|| {
            format!(
                "reading the virtual keys from {}",
                crate::display::redact_url(&cfg.store.url)
            )
        })?;
    keys.spawn_refresher(sluice_server::keys::REFRESH_EVERY);
    // Records a writer left in the spill file while the store was down go to the store, in the
    // background: after a long outage that can be millions of records, and the gateway serves
    // meanwhile (a claim a crashed start left is taken over; the writer's own replays leave it).
    let spill = spill_path(&cfg.store);
    check_spill_writable(&spill).map_err(anyhow::Error::msg)?;
    let shared = Shared::connect(&cfg.state)
        .await
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    // Records reach the store through this: with shared budget ledgers, a cost a rebuilt
    // ledger could not see yet (its record queued or spilled) is added to it as it is written.
    let written: Arc<dyn LogStore> = match &shared {
        Some(s) => Arc::new(sluice_gateway::late_costs::LateCosts::new(
            store.clone(),
            s.clone(),
        )),
        None => store.clone(),
    };
    {
        let (store, spill) = (written.clone(), spill.clone());
        tokio::spawn(async move {
            match sluice_store::writer::replay_spill(store.as_ref(), &spill).await {
                Ok(r) if r.records > 0 || r.bad_lines > 0 || r.rejected > 0 => tracing::warn!(
                    records = r.records,
                    unreadable_lines = r.bad_lines,
                    refused_by_the_store = r.rejected,
                    path = %spill.display(),
                    "request records from the spill file written to the store"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    path = %spill.display(),
                    "the spill file's request records could not be written to the store yet; the writer tries again while the store answers"
                ),
            }
        });
    }
    let (sink, rx) = LogSink::bounded(cfg.store.queue_capacity, cfg.store.queue_bytes);
    let metrics = Arc::new(Metrics::new());
    let writer = LogWriter::spawn_observed(
        written,
        rx,
        cfg.store.batch_size,
        spill,
        Duration::from_millis(cfg.store.flush_interval_ms),
        Some(metrics.clone() as Arc<dyn sluice_core::record::WriterObserver>),
    );
    let bodies = match cfg.store.bodies {
        BodyModeConfig::Full => BodyMode::Full,
        BodyModeConfig::None => BodyMode::None,
    };
    let remote = sluice_gateway::cache::shared_tier(
        cfg.router.cache.persist,
        shared
            .as_ref()
            .map(|s| s.clone() as Arc<dyn sluice_core::usage::CacheStore>),
        stores.cache.clone(),
    );
    let cache = Arc::new(sluice_gateway::cache::Cache::new(
        cfg.router.cache.clone(),
        remote,
    ));
    {
        // Expired answers leave the persistent tier every ten minutes (memory expires its own).
        let cache = Arc::downgrade(&cache);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(600)).await;
                let Some(cache) = cache.upgrade() else { return };
                let purged = cache.purge().await;
                if purged > 0 {
                    tracing::debug!(purged, "expired cache entries removed");
                }
            }
        });
    }
    if cache.is_shared() {
        // A clear on another replica reaches this one's memory tier within a second.
        let cache = Arc::downgrade(&cache);
        tokio::spawn(async move {
            loop {
                let Some(cache) = cache.upgrade() else { return };
                cache.follow_clears().await;
                drop(cache);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let usage = stores.usage.clone();
    let cache_at_start = cache_fixed(&cfg.router.cache);
    let gateway = Arc::new(
        Gateway::new(cfg.router, sink, metrics, bodies)
            .with_state(Some(usage.clone()), shared)
            .with_cache(cache),
    );
    let reloader: Option<Arc<dyn sluice_server::Reload>> = match (&cfg.source, overrides) {
        (Source::File(_), Some(overrides)) => Some(Arc::new(Reloader {
            source: cfg.source.clone(),
            overrides,
            gateway: gateway.clone(),
            providers: Mutex::new(cfg.providers),
            started_with: (
                cfg.server.clone(),
                cfg.store.clone(),
                cfg.state.clone(),
                cache_at_start,
            ),
        })),
        _ => None,
    };
    let state = Arc::new(AppState {
        gateway,
        store,
        admin_key,
        max_body_bytes: cfg.server.max_body_bytes,
        cors: cfg
            .server
            .cors()
            .map_err(|e| anyhow::anyhow!("server.{e}"))?,
        reloader,
        keys: Some(keys),
        audit: Some(audit),
        usage: Some(usage),
        abort: Arc::new(tokio::sync::watch::channel(false).0),
    });
    Ok(Running { state, writer })
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM; returns the exit status a process stopped by it gives
/// (128 + the signal's number: 130 or 143).
pub(crate) async fn shutdown_signal() -> u8 {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return 130;
                }
            };
        tokio::select! {
            _ = ctrl_c => 130,
            _ = term.recv() => 143,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
        130
    }
}

/// Reloads the configuration on every SIGHUP. A server on the embedded default has no file to
/// reload: it says so and keeps running (SIGHUP must never stop it, which is the signal's default
/// action, and would lose the queued records).
fn reload_on_hangup(state: &Arc<AppState>) {
    #[cfg(unix)]
    {
        let reloader = state.reloader.as_ref().map(Arc::downgrade);
        // A reload by signal is an admin action like one by the API: it goes in the audit log,
        // by `sighup`.
        let audit = state.audit.clone();
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        // A weak handle: the reloader holds the gateway, and with it the log queue's sender, which
        // must go when the server stops so that the log writer sees the queue end and drains.
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(reloader) = &reloader else {
                    tracing::warn!(
                        "SIGHUP: this server runs on the embedded default and has no configuration file to reload"
                    );
                    continue;
                };
                let Some(r) = reloader.upgrade() else { return };
                let (outcome, detail) = match tokio::task::spawn_blocking(move || r.reload()).await
                {
                    Ok(Ok(summary)) => {
                        tracing::info!(%summary, "SIGHUP: configuration reloaded");
                        ("ok", serde_json::json!({ "summary": summary }))
                    }
                    Ok(Err(e)) => {
                        tracing::error!(
                            error = %e,
                            "SIGHUP: the configuration was not reloaded; the running one stays"
                        );
                        ("rejected", serde_json::json!({ "error": e }))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: the reload task failed");
                        continue;
                    }
                };
                if let Some(store) = &audit {
                    let actor = sluice_core::keys::Actor {
                        name: "sighup".into(),
                        role: sluice_core::keys::Role::Admin,
                    };
                    sluice_server::keys::record_audit(
                        store,
                        &actor,
                        "config.reload",
                        None,
                        outcome,
                        detail,
                    )
                    .await;
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// The remote deployments with no price (a local or mock model costs nothing anyway), as
/// `model (upstream model)`.
fn unpriced_deployments(router: &sluice_gateway::router::Router) -> Vec<String> {
    let mut out = Vec::new();
    for name in router.names() {
        for d in router.group(name).map_or(&[][..], |g| &g.deployments[..]) {
            let kind = d.dep.provider.kind();
            if d.dep.price.is_none() && !matches!(kind, "local" | "mock") {
                let item = format!("{name} ({})", d.dep.model);
                if !out.contains(&item) {
                    out.push(item);
                }
            }
        }
    }
    out
}

pub async fn serve(cfg: Config, overrides: Overrides) -> anyhow::Result<()> {
    let addr = cfg.server.addr().map_err(anyhow::Error::msg)?;
    let key = admin_key()?;
    check_exposure(addr, &key)?;
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let source = cfg.source.to_string();
    let mock_fallback = cfg.source == crate::config::Source::EmbeddedDefault
        && cfg.router.group("mock-echo").is_some();
    let store_url = crate::display::redact_url(&cfg.store.url);
    let spill = spill_path(&cfg.store);
    let models: Vec<String> = cfg.router.names().map(str::to_string).collect();
    let unpriced = unpriced_deployments(&cfg.router);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => "is another process using it?",
                std::io::ErrorKind::PermissionDenied => {
                    "ports below 1024 need privileges; pick a higher one"
                }
                std::io::ErrorKind::AddrNotAvailable => "no interface of this machine has it",
                _ => "choose another address",
            };
            anyhow::bail!("cannot listen on {addr}: {e} ({why}: set server.listen or --listen)");
        }
    };
    let local = listener.local_addr()?;
    let listener = sluice_server::conn::GuardedListener::new(
        listener,
        Duration::from_secs(cfg.server.client_stall_secs),
    );
    let idle = Duration::from_secs(cfg.server.idle_timeout_secs);
    let threads = cfg.server.connection_threads();
    let Running { state, writer } = build_with(cfg, key, Some(overrides)).await?;
    sluice_core::shard::set_main(tokio::runtime::Handle::current());
    let shards = match threads {
        0 => None,
        n => Some(Arc::new(sluice_server::conn::Shards::start(n).map_err(|e| {
            anyhow::anyhow!(
                "cannot start {n} connection threads: {e} (set server.connection_threads lower, or 0)"
            )
        })?)),
    };
    let store = state.store.clone();
    // Answers still being written to the cache's shared tier at shutdown finish before the
    // store closes.
    let cache = state.gateway.cache().cloned();
    let last_cache = cache.clone();
    reload_on_hangup(&state);
    let app = sluice_server::router(state.clone());
    let abort = state.abort.clone();
    // Weak: the gateway holds the log queue open, which must close once the server is done.
    let gateway = Arc::downgrade(&state.gateway);
    let shared = state.gateway.shared().cloned();
    drop(state);
    sayln!(
        "sluice {} listening on http://{local}",
        env!("CARGO_PKG_VERSION")
    );
    sayln!("  config: {source}");
    sayln!("  store:  {store_url}");
    sayln!(
        "  models: {}",
        if models.is_empty() {
            "(none configured)".to_string()
        } else {
            models.join(", ")
        }
    );
    if models.is_empty() {
        sayln!("  warning: {}", crate::NO_MODELS);
    }
    if !unpriced.is_empty() {
        sayln!(
            "  note:   no price for {}: their cost is recorded as 0 (set input_cost_per_mtok and output_cost_per_mtok on the deployment)",
            unpriced.join(", ")
        );
    }
    if mock_fallback {
        sayln!(
            "  note:   no local models in {} — serving `mock-echo`, the mock provider (a test double that echoes your message, not a language model)",
            {
                // `./models`, not `models`: a directory, said as one.
                let dir = crate::models::models_dir(None);
                if dir.is_relative() && !dir.starts_with(".") && !dir.starts_with("..") {
                    std::path::Path::new(".").join(dir).display().to_string()
                } else {
                    dir.display().to_string()
                }
            }
        );
        sayln!(
            "          run `sluice models pull all` to serve the local SmolLM2 chat model and MiniLM embedder"
        );
    }
    tracing::info!(%local, "listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = sluice_server::conn::serve_on(
        listener,
        app,
        async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        },
        idle,
        shards,
    );
    let mut server = std::pin::pin!(server);
    let mut stop_rx = stop_rx;
    tokio::select! {
        () = &mut server => {}
        _ = stop_rx.wait_for(|s| *s) => {
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutting down: finishing in-flight requests (a second Ctrl-C or SIGTERM ends them now)"
            );
            let ended = tokio::select! {
                r = tokio::time::timeout(grace, &mut server) => {
                    if r.is_err() {
                        tracing::warn!("in-flight requests did not finish within the grace period: ending them");
                    }
                    r.is_err()
                }
                () = async {
                    let first = tokio::time::Instant::now();
                    loop {
                        shutdown_signal().await;
                        // One key press that reaches the process twice (from the terminal and
                        // from a supervisor passing it on) is one stop.
                        if first.elapsed() >= Duration::from_secs(1) {
                            break;
                        }
                    }
                } => {
                    tracing::warn!("a second stop signal: ending in-flight requests now");
                    true
                }
            };
            if ended {
                // The requests still running end now, each writing its record as cancelled
                // by the shutdown while the log still takes records.
                if let Some(g) = gateway.upgrade() {
                    g.end_calls();
                }
                abort.send_replace(true);
                if tokio::time::timeout(Duration::from_secs(1), &mut server).await.is_err() {
                    tracing::warn!("connections still open a second after in-flight requests were ended");
                }
            }
        }
    }
    // The request log drains while the cache's last writes finish: all within the same 5 s,
    // so that shutdown stays within the bound the configuration documents.
    let flush = async {
        if let Some(cache) = cache
            && tokio::time::timeout(Duration::from_secs(5), cache.flush())
                .await
                .is_err()
        {
            tracing::warn!("cache writes still in flight after 5 s: those answers are not kept");
        }
    };
    // And budget ledgers that missed costs during a Redis outage are dropped from Redis, if it
    // answers (a replica that stops forgets which they were), within the same 5 s.
    let forget = async {
        if let Some(shared) = shared {
            shared.catch_up_before_exit(Duration::from_secs(5)).await;
        }
    };
    let (stats, (), ()) = tokio::join!(writer.drain(Duration::from_secs(5)), flush, forget);
    // Requests that ended while the log drained may have started cache writes since.
    if let Some(cache) = last_cache
        && tokio::time::timeout(Duration::from_secs(1), cache.flush())
            .await
            .is_err()
    {
        tracing::warn!(
            "cache writes still in flight at the end of shutdown: those answers are not kept"
        );
    }
    store.close().await;
    tracing::info!(
        written = stats.written,
        spilled = stats.spilled,
        refused = stats.rejected,
        slow_batches = stats.slow,
        "request log drained"
    );
    let slow = match stats.slow {
        0 => String::new(),
        n => format!(
            " ({n} batches took over {} s to write)",
            sluice_store::writer::SLOW_WRITE.as_secs()
        ),
    };
    let refused = match stats.rejected {
        0 => String::new(),
        n => format!(
            "; {n} refused by the store, kept in {}",
            sluice_store::writer::rejected_path(&spill).display()
        ),
    };
    // What went to the spill file may have been written to the store since (a replay once it
    // answered): what is left is what the file still holds.
    let waiting = spill_lines(&spill);
    let spilled = match (stats.spilled, waiting) {
        (0, 0) => String::new(),
        (n, 0) => format!("; {n} spilled while the store was down, since written to it"),
        (_, w) => format!(
            "; {w} in the spill file {} (written to the store at the next start)",
            spill.display()
        ),
    };
    sayln!(
        "sluice stopped: {} request records written{spilled}{slow}{refused}",
        stats.written
    );
    Ok(())
}

/// How many records the spill file holds (its lines; 0 when there is none).
fn spill_lines(spill: &std::path::Path) -> u64 {
    use std::io::BufRead;
    let Ok(file) = std::fs::File::open(spill) else {
        return 0;
    };
    let mut n = 0;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    while reader
        .read_until(b'\n', &mut line)
        .is_ok_and(|read| read > 0)
    {
        if line.iter().any(|b| !b.is_ascii_whitespace()) {
            n += 1;
        }
        line.clear();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_lines_counts_records_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        assert_eq!(spill_lines(&path), 0);
        std::fs::write(&path, "{\"a\":1}\n\n{\"b\":2}\n{\"cut\"").unwrap();
        assert_eq!(spill_lines(&path), 3);
    }

    /// The spill file goes beside the SQLite file for either URL form (`sqlite:PATH` put it in
    /// `./sluice-data`), and under `./sluice-data` for an in-memory or PostgreSQL store.
    #[test]
    fn the_spill_file_goes_beside_the_sqlite_file() {
        let at = |url: &str| {
            spill_path(&sluice_store::StoreConfig {
                url: url.into(),
                ..sluice_store::StoreConfig::default()
            })
        };
        let beside = PathBuf::from("/data/spill.jsonl");
        assert_eq!(at("sqlite:///data/s.db"), beside);
        assert_eq!(at("sqlite:/data/s.db"), beside);
        assert_eq!(at("sqlite:/data/s.db?mode=rwc"), beside);
        let default = PathBuf::from("sluice-data").join("spill.jsonl");
        assert_eq!(at("sqlite::memory:"), default);
        assert_eq!(at("postgres://u@h/db"), default);
    }
}
