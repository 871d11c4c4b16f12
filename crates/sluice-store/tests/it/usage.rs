//! The checks of spend, usage reports and the cache every backend must pass (run through
//! `checks`, like the others).
//!
//! Records are written at fixed times around midnight UTC, with ids made for those times, so
//! `since`, `until` and days are exact. Costs are binary fractions, so their sums are exact
//! whatever order a database adds them in.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, SubsecRound, TimeDelta, TimeZone, Utc};
use serde_json::json;
use sluice_core::record::{RecordQuery, RecordStatus, RequestRecord};
use sluice_core::usage::{CacheEntry, CacheStore, Spender, UsageDim, UsageQuery, UsageRow};
use sluice_store::Stores;
use uuid::Uuid;

use crate::backend::{Kind, TestDb};
use crate::fixtures::{assert_same_record, minimal_record, now_us, record};

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A UUIDv7 for `t`: ids made here sort by `t`, then by the order they were made.
fn id_at(t: DateTime<Utc>) -> Uuid {
    let mut counter = [0u8; 10];
    counter[2..].copy_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    let ms = u64::try_from(t.timestamp_millis()).expect("a time after 1970");
    uuid::Builder::from_unix_timestamp_millis(ms, &counter).into_uuid()
}

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, us: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("a valid time")
        + TimeDelta::microseconds(us)
}

/// The last half second of 2026-03-10 (UTC).
fn t0() -> DateTime<Utc> {
    at(2026, 3, 10, 23, 59, 59, 500_000)
}
/// Midnight, 2026-03-11: a whole second (SQLite keeps it without a fraction).
fn t1() -> DateTime<Utc> {
    at(2026, 3, 11, 0, 0, 0, 0)
}
fn t2() -> DateTime<Utc> {
    at(2026, 3, 11, 12, 0, 0, 123_456)
}
fn t3() -> DateTime<Utc> {
    at(2026, 3, 12, 8, 30, 0, 1)
}

const KEY_A: &str = "key-a";
const KEY_B: &str = "key-b";
const KEY_SQL: &str = "' OR 1=1 --";
const KEY_NUL: &str = "key-nul";

/// A record started at `t` (its id made for `t`), of `model`, with a key, a user, a team (in
/// its metadata, as the gateway sets it) and a cost.
fn rec(
    t: DateTime<Utc>,
    model: &str,
    key: Option<&str>,
    user: Option<&str>,
    team: Option<&str>,
    cost: f64,
) -> RequestRecord {
    let mut r = record(model, user, RecordStatus::Ok);
    r.id = id_at(t);
    r.started_at = t;
    r.finished_at = t + TimeDelta::milliseconds(5);
    r.key_id = key.map(str::to_owned);
    r.metadata = match team {
        Some(team) => json!({"team": team, "tenant": "acme"}),
        None => json!({"tenant": "acme"}),
    };
    r.cost_usd = cost;
    r
}

fn errored(mut r: RequestRecord) -> RequestRecord {
    r.status = RecordStatus::Error;
    r.http_status = 502;
    r
}

fn cached(mut r: RequestRecord, hit: bool, saved: f64) -> RequestRecord {
    r.cache = Some(if hit { "hit" } else { "miss" }.into());
    r.cost_saved_usd = saved;
    r
}

/// The records the spend and usage checks read.
fn fixture() -> Vec<RequestRecord> {
    let mut nul = rec(t2(), "m1", Some(KEY_NUL), Some("dave"), Some("nul"), 32.0);
    // A NUL in the metadata: jsonb refuses it, so PostgreSQL must not fail on this record.
    nul.metadata = json!({"team": "nul", "note": "a\u{0}b"});
    let mut no_meta = rec(t1(), "m1", None, None, None, 4.0);
    no_meta.metadata = serde_json::Value::Null;
    let mut array_meta = errored(rec(t2(), "m1", Some(KEY_B), Some("carol"), None, 8.0));
    array_meta.metadata = json!(["team", {"team": "not this"}]);
    vec![
        cached(
            rec(t0(), "m1", Some(KEY_A), Some("ann"), Some("ml"), 1.0),
            false,
            0.0,
        ),
        errored(rec(t0(), "m2", Some(KEY_A), Some("bob"), Some("ml"), 0.5)),
        cached(
            rec(t1(), "m1", Some(KEY_B), Some("ann"), Some("search ü"), 2.0),
            true,
            0.25,
        ),
        no_meta,
        cached(
            rec(t2(), "m2", Some(KEY_A), Some("ann"), Some("ml"), 0.125),
            true,
            1.5,
        ),
        array_meta,
        nul,
        rec(t3(), "m1", Some(KEY_A), Some("ann"), Some("ml"), 16.0),
        rec(
            t3(),
            "m2",
            Some(KEY_SQL),
            Some("ünï"),
            Some("quote\"d 'x'"),
            0.25,
        ),
    ]
}

async fn open_with(db: &TestDb, records: &[RequestRecord]) -> Stores {
    let stores = db.open_all().await;
    stores
        .log
        .insert_batch(records)
        .await
        .unwrap_or_else(|e| panic!("insert_batch of {} records: {e}", records.len()));
    stores
}

async fn spend(stores: &Stores, who: Spender, since: DateTime<Utc>) -> f64 {
    stores
        .usage
        .spend(&who, since)
        .await
        .unwrap_or_else(|e| panic!("spend({who:?}, {since}): {e}"))
}

async fn usage(stores: &Stores, q: &UsageQuery) -> Vec<UsageRow> {
    stores
        .usage
        .usage(q)
        .await
        .unwrap_or_else(|e| panic!("usage({q:?}): {e}"))
}

/// A record's team as the store sees it: the `team` string of its metadata (kept in its own
/// column, so a NUL elsewhere in the metadata changes nothing on any backend).
fn team_of(r: &RequestRecord, _kind: Kind) -> Option<String> {
    r.metadata
        .get("team")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// What `usage(q)` must answer for `records`, computed here: the reference the store is held to.
fn expected(records: &[RequestRecord], q: &UsageQuery, kind: Kind) -> Vec<UsageRow> {
    let ms = |t: DateTime<Utc>| t.timestamp_millis();
    let keep = |r: &&RequestRecord| {
        q.since.is_none_or(|t| ms(r.started_at) >= ms(t))
            && q.until.is_none_or(|t| ms(r.started_at) < ms(t))
            && q.key.as_ref().is_none_or(|k| r.key_id.as_ref() == Some(k))
            && q.user.as_ref().is_none_or(|u| r.user.as_ref() == Some(u))
            && q.team
                .as_ref()
                .is_none_or(|t| team_of(r, kind).as_ref() == Some(t))
            && q.model.as_ref().is_none_or(|m| &r.model == m)
    };
    let mut groups: BTreeMap<Vec<(bool, Option<String>)>, UsageRow> = BTreeMap::new();
    let zero = |group: Vec<Option<String>>| UsageRow {
        group,
        requests: 0,
        errors: 0,
        cache_hits: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_usd: 0.0,
        cost_saved_usd: 0.0,
    };
    if q.group_by.is_empty() {
        groups.insert(Vec::new(), zero(Vec::new()));
    }
    for r in records.iter().filter(keep) {
        let group: Vec<Option<String>> = q
            .group_by
            .iter()
            .map(|d| match d {
                UsageDim::Key => r.key_id.clone(),
                UsageDim::User => r.user.clone(),
                UsageDim::Team => team_of(r, kind),
                UsageDim::Model => Some(r.model.clone()),
                UsageDim::Day => Some(r.started_at.format("%Y-%m-%d").to_string()),
            })
            .collect();
        let order = group.iter().map(|v| (v.is_none(), v.clone())).collect();
        let row = groups.entry(order).or_insert_with(|| zero(group));
        row.requests += 1;
        row.errors += u64::from(r.status == RecordStatus::Error);
        row.cache_hits += u64::from(r.cache.as_deref() == Some("hit"));
        row.prompt_tokens += r.prompt_tokens;
        row.completion_tokens += r.completion_tokens;
        row.cost_usd += r.cost_usd;
        row.cost_saved_usd += r.cost_saved_usd;
    }
    groups.into_values().collect()
}

fn row(
    group: &[Option<&str>],
    requests: u64,
    errors: u64,
    hits: u64,
    cost: f64,
    saved: f64,
) -> UsageRow {
    UsageRow {
        group: group.iter().map(|g| g.map(str::to_owned)).collect(),
        requests,
        errors,
        cache_hits: hits,
        prompt_tokens: 10 * requests,
        completion_tokens: 20 * requests,
        cost_usd: cost,
        cost_saved_usd: saved,
    }
}

/// Records with a cache outcome (hit, miss, none) and a saved cost come back equal from `get`
/// and `list`, and after reopening where the database is shared.
pub async fn usage_record_fields(db: &TestDb) {
    let hit = cached(
        rec(now_us(), "m", Some(KEY_A), Some("ann"), Some("ml"), 0.0),
        true,
        0.000_123_456_789_012_345,
    );
    let miss = cached(rec(now_us(), "m", Some(KEY_A), None, None, 1.5), false, 0.0);
    let huge = cached(minimal_record(), true, 1.0e300);
    let plain = minimal_record();
    assert_eq!(plain.cache, None);
    let all = [&hit, &miss, &huge, &plain];
    let records: Vec<RequestRecord> = all.iter().map(|r| (*r).clone()).collect();
    let stores = open_with(db, &records).await;
    for want in all {
        let got = stores
            .log
            .get(want.id)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("record {} not found", want.id));
        assert_same_record(&got, want);
    }
    let listed = stores
        .log
        .list(&RecordQuery {
            limit: 10,
            ..RecordQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), all.len());
    for got in &listed {
        let want = all
            .iter()
            .find(|w| w.id == got.id)
            .unwrap_or_else(|| panic!("list returned unknown id {}", got.id));
        assert_same_record(got, want);
    }
    if db.shared_between_opens() {
        drop(stores);
        let again = db.open_all().await;
        for want in all {
            let got = again.log.get(want.id).await.expect("get").expect("record");
            assert_same_record(&got, want);
        }
    }
}

/// `spend`: the sum of one key's, user's or team's costs from `since` (inclusive) on, nobody
/// else's; 0 when there is nothing.
pub async fn usage_spend(db: &TestDb) {
    let records = fixture();
    let stores = open_with(db, &records).await;
    let ms = TimeDelta::milliseconds(1);
    let key = |k: &str| Spender::Key(k.into());
    let user = |u: &str| Spender::User(u.into());
    let team = |t: &str| Spender::Team(t.into());

    // A key: 1 + 0.5 at t0, 0.125 at t2, 16 at t3.
    assert_eq!(
        spend(&stores, key(KEY_A), t0() - TimeDelta::days(30)).await,
        17.625
    );
    assert_eq!(
        spend(&stores, key(KEY_A), t0()).await,
        17.625,
        "since is inclusive"
    );
    assert_eq!(spend(&stores, key(KEY_A), t0() + ms).await, 16.125);
    assert_eq!(spend(&stores, key(KEY_A), t3()).await, 16.0);
    assert_eq!(spend(&stores, key(KEY_A), t3() + ms).await, 0.0);
    assert_eq!(spend(&stores, key(KEY_B), t0()).await, 10.0);
    assert_eq!(spend(&stores, key(KEY_SQL), t0()).await, 0.25);
    assert_eq!(spend(&stores, key("nope"), t0()).await, 0.0);
    assert_eq!(
        spend(&stores, key("ann"), t0()).await,
        0.0,
        "a user is not a key"
    );
    assert_eq!(spend(&stores, key(""), t0()).await, 0.0);

    // A user: ann has 1 at t0, 2 at t1, 0.125 at t2, 16 at t3 (over two keys).
    assert_eq!(spend(&stores, user("ann"), t0()).await, 19.125);
    assert_eq!(spend(&stores, user("ann"), t1()).await, 18.125);
    assert_eq!(spend(&stores, user("ann"), t2()).await, 16.125);
    assert_eq!(spend(&stores, user("bob"), t0()).await, 0.5);
    assert_eq!(spend(&stores, user("bob"), t0() + ms).await, 0.0);
    assert_eq!(spend(&stores, user("ünï"), t0()).await, 0.25);
    assert_eq!(
        spend(&stores, user(KEY_A), t0()).await,
        0.0,
        "a key is not a user"
    );

    // A team, from the records' metadata.
    assert_eq!(spend(&stores, team("ml"), t0()).await, 17.625);
    assert_eq!(spend(&stores, team("ml"), t1()).await, 16.125);
    assert_eq!(spend(&stores, team("search ü"), t0()).await, 2.0);
    assert_eq!(spend(&stores, team("search ü"), t1() + ms).await, 0.0);
    assert_eq!(spend(&stores, team("quote\"d 'x'"), t0()).await, 0.25);
    assert_eq!(
        spend(&stores, team("not this"), t0()).await,
        0.0,
        "only an object's team"
    );
    assert_eq!(spend(&stores, team("ann"), t0()).await, 0.0);
    assert_eq!(spend(&stores, team(KEY_SQL), t0()).await, 0.0);
    // A record whose metadata holds a NUL still has its team, on every backend (and no error).
    assert_eq!(spend(&stores, team("nul"), t0()).await, 32.0);

    // Later records count as they arrive.
    let later = rec(t3() + ms, "m1", Some(KEY_A), Some("ann"), Some("ml"), 0.5);
    stores
        .log
        .insert_batch(&[later])
        .await
        .expect("insert_batch");
    assert_eq!(spend(&stores, key(KEY_A), t3()).await, 16.5);
    assert_eq!(spend(&stores, user("ann"), t3() + ms).await, 0.5);
    assert_eq!(spend(&stores, team("ml"), t3()).await, 16.5);
}

/// `usage` grouped by key, by model and day, by team (and more), with filters and `until`;
/// every answer checked against the reference, a few also spelled out.
pub async fn usage_grouped(db: &TestDb) {
    let records = fixture();
    let stores = open_with(db, &records).await;
    let by = |dims: &[UsageDim]| UsageQuery {
        group_by: dims.to_vec(),
        ..UsageQuery::default()
    };

    // By key: byte order, records without a key last.
    let got = usage(&stores, &by(&[UsageDim::Key])).await;
    assert_eq!(got, expected(&records, &by(&[UsageDim::Key]), db.kind));
    let keys: Vec<Option<&str>> = got.iter().map(|r| r.group[0].as_deref()).collect();
    assert_eq!(
        keys,
        vec![Some(KEY_SQL), Some(KEY_A), Some(KEY_B), Some(KEY_NUL), None]
    );
    assert_eq!(got[1], row(&[Some(KEY_A)], 4, 1, 1, 17.625, 1.5));
    assert_eq!(got[2], row(&[Some(KEY_B)], 2, 1, 1, 10.0, 0.25));
    assert_eq!(got[4], row(&[None], 1, 0, 0, 4.0, 0.0));

    // By model and day: UTC days, t0 the day before t1.
    let q = by(&[UsageDim::Model, UsageDim::Day]);
    let got = usage(&stores, &q).await;
    assert_eq!(got, expected(&records, &q, db.kind));
    assert_eq!(
        got,
        vec![
            row(&[Some("m1"), Some("2026-03-10")], 1, 0, 0, 1.0, 0.0),
            row(&[Some("m1"), Some("2026-03-11")], 4, 1, 1, 46.0, 0.25),
            row(&[Some("m1"), Some("2026-03-12")], 1, 0, 0, 16.0, 0.0),
            row(&[Some("m2"), Some("2026-03-10")], 1, 1, 0, 0.5, 0.0),
            row(&[Some("m2"), Some("2026-03-11")], 1, 0, 1, 0.125, 1.5),
            row(&[Some("m2"), Some("2026-03-12")], 1, 0, 0, 0.25, 0.0),
        ]
    );
    // The other order groups the other way round.
    let q = by(&[UsageDim::Day, UsageDim::Model]);
    let got = usage(&stores, &q).await;
    assert_eq!(got, expected(&records, &q, db.kind));
    assert_eq!(
        got[0].group,
        vec![Some("2026-03-10".into()), Some("m1".into())]
    );
    assert_eq!(
        got[1].group,
        vec![Some("2026-03-10".into()), Some("m2".into())]
    );

    // By team: teams come from object metadata only; no team last.
    let q = by(&[UsageDim::Team]);
    let got = usage(&stores, &q).await;
    assert_eq!(got, expected(&records, &q, db.kind));
    let ml = got
        .iter()
        .find(|r| r.group == vec![Some("ml".to_string())])
        .expect("team ml");
    assert_eq!(ml, &row(&[Some("ml")], 4, 1, 1, 17.625, 1.5));
    assert_eq!(got.last().map(|r| r.group.clone()), Some(vec![None]));
    assert!(
        !got.iter()
            .any(|r| r.group == vec![Some("not this".to_string())])
    );

    // Filters, alone and together, and the half-open window.
    let queries = [
        UsageQuery {
            key: Some(KEY_A.into()),
            since: Some(t1()),
            until: Some(t3()),
            group_by: vec![UsageDim::Day],
            ..UsageQuery::default()
        },
        UsageQuery {
            key: Some(KEY_A.into()),
            since: Some(t1()),
            until: Some(t3() + TimeDelta::milliseconds(1)),
            group_by: vec![UsageDim::Day],
            ..UsageQuery::default()
        },
        UsageQuery {
            team: Some("ml".into()),
            model: Some("m2".into()),
            group_by: vec![UsageDim::User],
            ..UsageQuery::default()
        },
        UsageQuery {
            user: Some("ann".into()),
            group_by: vec![UsageDim::Key, UsageDim::Model],
            ..UsageQuery::default()
        },
        UsageQuery {
            user: Some("ünï".into()),
            group_by: vec![UsageDim::Key, UsageDim::Team],
            ..UsageQuery::default()
        },
        UsageQuery {
            until: Some(t1()),
            group_by: vec![UsageDim::Team, UsageDim::User],
            ..UsageQuery::default()
        },
        UsageQuery {
            since: Some(t2()),
            group_by: vec![UsageDim::User, UsageDim::Day],
            ..UsageQuery::default()
        },
        UsageQuery {
            model: Some("m1".into()),
            group_by: vec![
                UsageDim::Key,
                UsageDim::User,
                UsageDim::Team,
                UsageDim::Model,
                UsageDim::Day,
            ],
            ..UsageQuery::default()
        },
        UsageQuery {
            key: Some(KEY_SQL.into()),
            team: Some("quote\"d 'x'".into()),
            group_by: vec![UsageDim::Model],
            ..UsageQuery::default()
        },
        UsageQuery {
            team: Some(KEY_SQL.into()),
            group_by: vec![UsageDim::Model],
            ..UsageQuery::default()
        },
    ];
    for q in &queries {
        assert_eq!(
            usage(&stores, q).await,
            expected(&records, q, db.kind),
            "{q:?}"
        );
    }
    // Spelled out: until is exclusive, then includes t3's record a millisecond later.
    assert_eq!(
        usage(&stores, &queries[0]).await,
        vec![row(&[Some("2026-03-11")], 1, 0, 1, 0.125, 1.5)]
    );
    assert_eq!(
        usage(&stores, &queries[1]).await,
        vec![
            row(&[Some("2026-03-11")], 1, 0, 1, 0.125, 1.5),
            row(&[Some("2026-03-12")], 1, 0, 0, 16.0, 0.0),
        ]
    );
    assert_eq!(
        usage(&stores, &queries[2]).await,
        vec![
            row(&[Some("ann")], 1, 0, 1, 0.125, 1.5),
            row(&[Some("bob")], 1, 1, 0, 0.5, 0.0),
        ]
    );
    assert!(usage(&stores, &queries[9]).await.is_empty());
}

/// No grouping: one total row, also when no record matches (zeros), and for an empty log.
pub async fn usage_totals(db: &TestDb) {
    let stores = db.open_all().await;
    let total = UsageQuery::default();
    assert_eq!(
        usage(&stores, &total).await,
        vec![row(&[], 0, 0, 0, 0.0, 0.0)]
    );
    assert!(
        usage(
            &stores,
            &UsageQuery {
                group_by: vec![UsageDim::Key],
                ..UsageQuery::default()
            }
        )
        .await
        .is_empty()
    );
    assert_eq!(
        spend(&stores, Spender::Key(KEY_A.into()), t0()).await,
        0.0,
        "no records: no spend"
    );

    let records = fixture();
    stores
        .log
        .insert_batch(&records)
        .await
        .expect("insert_batch");
    let got = usage(&stores, &total).await;
    assert_eq!(got, expected(&records, &total, db.kind));
    assert_eq!(got, vec![row(&[], 9, 2, 2, 63.875, 1.75)]);

    let window = UsageQuery {
        since: Some(t1()),
        until: Some(t2()),
        ..UsageQuery::default()
    };
    assert_eq!(
        usage(&stores, &window).await,
        vec![row(&[], 2, 0, 1, 6.0, 0.25)]
    );
    for nothing in [
        UsageQuery {
            key: Some("nope".into()),
            ..UsageQuery::default()
        },
        UsageQuery {
            since: Some(t3() + TimeDelta::seconds(1)),
            ..UsageQuery::default()
        },
        UsageQuery {
            since: Some(t2()),
            until: Some(t1()),
            ..UsageQuery::default()
        },
    ] {
        assert_eq!(
            usage(&stores, &nothing).await,
            vec![row(&[], 0, 0, 0, 0.0, 0.0)],
            "{nothing:?}"
        );
    }
}

fn entry(key: &str, namespace: &str, created: DateTime<Utc>, ttl: TimeDelta) -> CacheEntry {
    CacheEntry {
        key: key.into(),
        namespace: namespace.into(),
        model: "gpt-4o-mini".into(),
        body: json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant",
                         "content": "ünïcødé 🚀 \"quoted\" 'x' \\ \n"}, "finish_reason": "stop"}],
        })
        .to_string(),
        cost_usd: 0.000_123_456_789_012_345,
        created_at: created,
        expires_at: created + ttl,
    }
}

async fn cache_get(
    cache: &std::sync::Arc<dyn CacheStore>,
    key: &str,
    now: DateTime<Utc>,
) -> Option<CacheEntry> {
    cache
        .cache_get(key, now)
        .await
        .unwrap_or_else(|e| panic!("cache_get({key}, {now}): {e}"))
}

async fn cache_put(cache: &std::sync::Arc<dyn CacheStore>, e: &CacheEntry) {
    cache
        .cache_put(e)
        .await
        .unwrap_or_else(|err| panic!("cache_put({}): {err}", e.key));
}

/// The cache: put and get, expiry at `now` (exclusive of the expiry instant), replacement,
/// purge of expired entries and clearing one namespace or all.
pub async fn cache_entries(db: &TestDb) {
    let stores = db.open_all().await;
    let cache = &stores.cache;
    let now = now_us();
    let us = TimeDelta::microseconds(1);
    let fresh = entry("a1", "ns-a", now, TimeDelta::seconds(60));
    let stale = entry(
        "a2",
        "ns-a",
        now - TimeDelta::seconds(10),
        TimeDelta::seconds(5),
    );
    let other = entry("b1", "ns-b", now, TimeDelta::hours(1));
    // Expires on a whole second (SQLite keeps it without a fraction), after `now` and before
    // the others.
    let whole = {
        let created = now.trunc_subsecs(0) + TimeDelta::seconds(10);
        entry("w", "ns-b", created, TimeDelta::seconds(1))
    };
    for e in [&fresh, &stale, &other, &whole] {
        cache_put(cache, e).await;
    }

    assert_eq!(cache_get(cache, "a1", now).await.as_ref(), Some(&fresh));
    assert_eq!(cache_get(cache, "b1", now).await.as_ref(), Some(&other));
    assert_eq!(cache_get(cache, "a2", now).await, None, "expired");
    assert_eq!(
        cache_get(cache, "a2", stale.expires_at - us).await.as_ref(),
        Some(&stale),
        "not yet expired"
    );
    assert_eq!(
        cache_get(cache, "a2", stale.expires_at).await,
        None,
        "expired at the instant"
    );
    assert_eq!(
        cache_get(cache, "w", whole.expires_at - us).await.as_ref(),
        Some(&whole)
    );
    assert_eq!(
        cache_get(cache, "w", whole.expires_at - TimeDelta::milliseconds(500))
            .await
            .as_ref(),
        Some(&whole)
    );
    assert_eq!(cache_get(cache, "w", whole.expires_at).await, None);
    assert_eq!(cache_get(cache, "w", whole.expires_at + us).await, None);
    assert_eq!(cache_get(cache, "missing", now).await, None);
    assert_eq!(cache_get(cache, "' OR 1=1 --", now).await, None);

    // Putting a key again replaces its entry, expired or not.
    let replaced = CacheEntry {
        namespace: "ns-b".into(),
        model: "other".into(),
        body: "{\"replaced\":true}".into(),
        cost_usd: 2.5,
        ..entry("a1", "ns-b", now + us, TimeDelta::seconds(120))
    };
    cache_put(cache, &replaced).await;
    assert_eq!(cache_get(cache, "a1", now).await.as_ref(), Some(&replaced));
    let revived = entry("a2", "ns-a", now, TimeDelta::seconds(30));
    cache_put(cache, &revived).await;
    assert_eq!(cache_get(cache, "a2", now).await.as_ref(), Some(&revived));
    cache_put(cache, &stale).await;

    // Purge deletes what has expired at `now`: stale (and not the others, however near).
    assert_eq!(cache.cache_purge(now).await.expect("cache_purge"), 1);
    assert_eq!(cache.cache_purge(now).await.expect("cache_purge"), 0);
    assert_eq!(
        cache_get(cache, "a2", stale.expires_at - us).await,
        None,
        "a purged entry is gone"
    );
    assert_eq!(
        cache
            .cache_purge(whole.expires_at - us)
            .await
            .expect("cache_purge"),
        0
    );
    assert_eq!(
        cache
            .cache_purge(whole.expires_at)
            .await
            .expect("cache_purge"),
        1
    );
    assert_eq!(cache_get(cache, "w", whole.expires_at - us).await, None);

    // Clear: one namespace (a1 moved to ns-b when replaced), then everything.
    let a3 = entry("a3", "ns-a", now, TimeDelta::seconds(60));
    let a4 = entry("a4", "ns-a", now, TimeDelta::seconds(60));
    cache_put(cache, &a3).await;
    cache_put(cache, &a4).await;
    // Every clear moves the generation on (for replicas to drop their memory copies).
    let generation = || async {
        (cache.cache_generation().await)
            .expect("cache_generation")
            .expect("kept")
    };
    assert_eq!(generation().await, 0);
    assert_eq!(
        cache.cache_clear(Some("nope")).await.expect("cache_clear"),
        0
    );
    assert_eq!(generation().await, 1);
    assert_eq!(
        cache.cache_clear(Some("ns-a")).await.expect("cache_clear"),
        2
    );
    assert_eq!(cache_get(cache, "a3", now).await, None);
    assert_eq!(cache_get(cache, "a1", now).await.as_ref(), Some(&replaced));
    assert_eq!(cache_get(cache, "b1", now).await.as_ref(), Some(&other));
    assert_eq!(
        cache.cache_clear(Some("ns-a")).await.expect("cache_clear"),
        0
    );
    assert_eq!(cache.cache_clear(None).await.expect("cache_clear"), 2);
    assert_eq!(cache_get(cache, "a1", now).await, None);
    assert_eq!(cache_get(cache, "b1", now).await, None);
    assert_eq!(cache.cache_clear(None).await.expect("cache_clear"), 0);
    assert_eq!(generation().await, 5);
    // The generation never expires.
    let far = now + TimeDelta::days(365 * 100);
    assert_eq!(cache.cache_purge(far).await.expect("cache_purge"), 0);
    assert_eq!(generation().await, 5);

    // Entries last across opens where the database is shared.
    cache_put(cache, &fresh).await;
    if db.shared_between_opens() {
        drop(stores);
        let again = db.open_all().await;
        assert_eq!(
            cache_get(&again.cache, "a1", now).await.as_ref(),
            Some(&fresh)
        );
    }
}

/// A value too long to index whole (a model, user or team of thousands of characters) is stored
/// cut and found again by the same value, without failing the records batched with it; a
/// request made without a key does not charge the team it names.
pub async fn long_values_and_keyless_teams(db: &TestDb) {
    let long_model = "m".repeat(2_000) + &"é".repeat(1_000);
    let long_user = "u".repeat(5_000);
    let long_team = "t".repeat(4_000);
    let keyed = rec(t1(), "m1", Some("k-team"), Some("ann"), Some("squad"), 1.0);
    let keyless = rec(t1(), "m1", None, Some("eve"), Some("squad"), 8.0);
    let long = rec(
        t2(),
        &long_model,
        Some("k-long"),
        Some(&long_user),
        Some(&long_team),
        2.0,
    );
    let stores = open_with(db, &[keyed.clone(), keyless, long.clone()]).await;
    assert_eq!(
        spend(&stores, Spender::Team("squad".into()), t0()).await,
        1.0,
        "only the keyed request charges its team"
    );
    // And usage by team says the same (it counted the keyless request's metadata team).
    let rows = stores
        .usage
        .usage(&UsageQuery {
            team: Some("squad".into()),
            ..UsageQuery::default()
        })
        .await
        .expect("usage");
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert_eq!(total, 1.0, "{rows:?}");
    assert_eq!(
        spend(&stores, Spender::User(long_user.clone()), t0()).await,
        2.0
    );
    assert_eq!(
        spend(&stores, Spender::Team(long_team.clone()), t0()).await,
        2.0
    );
    let got = stores.log.get(long.id).await.expect("get").expect("stored");
    assert!(
        got.model.len() <= 1024 && long_model.starts_with(&got.model),
        "{}",
        got.model.len()
    );
    let found = stores
        .log
        .list(&RecordQuery {
            model: Some(long_model.clone()),
            user: Some(long_user.clone()),
            limit: 10,
            ..RecordQuery::default()
        })
        .await
        .expect("list");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, long.id);
    assert!(stores.log.get(keyed.id).await.expect("get").is_some());
}
