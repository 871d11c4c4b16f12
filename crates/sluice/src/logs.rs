//! `sluice logs`: reads the request log straight from the store.

use std::collections::HashSet;
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
    /// Only requests made with this virtual key (its id; the whole key works too).
    #[arg(long)]
    pub key: Option<String>,
    /// Only since this time (RFC 3339) or duration ago (30s, 15m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// How many records (newest last).
    #[arg(long, short = 'n', default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
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
    if let Some(path) = crate::keys::missing_sqlite_file(store_url) {
        anyhow::bail!(
            "no request log at {path}\nhint: start the gateway with `sluice serve` (same directory and config) and send a request first"
        );
    }
    Ok(())
}

pub async fn run(store_url: &str, max_connections: u32, mut args: LogsArgs) -> anyhow::Result<()> {
    if let Some(k) = args.key.as_mut() {
        crate::keys::id_of(k)?;
    }
    require_log(store_url)?;
    let store = sluice_store::open(store_url, max_connections)
        .await
        .with_context(|| format!("opening the store at {store_url}"))?;
    let (rows, mut seen) = first_page(
        store.as_ref(),
        &query(&args, args.limit)?,
        args.follow.then(|| query(&args, 1000)).transpose()?,
    )
    .await?;
    for r in &rows {
        print(r, args.json);
    }
    if !args.follow {
        if rows.is_empty() && !args.json {
            let filtered = args.model.is_some()
                || args.status.is_some()
                || args.user.is_some()
                || args.key.is_some()
                || args.since.is_some();
            outln!(
                "{}",
                if filtered {
                    "no requests match these filters"
                } else {
                    "no requests logged yet; send one to the gateway (`sluice serve`) first"
                }
            );
        }
        return Ok(());
    }
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for r in follow_step(store.as_ref(), &query(&args, 1000)?, &mut seen).await? {
            print(&r, args.json);
        }
    }
}

/// The newest records of `q`, oldest first, and what counts as printed. Following (`follow`,
/// the query each poll runs), every record already in the follow window counts as printed, so
/// that after the last `-n` the follower prints only what is written from then on (it printed
/// the older records of the window next, out of time order).
async fn first_page(
    store: &dyn sluice_core::record::LogStore,
    q: &RecordQuery,
    follow: Option<RecordQuery>,
) -> anyhow::Result<(Vec<RequestRecord>, HashSet<uuid::Uuid>)> {
    let mut seen = HashSet::new();
    if let Some(f) = &follow {
        follow_step(store, f, &mut seen).await?;
    }
    let mut rows = store.list(q).await?;
    rows.reverse();
    seen.extend(rows.iter().map(|r| r.id));
    Ok((rows, seen))
}

/// How far back `--follow` looks for records on each poll. A record is written when its request
/// ends but ordered by when it started, so a long stream lands behind records already printed.
const FOLLOW_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

/// One poll of `--follow`: the records of the last [`FOLLOW_WINDOW`] not printed yet, oldest
/// first; `seen` remembers what was printed (and forgets what left the window).
async fn follow_step(
    store: &dyn sluice_core::record::LogStore,
    q: &RecordQuery,
    seen: &mut HashSet<uuid::Uuid>,
) -> anyhow::Result<Vec<sluice_core::record::RequestRecord>> {
    let now = chrono::Utc::now();
    let window_start = now - FOLLOW_WINDOW;
    let mut q = q.clone();
    q.since = Some(q.since.map_or(window_start, |s| s.max(window_start)));
    let mut fresh = store.list(&q).await?;
    fresh.retain(|r| seen.insert(r.id));
    fresh.reverse();
    let forget = (now - FOLLOW_WINDOW * 2).timestamp_millis();
    seen.retain(|id| {
        id.get_timestamp()
            .map(|t| t.to_unix())
            .is_none_or(|(secs, nanos)| {
                (secs as i64) * 1000 + i64::from(nanos / 1_000_000) >= forget
            })
    });
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms_ago: i64) -> RequestRecord {
        let t = chrono::Utc::now() - chrono::TimeDelta::milliseconds(ms_ago);
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        let ms = u64::try_from(t.timestamp_millis()).unwrap();
        let tail: [u8; 10] = uuid::Uuid::now_v7().as_bytes()[6..].try_into().unwrap();
        r.id = uuid::Builder::from_unix_timestamp_millis(ms, &tail).into_uuid();
        r.status = RecordStatus::Ok;
        r
    }

    /// `-f -n 2`: the two newest, then only what is written later (not the older records of the
    /// follow window).
    #[tokio::test]
    async fn follow_after_the_last_n_prints_only_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = sluice_store::open(&url, 1).await.unwrap();
        let old: Vec<_> = (0..5).map(|i| at(10_000 - i * 1_000)).collect();
        store.insert_batch(&old).await.unwrap();
        let page = |limit| RecordQuery {
            limit,
            ..RecordQuery::default()
        };
        let (rows, mut seen) = first_page(store.as_ref(), &page(2), Some(page(1000)))
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [old[3].id, old[4].id]
        );
        assert!(
            follow_step(store.as_ref(), &page(1000), &mut seen)
                .await
                .unwrap()
                .is_empty()
        );
        let new = at(0);
        store
            .insert_batch(std::slice::from_ref(&new))
            .await
            .unwrap();
        let next = follow_step(store.as_ref(), &page(1000), &mut seen)
            .await
            .unwrap();
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), [new.id]);
    }

    #[tokio::test]
    async fn follow_prints_a_record_written_after_a_later_started_one() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = sluice_store::open(&url, 1).await.unwrap();
        let q = RecordQuery {
            limit: 1000,
            ..RecordQuery::default()
        };
        let mut seen = HashSet::new();
        // A short request that started second is written first…
        let short = at(1_000);
        store
            .insert_batch(std::slice::from_ref(&short))
            .await
            .unwrap();
        let first = follow_step(store.as_ref(), &q, &mut seen).await.unwrap();
        assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), [short.id]);
        // …then a stream that started earlier ends and is written.
        let long = at(30_000);
        store
            .insert_batch(std::slice::from_ref(&long))
            .await
            .unwrap();
        let second = follow_step(store.as_ref(), &q, &mut seen).await.unwrap();
        assert_eq!(second.iter().map(|r| r.id).collect::<Vec<_>>(), [long.id]);
        // Nothing is printed twice.
        assert!(
            follow_step(store.as_ref(), &q, &mut seen)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
