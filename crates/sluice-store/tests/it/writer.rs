//! 6. The writer against a store that keeps nothing (backend-independent): its spill file when the
//!    store is always down, and its count of batches that were slow to write.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::record::{
    LogSink, LogStore, RecordQuery, RecordStatus, RequestRecord, StoreError,
};
use sluice_store::writer::LogWriter;
use uuid::Uuid;

use crate::fixtures::{full_record, record};

/// A store that keeps only ids: with `down`, its `insert_batch` always fails; else the first call
/// takes `first_delay` and every call succeeds.
#[derive(Default)]
struct TestStore {
    insert_calls: AtomicU64,
    down: bool,
    /// Down until this is cleared (when `down` is false).
    failing: std::sync::atomic::AtomicBool,
    /// Records written.
    written: AtomicU64,
    first_delay: Duration,
    /// A batch holding a record of this model is refused as data.
    refuse_model: Option<&'static str>,
    /// The next batch of exactly this many records fails (once), as in a blip of the store.
    fail_batch_of: AtomicU64,
    /// The ids written: a record written again is a no-op, as in the real stores.
    ids: std::sync::Mutex<std::collections::HashSet<Uuid>>,
}

#[async_trait]
impl LogStore for TestStore {
    async fn insert_batch(&self, _records: &[RequestRecord]) -> Result<(), StoreError> {
        let call = self.insert_calls.fetch_add(1, Ordering::SeqCst);
        if self.down || self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Database(
                "connection refused (test store is down)".into(),
            ));
        }
        if call == 0 {
            tokio::time::sleep(self.first_delay).await;
        }
        if self
            .fail_batch_of
            .compare_exchange(_records.len() as u64, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Err(StoreError::Database("connection reset (a blip)".into()));
        }
        if let Some(m) = self.refuse_model
            && _records.iter().any(|r| r.model == m)
        {
            return Err(StoreError::Rejected(format!("model {m} is refused")));
        }
        let mut ids = self.ids.lock().unwrap();
        let fresh = _records.iter().filter(|r| ids.insert(r.id)).count();
        self.written.fetch_add(fresh as u64, Ordering::SeqCst);
        Ok(())
    }
    async fn get(&self, _id: Uuid) -> Result<Option<RequestRecord>, StoreError> {
        Ok(None)
    }
    async fn list(&self, _query: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn count(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_spills_when_the_store_stays_down() {
    const SENT: usize = 100;
    let dir = tempfile::tempdir().expect("tempdir");
    // In a directory that does not exist yet, behind a line already there (appended, not
    // truncated).
    let spill = dir.path().join("not-yet").join("spill.jsonl");
    std::fs::create_dir_all(spill.parent().unwrap()).unwrap();
    let earlier = record("earlier", None, RecordStatus::Ok);
    {
        let mut f = std::fs::File::create(&spill).unwrap();
        serde_json::to_writer(&mut f, &earlier).unwrap();
        f.write_all(b"\n").unwrap();
    }

    let store = Arc::new(TestStore {
        down: true,
        ..TestStore::default()
    });
    let (sink, rx) = LogSink::channel(256);
    // Everything is queued before the writer starts: it takes two batches (64 + 36).
    let mut sent = Vec::with_capacity(SENT);
    for i in 0..SENT {
        let mut r = if i % 10 == 0 {
            full_record()
        } else {
            record("m", Some("u"), RecordStatus::Ok)
        };
        r.id = Uuid::now_v7();
        sent.push(r.clone());
        sink.send(r).await;
    }
    drop(sink);
    let writer = LogWriter::spawn(store.clone(), rx, 64, spill.clone());
    let stats = tokio::time::timeout(
        Duration::from_secs(60),
        writer.drain(Duration::from_secs(30)),
    )
    .await
    .expect("drain did not return");

    assert_eq!(stats.spilled, SENT as u64, "{stats:?}");
    assert_eq!(stats.written, 0, "{stats:?}");
    assert_eq!(stats.batches, 0, "{stats:?}");
    // The first batch is tried 6 times before it is spilled; the second, right after, goes to
    // the spill file at once (the store was found down less than a second ago).
    assert_eq!(store.insert_calls.load(Ordering::SeqCst), 6);

    let text = std::fs::read_to_string(&spill).expect("spill file");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        SENT + 1,
        "the earlier line and one line per record"
    );
    assert!(text.ends_with('\n'));
    let parsed: Vec<RequestRecord> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("spill line {i} is not a record: {e}"))
        })
        .collect();
    assert_eq!(parsed[0].id, earlier.id, "the earlier content is kept");
    let spilled = &parsed[1..];
    assert_eq!(
        spilled.iter().map(|r| r.id).collect::<Vec<_>>(),
        sent.iter().map(|r| r.id).collect::<Vec<_>>(),
        "spilled ids, in order"
    );
    for (got, want) in spilled.iter().zip(&sent) {
        // Floats go through JSON text; everything else must be identical.
        let mut got = got.clone();
        let close = |a: f64, b: f64| (a - b).abs() <= b.abs() * 1e-15;
        assert!(close(got.latency_ms, want.latency_ms));
        assert!(close(got.cost_usd, want.cost_usd));
        assert_eq!(got.ttft_ms.is_some(), want.ttft_ms.is_some());
        if let (Some(a), Some(b)) = (got.ttft_ms, want.ttft_ms) {
            assert!(close(a, b));
        }
        got.latency_ms = want.latency_ms;
        got.cost_usd = want.cost_usd;
        got.ttft_ms = want.ttft_ms;
        got.request_body.clone_from(&want.request_body);
        assert_eq!(&got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_counts_batches_that_were_slow_to_write() {
    let store = Arc::new(TestStore {
        first_delay: sluice_store::writer::SLOW_WRITE + Duration::from_millis(50),
        ..TestStore::default()
    });
    let (sink, rx) = LogSink::channel(16);
    // The first batch is slow; while it is written, the queue (16) fills and senders wait.
    for _ in 0..3 {
        sink.send(record("m", None, RecordStatus::Ok)).await;
    }
    let writer = LogWriter::spawn(store.clone(), rx, 3, std::env::temp_dir().join("unused"));
    for _ in 0..40 {
        sink.send(record("m", None, RecordStatus::Ok)).await;
    }
    drop(sink);
    let stats = writer.drain(Duration::from_secs(30)).await;
    assert_eq!(stats.written, 43, "{stats:?}");
    assert_eq!(stats.spilled, 0, "{stats:?}");
    assert_eq!(stats.slow, 1, "only the first batch was slow: {stats:?}");
    assert!(stats.batches >= 15, "{stats:?}");
}

/// Records with large bodies: the queue's byte budget (1 MiB) holds about two of them, so the
/// senders wait for the writer to write, and every byte is given back once all are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_makes_large_records_wait_and_is_given_back_when_written() {
    let store = Arc::new(TestStore::default());
    let (sink, rx) = LogSink::bounded(1000, 1024 * 1024);
    let writer = LogWriter::spawn(store.clone(), rx, 64, std::env::temp_dir().join("unused"));
    let body = sluice_core::record::RawJson::from_text(format!("\"{}\"", "b".repeat(400 * 1024)))
        .expect("json");
    let mut most = 0;
    for _ in 0..20 {
        let mut r = record("m", None, RecordStatus::Ok);
        r.request_body = Some(body.clone());
        sink.send(r).await;
        most = most.max(sink.queued_bytes());
    }
    assert!(most <= 1024 * 1024, "held {most} bytes, over the budget");
    for _ in 0..200 {
        if store.written.load(Ordering::SeqCst) == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The last batch's bytes are given back just after its write returns.
    for _ in 0..200 {
        if sink.queued_bytes() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.queued_bytes(), 0, "bytes still held after every write");
    drop(sink);
    let stats = writer.drain(Duration::from_secs(30)).await;
    assert_eq!(stats.written, 20, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_file_is_written_to_the_store_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let records: Vec<RequestRecord> = (0..3)
        .map(|_| {
            let mut r = record("m", Some("u"), RecordStatus::Ok);
            r.id = Uuid::now_v7();
            r
        })
        .collect();
    {
        let mut f = std::fs::File::create(&spill).unwrap();
        for r in &records {
            serde_json::to_writer(&mut f, r).unwrap();
            f.write_all(b"\n").unwrap();
        }
        // A line cut short by a crash.
        f.write_all(b"{\"id\":\"0190").unwrap();
    }

    // The store is down: nothing is lost or moved, the records stay in the spill file (one was
    // tried).
    let down = TestStore {
        down: true,
        ..TestStore::default()
    };
    let before = std::fs::read(&spill).unwrap();
    let e = sluice_store::writer::replay_spill(&down, &spill)
        .await
        .expect_err("the store is down");
    assert!(e.contains("the records stay in"), "{e}");
    assert_eq!(down.insert_calls.load(Ordering::SeqCst), 1);
    assert_eq!(std::fs::read(&spill).expect("still spilled"), before);

    // The store is back: every record is written once, the file is gone, the cut line is kept
    // aside. A second replay finds nothing.
    let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let store = sluice_store::SqliteStore::open(&url, 2)
        .await
        .expect("open");
    let done = sluice_store::writer::replay_spill(&store, &spill)
        .await
        .expect("replayed");
    assert_eq!((done.records, done.bad_lines), (3, 1));
    assert!(!spill.exists());
    let bad = std::fs::read_to_string(dir.path().join("spill.jsonl.bad")).expect("kept aside");
    assert_eq!(bad, "{\"id\":\"0190\n");
    assert_eq!(store.count().await.unwrap(), 3);
    for r in &records {
        assert!(store.get(r.id).await.unwrap().is_some());
    }
    let again = sluice_store::writer::replay_spill(&store, &spill)
        .await
        .expect("nothing to do");
    assert_eq!(again.records, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replay_puts_a_large_spill_back_whole_and_in_order() {
    // Over 4 MB of records: put back in several appends.
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let body = format!("{{\"text\":\"{}\"}}", "x".repeat(4000));
    let ids: Vec<Uuid> = (0..1500).map(|_| Uuid::now_v7()).collect();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&spill).unwrap());
        for id in &ids {
            let mut r = record("m", Some("u"), RecordStatus::Ok);
            r.id = *id;
            r.request_body = Some(sluice_core::record::RawJson::from_text(body.clone()).unwrap());
            serde_json::to_writer(&mut f, &r).unwrap();
            f.write_all(b"\n").unwrap();
        }
    }
    let before = std::fs::metadata(&spill).unwrap().len();
    assert!(before > 6 << 20, "{before}");
    // The store takes the record tried first, then fails on the first chunk (512 records).
    let down = TestStore::default();
    down.fail_batch_of.store(512, Ordering::SeqCst);
    let e = sluice_store::writer::replay_spill(&down, &spill)
        .await
        .expect_err("the store failed");
    assert!(e.contains("1500 records stay"), "{e}");
    let kept: Vec<Uuid> = std::fs::read_to_string(&spill)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<RequestRecord>(l)
                .expect("whole lines")
                .id
        })
        .collect();
    assert_eq!(kept, ids);
}

/// A writer (batches of 64) on a store that fails until `failing` is cleared, spilling to
/// `spill.jsonl` in a fresh directory.
fn writer_on_a_failing_store() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<TestStore>,
    LogSink,
    LogWriter,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let store = Arc::new(TestStore::default());
    store.failing.store(true, Ordering::SeqCst);
    let (sink, rx) = LogSink::channel(1024);
    let writer = LogWriter::spawn(store.clone(), rx, 64, spill.clone());
    (dir, spill, store, sink, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spills_at_once_and_the_spill_file_is_written_when_the_store_is_back() {
    let (_dir, spill, store, sink, writer) = writer_on_a_failing_store();
    let send = |n: usize| {
        let sink = sink.clone();
        async move {
            for _ in 0..n {
                let mut r = record("m", Some("u"), RecordStatus::Ok);
                r.id = Uuid::now_v7();
                sink.send(r).await;
            }
        }
    };
    // The first batch finds the store down (6 tries); the next ones are spilled without a try.
    send(10).await;
    let wait_for = |what: &'static str, cond: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let lines = || {
        std::fs::read_to_string(&spill)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for("the first batch is spilled", &|| lines() == 10);
    let tries = store.insert_calls.load(Ordering::SeqCst);
    assert_eq!(tries, 6);
    send(10).await;
    wait_for("the second batch is spilled", &|| lines() == 20);
    assert_eq!(
        store.insert_calls.load(Ordering::SeqCst),
        tries,
        "no try within the second"
    );

    // The store is back: a batch after the probe interval is written, and so is the spill file.
    store.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(5).await;
    wait_for("everything reaches the store", &|| {
        store.written.load(Ordering::SeqCst) == 25
    });
    wait_for("the spill file is gone", &|| !spill.exists());
    drop(sink);
    let stats = writer.drain(Duration::from_secs(10)).await;
    assert_eq!((stats.spilled, stats.written), (20, 5), "{stats:?}");
}

/// Sends two records to a writer whose store is down, and waits until they are spilled.
async fn spill_two(sink: &LogSink, spill: &std::path::Path) {
    for r in records_of(&["m"], 2) {
        sink.send(r).await;
    }
    let start = std::time::Instant::now();
    while lines_of(spill).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "never spilled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records spilled during an outage reach the store once it answers again even when no other
/// request comes (they waited in the spill file for the next batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_writes_the_spill_file_back() {
    let (_dir, spill, store, sink, writer) = writer_on_a_failing_store();
    spill_two(&sink, &spill).await;
    store.failing.store(false, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while store.written.load(Ordering::SeqCst) < 2 || spill.exists() {
        assert!(
            start.elapsed() < sluice_store::writer::REPLAY_AGAIN_EVERY * 3,
            "the spill file waited for traffic"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sink);
    writer.drain(Duration::from_secs(10)).await;
}

/// A probe batch the store refuses whole during an outage is kept in the spill file (it was
/// neither written nor spilled: lost), and the store counts as answering again. (One thread:
/// the three records are queued before the writer runs, so they are one batch.)
#[tokio::test]
async fn a_probe_batch_refused_whole_is_spilled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let store = Arc::new(TestStore {
        refuse_model: Some("poison"),
        ..TestStore::default()
    });
    store.failing.store(true, Ordering::SeqCst);
    let (sink, rx) = LogSink::channel(64);
    let writer = LogWriter::spawn(store.clone(), rx, 16, spill.clone());
    spill_two(&sink, &spill).await;
    store.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for r in records_of(&["poison"], 3) {
        sink.send(r).await;
    }
    drop(sink);
    let stats = writer.drain(Duration::from_secs(30)).await;
    assert_eq!(stats.spilled, 5, "{stats:?}");
    // Kept: in the spill file, or set apart by its replay (which wrote the rest), once the
    // replay the store's answer started is over.
    let claim = dir.path().join("spill.jsonl.replaying");
    let start = std::time::Instant::now();
    while claim.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the replay never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rejected = dir.path().join("spill.jsonl.rejected");
    let poison = [spill, rejected]
        .iter()
        .filter(|p| p.exists())
        .flat_map(|p| lines_of(p))
        .filter(|r| r.model == "poison")
        .count();
    assert_eq!(poison, 3, "the refused probe batch is kept");
}

/// A replay that fails half way (the store blinked while it ran) is tried again while the
/// store answers: the spill file does not wait for the next outage or restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_failed_is_tried_again() {
    let (_dir, spill, store, sink, writer) = writer_on_a_failing_store();
    for r in records_of(&["m"], 10) {
        sink.send(r).await;
    }
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&spill).map_or(0, |t| t.lines().count()) < 10 {
        assert!(start.elapsed() < Duration::from_secs(10), "never spilled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The store is back, but the replay's first write (the 10 spilled records) fails.
    store.fail_batch_of.store(10, Ordering::SeqCst);
    store.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while store.written.load(Ordering::SeqCst) < 10 + sent || spill.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the spill file was not written again: {} written, {sent} sent since",
            store.written.load(Ordering::SeqCst)
        );
        // Traffic goes on: one record at a time, so no batch is 10 long.
        for r in records_of(&["m"], 1) {
            sink.send(r).await;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        store.fail_batch_of.load(Ordering::SeqCst),
        0,
        "the blip happened"
    );
    drop(sink);
    let stats = writer.drain(Duration::from_secs(10)).await;
    assert_eq!(stats.spilled, 10, "{stats:?}");
}

/// Records of `n` models in turn, each with a fresh id.
fn records_of(models: &[&str], n: usize) -> Vec<RequestRecord> {
    (0..n)
        .map(|i| {
            let mut r = record(models[i % models.len()], Some("u"), RecordStatus::Ok);
            r.id = Uuid::now_v7();
            r
        })
        .collect()
}

fn lines_of(path: &std::path::Path) -> Vec<RequestRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a record"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_store_refuses_are_set_apart_and_the_rest_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let store = Arc::new(TestStore {
        refuse_model: Some("poison"),
        ..TestStore::default()
    });
    let (sink, rx) = LogSink::channel(256);
    // 100 records, one in ten refused, all in one batch.
    let sent = records_of(
        &["m", "m", "m", "poison", "m", "m", "m", "m", "m", "m"],
        100,
    );
    for r in &sent {
        sink.send(r.clone()).await;
    }
    drop(sink);
    let writer = LogWriter::spawn(store.clone(), rx, 128, spill.clone());
    let stats = writer.drain(Duration::from_secs(30)).await;
    assert_eq!(
        (stats.written, stats.rejected, stats.spilled),
        (90, 10, 0),
        "{stats:?}"
    );
    assert_eq!(store.written.load(Ordering::SeqCst), 90);
    // No retries: halving found the ten (a few dozen inserts, not one per record).
    let calls = store.insert_calls.load(Ordering::SeqCst);
    assert!(calls < 100, "{calls} inserts");
    assert!(!spill.exists(), "nothing spilled");
    let kept = lines_of(&dir.path().join("spill.jsonl.rejected"));
    let mut want: Vec<Uuid> = sent
        .iter()
        .filter(|r| r.model == "poison")
        .map(|r| r.id)
        .collect();
    let mut got: Vec<Uuid> = kept.iter().map(|r| r.id).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_in_the_spill_file_does_not_hold_back_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let records = records_of(&["m", "poison", "m"], 600);
    {
        let mut f = std::fs::File::create(&spill).unwrap();
        for r in &records {
            serde_json::to_writer(&mut f, r).unwrap();
            f.write_all(b"\n").unwrap();
        }
    }
    let store = TestStore {
        refuse_model: Some("poison"),
        ..TestStore::default()
    };
    let done = sluice_store::writer::replay_spill(&store, &spill)
        .await
        .expect("replayed");
    assert_eq!((done.records, done.rejected, done.bad_lines), (400, 200, 0));
    assert_eq!(store.written.load(Ordering::SeqCst), 400);
    assert!(!spill.exists(), "the spill file is done with");
    let kept = lines_of(&dir.path().join("spill.jsonl.rejected"));
    assert_eq!(kept.len(), 200);
    assert!(kept.iter().all(|r| r.model == "poison"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_whole_is_spilled_not_set_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill.jsonl");
    let store = Arc::new(TestStore {
        refuse_model: Some("poison"),
        ..TestStore::default()
    });
    let (sink, rx) = LogSink::channel(16);
    for r in records_of(&["poison"], 3) {
        sink.send(r).await;
    }
    let writer = LogWriter::spawn(store.clone(), rx, 16, spill.clone());
    let start = std::time::Instant::now();
    while lines_of(&spill).len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(10), "never spilled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Refused whole, the batch is not tried again (the store answered; the same batch would be
    // refused again), and the store is not taken for down: the next record is written.
    // One pass of setting refused records apart (3, then 1 and 2, then 1 and 1): 5 inserts.
    assert_eq!(store.insert_calls.load(Ordering::SeqCst), 5);
    sink.send(record("m", None, RecordStatus::Ok)).await;
    drop(sink);
    let stats = writer.drain(Duration::from_secs(30)).await;
    // Every record refused: not the data's fault (a schema changed, say). They wait in the spill
    // file for the store to take them, like records of an outage (the write that followed
    // started a replay of the file, which the store refuses too and which puts them back).
    assert_eq!(
        (stats.written, stats.rejected, stats.spilled),
        (1, 0, 3),
        "{stats:?}"
    );
    let claim = dir.path().join("spill.jsonl.replaying");
    let start = std::time::Instant::now();
    while lines_of(&spill).len() != 3 || claim.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the refused records are not back in the spill file"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dir.path().join("spill.jsonl.rejected").exists());
}
