//! The checks every backend must pass. Each takes the test's database and opens the store itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use sluice_core::record::{LogSink, LogStore, RecordQuery, RecordStatus, RequestRecord};
use sluice_store::writer::LogWriter;
use uuid::Uuid;

use crate::backend::TestDb;
use crate::fixtures::{
    assert_same_record, full_record, full_record_cancelled, ids, minimal_record, now_us, record,
};
pub use crate::keys::*;
pub use crate::usage::*;

async fn insert(store: &Arc<dyn LogStore>, records: &[RequestRecord]) {
    store
        .insert_batch(records)
        .await
        .unwrap_or_else(|e| panic!("insert_batch of {} records: {e}", records.len()));
}

async fn get(store: &Arc<dyn LogStore>, id: Uuid) -> Option<RequestRecord> {
    store
        .get(id)
        .await
        .unwrap_or_else(|e| panic!("get({id}): {e}"))
}

async fn list(store: &Arc<dyn LogStore>, q: &RecordQuery) -> Vec<RequestRecord> {
    store
        .list(q)
        .await
        .unwrap_or_else(|e| panic!("list({q:?}): {e}"))
}

async fn count(store: &Arc<dyn LogStore>) -> u64 {
    store.count().await.unwrap_or_else(|e| panic!("count: {e}"))
}

/// 1. Records with every field set, and with every optional field empty, come back equal from
///    `get` and from `list`.
pub async fn round_trip(db: &TestDb) {
    let store = db.open().await;
    let full = full_record();
    let cancelled = full_record_cancelled();
    let minimal = minimal_record();
    insert(&store, std::slice::from_ref(&full)).await;
    insert(&store, &[cancelled.clone(), minimal.clone()]).await;

    for want in [&full, &cancelled, &minimal] {
        let got = get(&store, want.id)
            .await
            .unwrap_or_else(|| panic!("record {} not found", want.id));
        assert_same_record(&got, want);
    }

    let listed = list(
        &store,
        &RecordQuery {
            limit: 10,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listed.len(), 3);
    for got in &listed {
        let want = [&full, &cancelled, &minimal]
            .into_iter()
            .find(|w| w.id == got.id)
            .unwrap_or_else(|| panic!("list returned unknown id {}", got.id));
        assert_same_record(got, want);
    }
    // Without bodies: the same records, bodies left out.
    let summaries = list(
        &store,
        &RecordQuery {
            limit: 10,
            without_bodies: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(summaries.len(), 3);
    assert!(full.request_body.is_some() && full.response_body.is_some());
    for got in &summaries {
        let mut want = [&full, &cancelled, &minimal]
            .into_iter()
            .find(|w| w.id == got.id)
            .unwrap_or_else(|| panic!("list returned unknown id {}", got.id))
            .clone();
        want.request_body = None;
        want.response_body = None;
        assert_same_record(got, &want);
    }
    assert_eq!(count(&store).await, 3);
}

/// 2. Inserting records whose ids exist is a no-op: the count is unchanged and the stored
///    records are not overwritten.
pub async fn idempotent_insert(db: &TestDb) {
    let store = db.open().await;
    let batch: Vec<_> = (0..10)
        .map(|i| record(&format!("m{i}"), Some("u"), RecordStatus::Ok))
        .collect();
    insert(&store, &batch).await;
    assert_eq!(count(&store).await, 10);
    insert(&store, &batch).await;
    assert_eq!(count(&store).await, 10, "re-inserting the same batch");

    // Half known, half new; the known ones changed: the stored versions must stay.
    let mut mixed: Vec<_> = batch[..5]
        .iter()
        .cloned()
        .map(|mut r| {
            r.model = "changed".into();
            r.status = RecordStatus::Error;
            r
        })
        .collect();
    mixed.extend((0..5).map(|_| record("new", None, RecordStatus::Cancelled)));
    // The new ones can be told (late costs are added for new records only).
    let new = store.insert_reporting_new(&mixed).await.expect("insert");
    let mut want: Vec<Uuid> = mixed[5..].iter().map(|r| r.id).collect();
    let mut got = new.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(
        store
            .insert_reporting_new(&mixed)
            .await
            .expect("insert")
            .is_empty()
    );
    assert_eq!(
        count(&store).await,
        15,
        "a batch with 5 known and 5 new ids"
    );
    for want in &batch {
        let got = get(&store, want.id).await.expect("stored record");
        assert_same_record(&got, want);
    }
    // A duplicate inside one batch.
    let dup = record("dup", None, RecordStatus::Ok);
    insert(&store, std::slice::from_ref(&dup)).await;
    insert(&store, &[dup.clone(), dup.clone()]).await;
    assert_eq!(count(&store).await, 16);

    // An empty batch is fine.
    insert(&store, &[]).await;
    assert_eq!(count(&store).await, 16);
}

const MODELS: [&str; 3] = ["alpha", "beta", "gamma"];
const USERS: [&str; 2] = ["alice", "bob"];
const STATUSES: [RecordStatus; 3] = [
    RecordStatus::Ok,
    RecordStatus::Error,
    RecordStatus::Cancelled,
];

fn q() -> RecordQuery {
    RecordQuery {
        limit: 1000,
        ..Default::default()
    }
}

/// The expected ids of `records` (oldest first) matching `keep`, newest first.
fn expect(records: &[RequestRecord], keep: impl Fn(&RequestRecord) -> bool) -> Vec<Uuid> {
    records
        .iter()
        .rev()
        .filter(|r| keep(r))
        .map(|r| r.id)
        .collect()
}

/// 3b. `finished_since`: by when requests ended, whatever their ids say (a long request that
///     started first and ended last), to the microsecond, including a time of whole seconds.
pub async fn finished_since(db: &TestDb) {
    let store = db.open().await;
    let base = chrono::DateTime::parse_from_rfc3339("2026-12-06T01:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    // Started in id order; ended: the first last, at whole seconds and in between.
    let ends = [
        base + TimeDelta::seconds(3),
        base + TimeDelta::seconds(1),
        base + TimeDelta::microseconds(1_500_000),
        base + TimeDelta::microseconds(999_999),
    ];
    let mut records = Vec::new();
    for end in ends {
        let mut r = record("alpha", None, RecordStatus::Ok);
        r.started_at = base;
        r.finished_at = end;
        records.push(r);
    }
    insert(&store, &records).await;
    let since = |t| {
        let store = &store;
        async move {
            let mut got = ids(&list(
                store,
                &RecordQuery {
                    finished_since: Some(t),
                    ..q()
                },
            )
            .await);
            got.reverse();
            got
        }
    };
    let id = |i: usize| records[i].id;
    assert_eq!(since(base).await, vec![id(0), id(1), id(2), id(3)]);
    assert_eq!(
        since(base + TimeDelta::seconds(1)).await,
        vec![id(0), id(1), id(2)]
    );
    assert_eq!(
        since(base + TimeDelta::microseconds(1_000_001)).await,
        vec![id(0), id(2)]
    );
    assert_eq!(
        since(base + TimeDelta::microseconds(1_500_000)).await,
        vec![id(0), id(2)]
    );
    assert_eq!(since(base + TimeDelta::seconds(2)).await, vec![id(0)]);
    assert!(since(base + TimeDelta::seconds(4)).await.is_empty());
}

/// 3. Listing: newest first, each filter alone and combined, `since`, paging with `before`,
///    and `limit`.
pub async fn listing(db: &TestDb) {
    let store = db.open().await;
    // Oldest first, each in its own millisecond (for `since`).
    let mut records = Vec::with_capacity(30);
    for i in 0..30 {
        let r = record(MODELS[i % 3], Some(USERS[i % 2]), STATUSES[(i / 5) % 3]);
        records.push(r);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Insert out of order (7 is coprime with 30), in three batches: order must come from ids.
    let shuffled: Vec<_> = (0..30).map(|i| records[(i * 7) % 30].clone()).collect();
    for chunk in shuffled.chunks(10) {
        insert(&store, chunk).await;
    }
    assert_eq!(count(&store).await, 30);

    let all = expect(&records, |_| true);
    let got = list(&store, &q()).await;
    assert_eq!(ids(&got), all, "no filter: all, newest first");
    for (g, w) in got.iter().zip(records.iter().rev()) {
        assert_same_record(g, w);
    }

    // Each filter alone.
    for model in MODELS {
        let got = list(
            &store,
            &RecordQuery {
                model: Some(model.into()),
                ..q()
            },
        )
        .await;
        assert_eq!(
            ids(&got),
            expect(&records, |r| r.model == model),
            "model {model}"
        );
        assert_eq!(got.len(), 10);
    }
    let got = list(
        &store,
        &RecordQuery {
            model: Some("nope".into()),
            ..q()
        },
    )
    .await;
    assert!(got.is_empty(), "unknown model");
    for status in STATUSES {
        let got = list(
            &store,
            &RecordQuery {
                status: Some(status),
                ..q()
            },
        )
        .await;
        assert_eq!(
            ids(&got),
            expect(&records, |r| r.status == status),
            "status {status:?}"
        );
        assert_eq!(got.len(), 10);
    }
    for user in USERS {
        let got = list(
            &store,
            &RecordQuery {
                user: Some(user.into()),
                ..q()
            },
        )
        .await;
        assert_eq!(
            ids(&got),
            expect(&records, |r| r.user.as_deref() == Some(user)),
            "user {user}"
        );
        assert_eq!(got.len(), 15);
    }

    // Combined.
    let got = list(
        &store,
        &RecordQuery {
            model: Some("alpha".into()),
            user: Some("alice".into()),
            ..q()
        },
    )
    .await;
    // i % 6 == 0: 24, 18, 12, 6, 0.
    let want: Vec<_> = [24, 18, 12, 6, 0].iter().map(|&i| records[i].id).collect();
    assert_eq!(ids(&got), want, "model alpha + user alice");
    let got = list(
        &store,
        &RecordQuery {
            model: Some("alpha".into()),
            user: Some("alice".into()),
            status: Some(RecordStatus::Ok),
            ..q()
        },
    )
    .await;
    let want: Vec<_> = [18, 0].iter().map(|&i| records[i].id).collect();
    assert_eq!(ids(&got), want, "model alpha + user alice + status ok");
    let got = list(
        &store,
        &RecordQuery {
            model: Some("beta".into()),
            status: Some(RecordStatus::Cancelled),
            ..q()
        },
    )
    .await;
    assert_eq!(
        ids(&got),
        expect(&records, |r| r.model == "beta"
            && r.status == RecordStatus::Cancelled),
    );
    assert!(!got.is_empty());
    let got = list(
        &store,
        &RecordQuery {
            user: Some("alice".into()),
            model: Some("alpha".into()),
            status: Some(RecordStatus::Ok),
            before: Some(records[18].id),
            ..q()
        },
    )
    .await;
    assert_eq!(ids(&got), vec![records[0].id], "all filters + before");

    // since: records from the 17th on (each record is in a later millisecond than the one
    // before it, and its started_at was taken just before its id).
    let since = records[17].started_at;
    let got = list(
        &store,
        &RecordQuery {
            since: Some(since),
            ..q()
        },
    )
    .await;
    assert_eq!(
        ids(&got),
        expect(&records[17..], |_| true),
        "since record 17"
    );
    let got = list(
        &store,
        &RecordQuery {
            since: Some(since),
            user: Some("bob".into()),
            ..q()
        },
    )
    .await;
    assert_eq!(
        ids(&got),
        expect(&records[17..], |r| r.user.as_deref() == Some("bob")),
        "since + user"
    );
    let got = list(
        &store,
        &RecordQuery {
            since: Some(records[0].started_at - TimeDelta::hours(1)),
            ..q()
        },
    )
    .await;
    assert_eq!(got.len(), 30, "since an hour before all");
    let got = list(
        &store,
        &RecordQuery {
            since: Some(now_us() + TimeDelta::hours(1)),
            ..q()
        },
    )
    .await;
    assert!(got.is_empty(), "since the future");

    // limit.
    let got = list(&store, &RecordQuery { limit: 5, ..q() }).await;
    assert_eq!(ids(&got), all[..5], "limit 5");
    let got = list(&store, &RecordQuery { limit: 1, ..q() }).await;
    assert_eq!(ids(&got), all[..1], "limit 1");
    let got = list(&store, &RecordQuery { limit: 0, ..q() }).await;
    assert_eq!(ids(&got), all[..1], "limit 0 is clamped to 1");
    let got = list(
        &store,
        &RecordQuery {
            limit: u32::MAX,
            ..q()
        },
    )
    .await;
    assert_eq!(ids(&got), all, "a huge limit is clamped to 1000");

    // Paging with before + limit walks everything once, in order.
    for page_size in [1_u32, 7, 10, 30, 31] {
        let mut walked = Vec::new();
        let mut before = None;
        let mut pages = 0;
        loop {
            let page = list(
                &store,
                &RecordQuery {
                    before,
                    limit: page_size,
                    ..q()
                },
            )
            .await;
            assert!(page.len() <= page_size as usize);
            pages += 1;
            assert!(pages <= 32, "paging does not end");
            match page.last() {
                None => break,
                Some(last) => before = Some(last.id),
            }
            walked.extend(ids(&page));
        }
        assert_eq!(walked, all, "paging by {page_size}");
    }
    // Paging a filtered list.
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let page = list(
            &store,
            &RecordQuery {
                model: Some("gamma".into()),
                before,
                limit: 3,
                ..q()
            },
        )
        .await;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        walked.extend(ids(&page));
        assert!(walked.len() <= 10, "filtered paging does not end");
    }
    assert_eq!(
        walked,
        expect(&records, |r| r.model == "gamma"),
        "paging model gamma"
    );
    // before: exclusive, and older than everything gives nothing.
    let got = list(
        &store,
        &RecordQuery {
            before: Some(records[10].id),
            ..q()
        },
    )
    .await;
    assert_eq!(
        ids(&got),
        expect(&records[..10], |_| true),
        "before record 10"
    );
    let got = list(
        &store,
        &RecordQuery {
            before: Some(records[0].id),
            ..q()
        },
    )
    .await;
    assert!(got.is_empty(), "before the oldest");
}

/// 4. `get` of an unknown id is `None`, on an empty and on a filled store.
pub async fn get_unknown(db: &TestDb) {
    let store = db.open().await;
    assert!(get(&store, Uuid::now_v7()).await.is_none());
    assert!(get(&store, Uuid::nil()).await.is_none());
    let r = record("m", None, RecordStatus::Ok);
    insert(&store, std::slice::from_ref(&r)).await;
    assert!(get(&store, Uuid::now_v7()).await.is_none());
    assert!(get(&store, Uuid::max()).await.is_none());
    assert!(get(&store, r.id).await.is_some());
}

/// A NUL character is valid in a Rust string and in JSON (`"\u0000"`, which a client may send in
/// a message): a record holding one is stored like any other, and does not fail its batch.
pub async fn nul_characters(db: &TestDb) {
    let store = db.open().await;
    let mut in_text = full_record();
    in_text.error_message = Some("upstream said: a\0b".into());
    let mut in_json = full_record();
    in_json.id = Uuid::now_v7();
    in_json.request_body =
        Some(serde_json::json!({"messages": [{"role": "user", "content": "x\u{0}y"}]}).into());
    let plain = record("m", None, RecordStatus::Ok);
    let mut failures = Vec::new();
    for (what, r) in [("error_message", &in_text), ("request_body", &in_json)] {
        if let Err(e) = store.insert_batch(&[plain.clone(), r.clone()]).await {
            failures.push(format!("NUL in {what}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    assert_eq!(count(&store).await, 3);
    // JSON keeps NUL exactly; TEXT columns store it as U+FFFD on every backend (PostgreSQL's text
    // cannot hold NUL).
    let mut text_as_stored = in_text.clone();
    text_as_stored.error_message = Some("upstream said: a\u{FFFD}b".into());
    for want in [&text_as_stored, &in_json, &plain] {
        assert_same_record(&get(&store, want.id).await.expect("stored record"), want);
    }
}

async fn batch_of(db: &TestDb, size: usize) {
    let store = db.open().await;
    let batch: Vec<_> = (0..size)
        .map(|i| {
            let mut r = full_record();
            r.id = Uuid::now_v7();
            r.model = format!("m{}", i % 4);
            r
        })
        .collect();
    insert(&store, &batch).await;
    assert_eq!(count(&store).await, size as u64);
    let last = batch.last().expect("a record");
    assert_same_record(&get(&store, last.id).await.expect("last record"), last);
}

/// A batch of the default `batch_size` (512) is written in one `insert_batch`.
pub async fn default_batch(db: &TestDb) {
    batch_of(db, 512).await;
}

/// A batch whose size is no sum of equal statements (103 = 64 + 32 + 4 + 2 + 1 rows) is written
/// whole, every record with its own values, and a second batch of the same size reuses the
/// prepared statements.
pub async fn uneven_batch(db: &TestDb) {
    let store = db.open().await;
    for round in 0..2 {
        let batch: Vec<_> = (0..103)
            .map(|i| {
                let mut r = full_record();
                r.id = Uuid::now_v7();
                r.model = format!("m{round}-{i}");
                r.prompt_tokens = i;
                r
            })
            .collect();
        insert(&store, &batch).await;
        for want in &batch {
            assert_same_record(&get(&store, want.id).await.expect("stored record"), want);
        }
    }
    assert_eq!(count(&store).await, 206);
}

/// A batch as large as the configuration allows (`StoreConfig::validate` accepts `batch_size`
/// up to 2000) is written in one `insert_batch`.
pub async fn largest_batch(db: &TestDb) {
    batch_of(db, 2000).await;
}

/// 5. 20 tasks send 500 records each through one queue; the writer stores all 10 000, in
///    batches.
pub async fn writer_batches(db: &TestDb) {
    const TASKS: usize = 20;
    const PER_TASK: usize = 500;
    const TOTAL: u64 = (TASKS * PER_TASK) as u64;
    let store = db.open().await;
    let (sink, rx) = LogSink::channel(128);
    let writer = LogWriter::spawn(store.clone(), rx, 64, db.spill_path());

    let senders: Vec<_> = (0..TASKS)
        .map(|t| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut sent = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let mut r = record(MODELS[i % 3], Some(&format!("task-{t}")), STATUSES[i % 3]);
                    r.prompt_tokens = i as u64;
                    sent.push(r.id);
                    sink.send(r).await;
                }
                sent
            })
        })
        .collect();
    drop(sink);
    let mut sent = HashSet::new();
    for task in senders {
        sent.extend(task.await.expect("sender task"));
    }
    assert_eq!(sent.len() as u64, TOTAL, "ids are unique");

    let stats = tokio::time::timeout(
        Duration::from_secs(120),
        writer.drain(Duration::from_secs(60)),
    )
    .await
    .expect("drain did not return in 120 s");
    assert_eq!(stats.written, TOTAL, "{stats:?}");
    assert_eq!(stats.spilled, 0, "{stats:?}");
    assert!(
        stats.batches >= TOTAL.div_ceil(64),
        "a batch holds at most 64 records: {stats:?}"
    );
    assert!(stats.batches < TOTAL, "records were not batched: {stats:?}");
    assert!(!db.spill_path().exists(), "nothing is spilled");

    assert_eq!(count(&store).await, TOTAL);
    // Every id, by paging through the whole store (also: the limit is at most 1000).
    let mut stored = HashSet::new();
    let mut before = None;
    loop {
        let page = list(
            &store,
            &RecordQuery {
                before,
                limit: 5000,
                ..q()
            },
        )
        .await;
        assert!(
            page.len() <= 1000,
            "limit is clamped to 1000, got {}",
            page.len()
        );
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        for r in &page {
            assert!(stored.insert(r.id), "id {} listed twice", r.id);
        }
    }
    assert_eq!(stored, sent, "stored ids are the sent ids");
    for id in sent.iter().step_by(997) {
        let r = get(&store, *id).await.expect("sampled record");
        assert_eq!(r.id, *id);
        assert!(r.user.as_deref().is_some_and(|u| u.starts_with("task-")));
    }
}

/// 7. With a sender still alive, `drain` waits `patience`, closes the queue, writes what it holds
///    and returns; sending afterwards does not panic.
pub async fn writer_drain_with_live_sender(db: &TestDb) {
    let store = db.open().await;
    let (sink, rx) = LogSink::channel(1024);
    let writer = LogWriter::spawn(store.clone(), rx, 64, db.spill_path());
    let kept = sink.clone();
    for i in 0..100 {
        sink.send(record(MODELS[i % 3], None, RecordStatus::Ok))
            .await;
    }
    drop(sink);

    let patience = Duration::from_millis(200);
    let started = Instant::now();
    let stats = tokio::time::timeout(Duration::from_secs(30), writer.drain(patience))
        .await
        .expect("drain with a live sender hung");
    let took = started.elapsed();
    assert_eq!(stats.written, 100, "{stats:?}");
    assert_eq!(stats.spilled, 0, "{stats:?}");
    assert!(
        took >= patience,
        "drain returned after {took:?}, before its patience"
    );
    assert_eq!(count(&store).await, 100);

    // The queue is closed: these are refused (with a message), not stored, and do not panic.
    let late = record("late", None, RecordStatus::Ok);
    kept.send(late.clone()).await;
    kept.send_detached(record("late", None, RecordStatus::Ok));
    drop(kept);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(count(&store).await, 100);
    assert!(get(&store, late.id).await.is_none());
}

/// 7b. A record the database cannot hold (a NaN cost for SQLite, whose REAL column stores it as
///     NULL; a date before 4713 BC for PostgreSQL) is refused as data, not as an outage, and the
///     writer writes the rest of its batch and keeps it apart in `FILE.rejected`.
pub async fn refused_records(db: &TestDb) {
    let store = db.open().await;
    let mut bad = record("bad", None, RecordStatus::Ok);
    bad.cost_usd = f64::NAN;
    bad.started_at = chrono::NaiveDate::from_ymd_opt(-5000, 1, 1)
        .expect("date")
        .and_hms_opt(0, 0, 0)
        .expect("time")
        .and_utc();
    let e = store
        .insert_batch(std::slice::from_ref(&bad))
        .await
        .expect_err("refused");
    assert!(
        matches!(e, sluice_core::record::StoreError::Rejected(_)),
        "{e:?}"
    );
    let (sink, rx) = LogSink::channel(64);
    let mut good = Vec::new();
    for i in 0..20 {
        if i == 7 {
            sink.send(bad.clone()).await;
        }
        let r = record(MODELS[i % 3], None, RecordStatus::Ok);
        good.push(r.id);
        sink.send(r).await;
    }
    drop(sink);
    let spill = db.spill_path();
    let stats = LogWriter::spawn(store.clone(), rx, 64, spill.clone())
        .drain(Duration::from_secs(30))
        .await;
    assert_eq!(
        (stats.written, stats.rejected, stats.spilled),
        (20, 1, 0),
        "{stats:?}"
    );
    assert_eq!(count(&store).await, 20);
    for id in good {
        assert!(get(&store, id).await.is_some());
    }
    let kept = std::fs::read_to_string(spill.with_extension("jsonl.rejected")).expect("kept");
    assert_eq!(kept.lines().count(), 1, "{kept}");
    assert!(kept.contains(&bad.id.to_string()), "{kept}");
    assert!(!spill.exists());
}

/// 8a. Opening a store twice (migrating twice) works, and both see the same data.
pub async fn reopen(db: &TestDb) {
    let first = db.open().await;
    let a = record("a", None, RecordStatus::Ok);
    insert(&first, std::slice::from_ref(&a)).await;
    let second = db.open().await;
    let b = record("b", None, RecordStatus::Ok);
    insert(&second, std::slice::from_ref(&b)).await;
    if db.shared_between_opens() {
        assert_eq!(count(&second).await, 2);
        assert_eq!(count(&first).await, 2);
        assert_same_record(&get(&second, a.id).await.expect("a via second"), &a);
        assert_same_record(&get(&first, b.id).await.expect("b via first"), &b);
    }
    drop((first, second));
    // And a third time, after the others are gone.
    let third = db.open().await;
    if db.shared_between_opens() {
        assert_eq!(count(&third).await, 2);
    }
}

/// 8b. Concurrent `open` calls on a fresh database all succeed (and migrate once).
pub async fn concurrent_open(db: &TestDb) {
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { sluice_store::open(&url, 2).await })
        })
        .collect();
    let mut stores = Vec::new();
    for (i, open) in opens.into_iter().enumerate() {
        let store = open
            .await
            .expect("open task")
            .unwrap_or_else(|e| panic!("concurrent open #{i} of {}: {e}", db.url));
        stores.push(store);
    }
    let r = record("m", None, RecordStatus::Ok);
    insert(&stores[0], std::slice::from_ref(&r)).await;
    for store in &stores {
        assert_eq!(count(store).await, 1);
    }
}
