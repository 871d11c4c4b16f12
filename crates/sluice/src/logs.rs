//! `sluice logs`: reads the request log straight from the store.

use std::time::Duration;

use anyhow::Context;

use crate::display::{clean, clip, pad};
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
    /// Only requests that started before this time (RFC 3339) or duration ago.
    #[arg(long, conflicts_with = "follow")]
    pub until: Option<String>,
    /// Only requests that started before this one (a request id): the next page back.
    #[arg(long, value_name = "ID", conflicts_with = "follow", value_parser = request_id)]
    pub before: Option<uuid::Uuid>,
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

/// A request id as `--before` takes it.
fn request_id(s: &str) -> Result<uuid::Uuid, String> {
    uuid::Uuid::parse_str(s.trim()).map_err(|_| {
        format!("`{s}` is not a request id (a UUID such as 01a24bf0-6f18-74a4-8f7e-47c91914ffc0, as `sluice logs` prints them)")
    })
}

fn query(args: &LogsArgs, limit: u32) -> anyhow::Result<RecordQuery> {
    // One now for both bounds: `--since 1h --until 1h` is an empty period, refused.
    let now = chrono::Utc::now();
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
            sluice_server::admin::parse_since(s, now)
                .map_err(|e| anyhow::anyhow!("--since {e}"))?,
        ),
    };
    let until = match &args.until {
        None => None,
        Some(s) => {
            let t = sluice_server::admin::parse_since(s, now)
                .map_err(|e| anyhow::anyhow!("--until {e}"))?;
            if since.is_some_and(|since| t <= since) {
                anyhow::bail!(
                    "--until must be after --since\nhint: durations count back from now: --since 3h --until 2h is the hour that ended two hours ago"
                );
            }
            // The first id of that millisecond: every request that started earlier is before it.
            let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
            Some(uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid())
        }
    };
    // Both: the earlier bound (a page back within a period).
    let before = match (until, args.before) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(RecordQuery {
        model: args.model.clone(),
        status,
        user: args.user.clone(),
        key: args.key.clone(),
        since,
        finished_since: None,
        before,
        limit,
        // Printed whole only as JSON.
        without_bodies: !args.json,
    })
}

/// The table's header, over the columns [`print`] writes.
fn print_header() {
    outln!(
        "{:<24}  {:<36}  {:<9} {:>3}  {} {} {:>9} {:>11}  {:<16}{}",
        "STARTED (UTC)",
        "REQUEST ID",
        "STATUS",
        "",
        pad("MODEL", 18, true),
        pad("PROVIDER", 12, true),
        "LATENCY",
        "TTFT",
        "TOKENS IN/OUT",
        "COST"
    );
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
        "{}  {}  {:<9} {:>3}  {} {} {:>7.0}ms ttft {:>6}  tok {:>5}/{:<5} ${:.8}{}{}",
        r.started_at.format("%Y-%m-%d %H:%M:%S%.3fZ"),
        r.id,
        r.status.as_str(),
        r.http_status,
        pad(&clip(&r.model, 18), 18, true),
        pad(&clip(r.provider.as_deref().unwrap_or("-"), 12), 12, true),
        r.latency_ms,
        ttft,
        r.prompt_tokens,
        r.completion_tokens,
        r.cost_usd,
        r.user
            .as_deref()
            .map(|u| format!("  user={}", clean(u)))
            .unwrap_or_default(),
        r.error_code
            .as_deref()
            .map(|c| format!("  error={}", clean(c)))
            .unwrap_or_default(),
    );
}

/// Refuses a SQLite store whose file does not exist (a wrong directory or a misspelt `--store`),
/// rather than creating an empty one and reporting nothing, and one whose file is not a Sluice
/// store (reading it would add Sluice's tables to another program's database).
pub(crate) async fn require_log(store_url: &str) -> anyhow::Result<()> {
    sluice_store::check_url(store_url).map_err(anyhow::Error::msg)?;
    if let Some(path) = crate::keys::missing_sqlite_file(store_url) {
        anyhow::bail!(
            "no request log at {path}\nhint: start the gateway with `sluice serve` (same directory and config) and send a request first"
        );
    }
    refuse_foreign(store_url).await
}

/// Refuses a SQLite file that exists but is not a Sluice store.
pub(crate) async fn refuse_foreign(store_url: &str) -> anyhow::Result<()> {
    if sluice_store::sqlite_holds_sluice(store_url).await == Some(false) {
        anyhow::bail!(
            "{} is not a Sluice store (it has none of Sluice's tables), and this command changes nothing\nhint: name the gateway's store (its `[store] url`) with --store",
            crate::display::redact_url(store_url)
        );
    }
    Ok(())
}

pub async fn run(store_url: &str, max_connections: u32, mut args: LogsArgs) -> anyhow::Result<()> {
    if let Some(k) = args.key.as_mut() {
        crate::keys::id_of(k)?;
    }
    // The flags are checked before the store is looked for or opened.
    let first = query(&args, args.limit)?;
    let follow = args.follow.then(|| query(&args, 1000)).transpose()?;
    require_log(store_url).await?;
    let store = sluice_store::open(store_url, max_connections)
        .await
        .with_context(|| {
            format!(
                "opening the store at {}",
                crate::display::redact_url(store_url)
            )
        })?;
    let (rows, mut follower) = first_page(store.as_ref(), &first, follow).await?;
    if !args.json && (!rows.is_empty() || args.follow) {
        print_header();
    }
    for r in &rows {
        print(r, args.json);
    }
    if !args.follow {
        if rows.len() == args.limit as usize
            && !args.json
            && let Some(oldest) = rows.first()
        {
            errln!("(older records may follow: add --before {})", oldest.id);
        }
        if rows.is_empty() && !args.json {
            let filtered = args.model.is_some()
                || args.status.is_some()
                || args.user.is_some()
                || args.key.is_some()
                || args.since.is_some()
                || args.until.is_some()
                || args.before.is_some();
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
        let (fresh, cut) = follower.poll(store.as_ref(), &query(&args, 1000)?).await?;
        for r in &fresh {
            print(r, args.json);
        }
        if cut {
            errln!(
                "warning: more than {} requests ended since the last poll; some were not printed (narrow with --model, --user, --key or --status)",
                FOLLOW_PAGES * FOLLOW_PAGE as usize
            );
        }
    }
}

/// The newest records of `q`, oldest first, and, when following, what the follower starts from:
/// every record already in the follow window counts as printed, so that after the last `-n` the
/// follower prints only what ends from then on.
async fn first_page(
    store: &dyn sluice_core::record::LogStore,
    q: &RecordQuery,
    follow: Option<RecordQuery>,
) -> anyhow::Result<(Vec<RequestRecord>, Follower)> {
    let mut follower = Follower::default();
    if let Some(f) = &follow {
        follower.poll(store, f).await?;
    }
    let mut rows = store.list(q).await?;
    rows.reverse();
    for r in &rows {
        follower.seen.insert(r.id, r.finished_at);
    }
    Ok((rows, follower))
}

/// How far back by start time `--follow` looks: a request that ran longer than this is not
/// printed when it ends (the bound keeps each poll's scan short).
const FOLLOW_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

/// How far before the latest end time seen each poll reads again: records are written a while
/// after their requests end (the writer's batches, a slow write's retries, another replica's
/// queue), and replicas' clocks differ. What was printed is remembered, so reading again prints
/// nothing twice.
const FOLLOW_OVERLAP: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// Records read per query, and the most queries per poll.
const FOLLOW_PAGE: u32 = 1000;
const FOLLOW_PAGES: usize = 20;

/// What `--follow` remembers between polls. It follows the requests by when they ended (a record
/// is written when its request ends), as the store's clock says: each poll reads the records that
/// ended since shortly before the latest end it saw, page by page, and prints those not printed.
#[derive(Default)]
struct Follower {
    /// The latest end time seen.
    cursor: Option<chrono::DateTime<chrono::Utc>>,
    /// The records printed, with their end times (forgotten once a poll can no longer read them).
    seen: std::collections::HashMap<uuid::Uuid, chrono::DateTime<chrono::Utc>>,
}

impl Follower {
    /// The records of `q` not printed yet, oldest first, and whether there were more than one
    /// poll reads.
    async fn poll(
        &mut self,
        store: &dyn sluice_core::record::LogStore,
        q: &RecordQuery,
    ) -> anyhow::Result<(Vec<RequestRecord>, bool)> {
        let reference = self.cursor.unwrap_or_else(chrono::Utc::now);
        let window_start = reference - FOLLOW_WINDOW;
        let mut q = q.clone();
        q.since = Some(q.since.map_or(window_start, |s| s.max(window_start)));
        q.finished_since = self.cursor.map(|c| c - FOLLOW_OVERLAP);
        q.limit = FOLLOW_PAGE;
        q.before = None;
        let mut fresh = Vec::new();
        let mut cut = false;
        for page in 0..FOLLOW_PAGES {
            let rows = store.list(&q).await?;
            let full = rows.len() == FOLLOW_PAGE as usize;
            q.before = rows.last().map(|r| r.id);
            for r in rows {
                if self.cursor.is_none_or(|c| r.finished_at > c) {
                    self.cursor = Some(r.finished_at);
                }
                if let std::collections::hash_map::Entry::Vacant(e) = self.seen.entry(r.id) {
                    e.insert(r.finished_at);
                    fresh.push(r);
                }
            }
            if !full {
                break;
            }
            cut = page + 1 == FOLLOW_PAGES;
        }
        if let Some(c) = self.cursor {
            let forget = c - FOLLOW_OVERLAP * 2;
            self.seen.retain(|_, ended| *ended >= forget);
        }
        // Printed in the order the requests ended.
        fresh.sort_by_key(|r| (r.finished_at, r.id));
        Ok((fresh, cut))
    }
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

    /// A store in a temporary directory, and the query `--follow` polls with.
    async fn follow_store() -> (
        tempfile::TempDir,
        std::sync::Arc<dyn sluice_core::record::LogStore>,
        RecordQuery,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let store = sluice_store::open(&url, 1).await.unwrap();
        let q = RecordQuery {
            limit: 1000,
            ..RecordQuery::default()
        };
        (dir, store, q)
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
        let (rows, mut follower) = first_page(store.as_ref(), &page(2), Some(page(1000)))
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            [old[3].id, old[4].id]
        );
        assert!(
            follower
                .poll(store.as_ref(), &page(1000))
                .await
                .unwrap()
                .0
                .is_empty()
        );
        let new = at(0);
        store
            .insert_batch(std::slice::from_ref(&new))
            .await
            .unwrap();
        let (next, _) = follower.poll(store.as_ref(), &page(1000)).await.unwrap();
        assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), [new.id]);
    }

    #[tokio::test]
    async fn follow_prints_a_record_written_after_a_later_started_one() {
        let (_dir, store, q) = follow_store().await;
        let mut follower = Follower::default();
        // A short request that started second is written first…
        let short = at(1_000);
        store
            .insert_batch(std::slice::from_ref(&short))
            .await
            .unwrap();
        let (first, _) = follower.poll(store.as_ref(), &q).await.unwrap();
        assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), [short.id]);
        // …then a stream that started earlier ends and is written.
        let long = at(30_000);
        store
            .insert_batch(std::slice::from_ref(&long))
            .await
            .unwrap();
        let (second, _) = follower.poll(store.as_ref(), &q).await.unwrap();
        assert_eq!(second.iter().map(|r| r.id).collect::<Vec<_>>(), [long.id]);
        // Nothing is printed twice.
        assert!(
            follower
                .poll(store.as_ref(), &q)
                .await
                .unwrap()
                .0
                .is_empty()
        );
    }

    /// More requests end between two polls than one query reads, and one of them started before
    /// all the others: every one is printed, once.
    #[tokio::test]
    async fn follow_reads_every_record_of_a_busy_poll() {
        let (_dir, store, q) = follow_store().await;
        let mut follower = Follower::default();
        let earlier = at(5_000);
        store
            .insert_batch(std::slice::from_ref(&earlier))
            .await
            .unwrap();
        assert_eq!(follower.poll(store.as_ref(), &q).await.unwrap().0.len(), 1);
        // A request that started 90 s ago ends among 2,500 short ones.
        let mut burst: Vec<_> = (0..2_500)
            .map(|i| at(2_000 - i64::from(i % 1_000)))
            .collect();
        burst.push(at(90_000));
        for chunk in burst.chunks(500) {
            store.insert_batch(chunk).await.unwrap();
        }
        let (got, cut) = follower.poll(store.as_ref(), &q).await.unwrap();
        assert!(!cut);
        let mut got: Vec<_> = got.iter().map(|r| r.id).collect();
        got.sort();
        let mut want: Vec<_> = burst.iter().map(|r| r.id).collect();
        want.sort();
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        assert!(
            follower
                .poll(store.as_ref(), &q)
                .await
                .unwrap()
                .0
                .is_empty()
        );
    }
}
