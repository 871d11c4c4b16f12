//! `sluice logs`: reads the request log straight from the store.

use std::time::Duration;

use anyhow::Context;
use sluice_core::record::{RecordQuery, RecordStatus, RequestRecord};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Only this model.
    #[arg(long)]
    pub model: Option<String>,
    /// Only this outcome: ok, error or cancelled.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this user.
    #[arg(long)]
    pub user: Option<String>,
    /// Only requests made with this virtual key (its id).
    #[arg(long)]
    pub key: Option<String>,
    /// Only since this time (RFC 3339) or duration ago (30s, 15m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// How many records (newest last).
    #[arg(long, short = 'n', default_value_t = 20)]
    pub limit: u32,
    /// Keep printing new records as they arrive.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON record per line.
    #[arg(long)]
    pub json: bool,
}

fn query(args: &LogsArgs, limit: u32) -> anyhow::Result<RecordQuery> {
    let status = match &args.status {
        None => None,
        Some(s) => Some(
            RecordStatus::parse(s)
                .with_context(|| format!("--status `{s}` is not one of ok, error, cancelled"))?,
        ),
    };
    let since = match &args.since {
        None => None,
        Some(s) => Some(
            sluice_server::admin::parse_since(s, chrono::Utc::now())
                .map_err(|e| anyhow::anyhow!("--since {e}"))?,
        ),
    };
    Ok(RecordQuery {
        model: args.model.clone(),
        status,
        user: args.user.clone(),
        key: args.key.clone(),
        since,
        before: None,
        limit,
    })
}

fn print(r: &RequestRecord, json: bool) {
    if json {
        if let Ok(s) = serde_json::to_string(r) {
            outln!("{s}");
        }
        return;
    }
    let ttft = r
        .ttft_ms
        .map(|t| format!("{t:.0}ms"))
        .unwrap_or_else(|| "-".into());
    outln!(
        "{}  {}  {:<9} {:>3}  {:<18} {:<12} {:>7.0}ms ttft {:>6}  tok {:>5}/{:<5} ${:.6}{}{}",
        r.started_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        r.id,
        r.status.as_str(),
        r.http_status,
        truncate(&r.model, 18),
        truncate(r.provider.as_deref().unwrap_or("-"), 12),
        r.latency_ms,
        ttft,
        r.prompt_tokens,
        r.completion_tokens,
        r.cost_usd,
        r.user
            .as_deref()
            .map(|u| format!("  user={u}"))
            .unwrap_or_default(),
        r.error_code
            .as_deref()
            .map(|c| format!("  error={c}"))
            .unwrap_or_default(),
    );
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Refuses a SQLite store whose file does not exist (a wrong directory or a misspelt `--store`),
/// rather than creating an empty one and reporting nothing.
pub(crate) fn require_log(store_url: &str) -> anyhow::Result<()> {
    if let Some(path) = store_url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).exists() {
            anyhow::bail!(
                "no request log at {path}\nhint: start the gateway with `sluice serve` (same directory and config) and send a request first"
            );
        }
    }
    Ok(())
}

pub async fn run(store_url: &str, max_connections: u32, args: LogsArgs) -> anyhow::Result<()> {
    require_log(store_url)?;
    let store = sluice_store::open(store_url, max_connections)
        .await
        .with_context(|| format!("opening the store at {store_url}"))?;
    let q = query(&args, args.limit.clamp(1, 1000))?;
    let mut rows = store.list(&q).await?;
    rows.reverse();
    let mut last = rows.last().map(|r| r.id);
    for r in &rows {
        print(r, args.json);
    }
    if !args.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut fresh = store.list(&query(&args, 200)?).await?;
        fresh.retain(|r| last.is_none_or(|l| r.id > l));
        fresh.reverse();
        for r in &fresh {
            print(r, args.json);
        }
        if let Some(r) = fresh.last() {
            last = Some(r.id);
        }
    }
}
