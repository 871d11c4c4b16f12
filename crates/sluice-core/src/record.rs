//! The request record: what every request through Sluice becomes, whatever its outcome.
//!
//! The hot path builds a [`RequestRecord`] and hands it to a [`LogSink`]; a writer task owned by
//! the store drains the sink's queue in batches into a [`LogStore`]. The queue is bounded: when it
//! is full the sender waits (backpressure) rather than dropping a record.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    /// The response was delivered whole.
    Ok,
    /// Sluice answered with an error (client or upstream).
    Error,
    /// The client went away before the response was complete.
    Cancelled,
}

impl RecordStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Ok => "ok",
            RecordStatus::Error => "error",
            RecordStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(RecordStatus::Ok),
            "error" => Some(RecordStatus::Error),
            "cancelled" => Some(RecordStatus::Cancelled),
            _ => None,
        }
    }
}

/// Where a record's token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream reported them.
    Provider,
    /// Sluice counted them with the model's tokenizer.
    Tokenizer,
    /// Sluice estimated them from the text's size (four bytes a token): the prompt of a call
    /// the client's departure cut short.
    Estimate,
    /// No tokens were processed (for example a request rejected before any call).
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Tokenizer => "tokenizer",
            UsageSource::Estimate => "estimate",
            UsageSource::None => "none",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "provider" => UsageSource::Provider,
            "tokenizer" => UsageSource::Tokenizer,
            "estimate" => UsageSource::Estimate,
            _ => UsageSource::None,
        }
    }
}

/// One request through Sluice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// UUIDv7: sorts by start time.
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The API used: `chat.completions`, `messages` (Anthropic ingress), `embeddings`.
    pub endpoint: String,
    /// The model name the client asked for.
    pub model: String,
    /// The provider (configured name) of the deployment that served it, if one was called.
    pub provider: Option<String>,
    /// The upstream model of that deployment.
    pub deployment: Option<String>,
    /// Provider calls made (0 when rejected before routing).
    pub attempts: u32,
    pub status: RecordStatus,
    /// The HTTP status answered (499 for a client that went away).
    pub http_status: u16,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub stream: bool,
    /// From request start to the last byte (or the error).
    pub latency_ms: f64,
    /// From request start to the first generated content sent to the client (streams only).
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub usage_source: UsageSource,
    pub cost_usd: f64,
    pub finish_reason: Option<String>,
    pub user: Option<String>,
    pub session: Option<String>,
    pub tags: Vec<String>,
    /// The request's `metadata` object and `x-sluice-meta-*` headers.
    pub metadata: Value,
    /// The request body as the client sent it, when bodies are stored.
    pub request_body: Option<RawJson>,
    /// The response body (for streams, the assembled completion), when bodies are stored.
    pub response_body: Option<RawJson>,
    /// Every provider call made for the request, in order (retries and fallbacks included).
    #[serde(default)]
    pub attempt_log: Vec<Attempt>,
    /// How the router chose: the strategy and, for complexity routing, the decision and its
    /// score.
    #[serde(default)]
    pub route: Option<Value>,
    /// The id of the virtual key the request was made with.
    #[serde(default)]
    pub key_id: Option<String>,
    /// The exact cache's part: `hit` (served from the cache, no provider call), `miss` (looked
    /// up, not found, the answer stored), or `None` when the cache was not consulted.
    #[serde(default)]
    pub cache: Option<String>,
    /// On a cache hit: what the provider call would have cost (the cost of the answer when it
    /// was first made).
    #[serde(default)]
    pub cost_saved_usd: f64,
}

/// A JSON document kept as its text: a body as it was received or sent, stored and served as is,
/// without being rebuilt as a [`Value`] tree on the hot path. Equality compares the documents,
/// not their formatting.
#[derive(Clone)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// Serializes a value.
    pub fn of<T: Serialize + ?Sized>(v: &T) -> Option<RawJson> {
        serde_json::value::to_raw_value(v).ok().map(RawJson)
    }

    /// Takes JSON text, checking that it is one JSON document.
    pub fn from_text(text: String) -> Result<RawJson, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(RawJson)
    }

    /// Takes JSON bytes (a request body), checking them.
    pub fn from_bytes(bytes: &[u8]) -> Option<RawJson> {
        let text = std::str::from_utf8(bytes).ok()?.trim();
        RawJson::from_text(text.to_string()).ok()
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The document as a [`Value`] (for tests and tools; `Null` if it somehow does not parse).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }
}

impl From<Value> for RawJson {
    fn from(v: Value) -> Self {
        // Serializing a `Value` cannot fail.
        RawJson::of(&v).unwrap_or_else(|| RawJson(serde_json::value::RawValue::NULL.to_owned()))
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get() || self.to_value() == other.to_value()
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(d).map(RawJson)
    }
}

/// One provider call made for a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// The model group the deployment belongs to (differs from the asked model on a fallback).
    pub group: String,
    /// The deployment's id within its group.
    pub deployment: String,
    pub provider: String,
    /// The upstream model (or adapter) called.
    pub model: String,
    /// Milliseconds from the request's start to this call.
    pub started_ms: f64,
    /// How long the call took (to the first chunk for streams).
    pub latency_ms: f64,
    /// `ok`, or the error class: `rate_limited`, `server_error`, `timeout`,
    /// `context_window_exceeded`, `content_policy`, `client_error`.
    pub outcome: String,
    /// The stable error code answered for it, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RequestRecord {
    /// The team its spend counts for: a key owner's (set in metadata from the key); a request
    /// made without a key names its team in metadata only, and has none (usage by team and team
    /// budgets agree).
    pub fn team(&self) -> Option<&str> {
        self.key_id
            .as_ref()
            .and(self.metadata.get("team"))
            .and_then(serde_json::Value::as_str)
    }

    /// A fresh record for a request that just started.
    pub fn start(id: Uuid, endpoint: &str, stream: bool) -> Self {
        let now = Utc::now();
        RequestRecord {
            id,
            started_at: now,
            finished_at: now,
            endpoint: endpoint.to_string(),
            model: String::new(),
            provider: None,
            deployment: None,
            attempts: 0,
            status: RecordStatus::Ok,
            http_status: 200,
            error_code: None,
            error_message: None,
            stream,
            latency_ms: 0.0,
            ttft_ms: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            usage_source: UsageSource::None,
            cost_usd: 0.0,
            finish_reason: None,
            user: None,
            session: None,
            tags: Vec::new(),
            metadata: Value::Null,
            request_body: None,
            response_body: None,
            attempt_log: Vec::new(),
            route: None,
            key_id: None,
            cache: None,
            cost_saved_usd: 0.0,
        }
    }
}

/// Filters and paging for listing records. Results are newest first; `before` pages backwards
/// from an id (exclusive).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordQuery {
    pub model: Option<String>,
    pub status: Option<RecordStatus>,
    pub user: Option<String>,
    /// Requests made with this virtual key.
    pub key: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Only records of requests that finished at or after this time (what `logs --follow`
    /// follows: a record is written when its request ends).
    pub finished_since: Option<DateTime<Utc>>,
    pub before: Option<Uuid>,
    pub limit: u32,
    /// Leave the request and response bodies out (`None` in the records): a reader that shows
    /// summaries does not pull up to 32 MiB a record from the store.
    pub without_bodies: bool,
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    /// The store refused the data itself (a value it cannot hold, a constraint): sending the
    /// same records again fails again, whereas a [`Database`](Self::Database) error may pass.
    #[error("the database refused the data: {0}")]
    Rejected(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
}

/// What the log writer does with records, as it happens (the gateway's metrics implement it).
pub trait WriterObserver: Send + Sync + 'static {
    /// Records written to the store.
    fn written(&self, records: u64);
    /// Records put in the spill file while the store could not take them.
    fn spilled(&self, records: u64);
    /// Records the store refused as data (kept beside the spill file).
    fn refused(&self, records: u64);
    /// A batch that took over the writer's slow-write threshold.
    fn slow_batch(&self);
}

/// Where request records live. SQLite and PostgreSQL implement it and pass the same suite.
#[async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// Writes records in one transaction. Writing a record whose id already exists is a no-op, so
    /// a batch may be retried safely.
    async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError>;
    /// [`insert_batch`](Self::insert_batch), returning the ids of the records that were new
    /// (not in the store before). Stores that cannot tell return them all.
    async fn insert_reporting_new(
        &self,
        records: &[RequestRecord],
    ) -> Result<Vec<Uuid>, StoreError> {
        self.insert_batch(records).await?;
        Ok(records.iter().map(|r| r.id).collect())
    }
    async fn get(&self, id: Uuid) -> Result<Option<RequestRecord>, StoreError>;
    async fn list(&self, query: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError>;
    async fn count(&self) -> Result<u64, StoreError>;
    /// Closes the store's connections once everything is written (at shutdown): an embedded
    /// database is then left whole in its one file, with no write-ahead log beside it.
    async fn close(&self) {}
}

/// The most record bytes (bodies and error text) the log queue holds by default before senders
/// wait: with bodies of up to 32 MiB, a count alone would let a slow store take gigabytes.
pub const DEFAULT_QUEUE_BYTES: u64 = 128 * 1024 * 1024;

/// The unit the queue's byte budget is counted in: a record is charged one unit for itself and
/// one per KiB of its bodies and error text.
const UNIT: u64 = 1024;

impl RequestRecord {
    /// What the record weighs in the log queue, in [`UNIT`]s: one for the record itself and one
    /// per KiB of its bodies and error message (the parts that can be large).
    fn queue_units(&self) -> u64 {
        let body = |b: &Option<RawJson>| b.as_ref().map_or(0, |b| b.get().len());
        let bytes = body(&self.request_body)
            + body(&self.response_body)
            + self.error_message.as_ref().map_or(0, String::len);
        1 + bytes as u64 / UNIT
    }
}

/// A queued record and the units it was charged.
struct Queued {
    record: RequestRecord,
    units: u32,
}

/// The hot path's handle on the log queue. Cloning is cheap.
///
/// The queue is bounded twice: by records (`capacity`) and by bytes, so that a slow store under
/// requests with large bodies cannot take more memory than the budget. A record larger than the
/// whole budget is let in once the queue has room for the budget.
#[derive(Clone, Debug)]
pub struct LogSink {
    tx: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
    budget: u32,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("id", &self.record.id)
            .field("units", &self.units)
            .finish()
    }
}

/// The writer's end of the log queue.
pub struct LogQueue {
    rx: mpsc::Receiver<Queued>,
    room: Arc<Semaphore>,
    scratch: Vec<Queued>,
    /// Units of the records taken and not yet given back by [`LogQueue::done`].
    taken: u64,
}

impl LogSink {
    /// A sink and the receiving end of its bounded queue, with the default byte budget
    /// ([`DEFAULT_QUEUE_BYTES`]).
    pub fn channel(capacity: usize) -> (LogSink, LogQueue) {
        Self::bounded(capacity, DEFAULT_QUEUE_BYTES)
    }

    /// A sink whose queue holds at most `capacity` records and about `max_bytes` of bodies and
    /// error text (at least 1 KiB).
    pub fn bounded(capacity: usize, max_bytes: u64) -> (LogSink, LogQueue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let budget = u32::try_from((max_bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        let room = Arc::new(Semaphore::new(budget as usize));
        (
            LogSink {
                tx,
                room: room.clone(),
                budget,
            },
            LogQueue {
                rx,
                room,
                scratch: Vec::new(),
                taken: 0,
            },
        )
    }

    /// Records queued and not yet taken by the writer (including sends waiting for room).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Bytes of the records queued or being written (as charged: 1 KiB per record plus its
    /// bodies and error text).
    pub fn queued_bytes(&self) -> u64 {
        (self.budget as u64).saturating_sub(self.room.available_permits() as u64) * UNIT
    }

    fn units_of(&self, record: &RequestRecord) -> u32 {
        u32::try_from(record.queue_units())
            .unwrap_or(u32::MAX)
            .min(self.budget)
    }

    /// Queues a record. Waits only when the queue is full (backpressure), never on the database.
    ///
    /// Cancel-safe: if the caller is dropped while it waits for room (the client went away, or
    /// shutdown's grace ran out), the record is handed to [`send_detached`](Self::send_detached)
    /// rather than lost.
    pub async fn send(&self, record: RequestRecord) {
        let units = self.units_of(&record);
        let mut waiting = Waiting {
            sink: self,
            record: Some(record),
            units,
            charged: false,
        };
        // The semaphore is never closed; an error cannot happen.
        if let Ok(permit) = self.room.acquire_many(units).await {
            permit.forget();
            waiting.charged = true;
        }
        let permit = self.tx.reserve().await;
        let Some(record) = waiting.record.take() else {
            return;
        };
        match permit {
            Ok(permit) => permit.send(Queued { record, units }),
            // Only after the writer is gone, which happens after shutdown has drained every sender.
            Err(_) => closed(&record),
        }
    }

    /// Queues a record from a context that cannot wait (a `Drop`): tries at once, and if the queue
    /// is full hands the send to a task, which keeps the writer open until it is done.
    pub fn send_detached(&self, record: RequestRecord) {
        let units = self.units_of(&record);
        self.detached(record, units, false);
    }

    /// Sends `record`, whose `units` are already taken from the byte budget if `charged`.
    fn detached(&self, record: RequestRecord, units: u32, charged: bool) {
        let charged = charged
            || match self.room.try_acquire_many(units) {
                Ok(permit) => {
                    permit.forget();
                    true
                }
                Err(_) => false,
            };
        let queued = Queued { record, units };
        let queued = if charged {
            match self.tx.try_send(queued) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(queued)) => queued,
                Err(mpsc::error::TrySendError::Closed(queued)) => {
                    closed(&queued.record);
                    return;
                }
            }
        } else {
            queued
        };
        let tx = self.tx.clone();
        let room = self.room.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if !charged && let Ok(permit) = room.acquire_many(queued.units).await {
                        permit.forget();
                    }
                    if let Err(lost) = tx.send(queued).await {
                        closed(&lost.0.record);
                    }
                });
            }
            Err(_) => {
                // No runtime to wait in: an uncharged record goes in over the byte budget (with
                // nothing for the writer to give back) rather than being lost.
                let mut queued = queued;
                if !charged {
                    queued.units = 0;
                }
                if let Err(lost) = tx.blocking_send(queued) {
                    closed(&lost.0.record);
                }
            }
        }
    }
}

impl LogQueue {
    /// Receives the next record (`None` once every sender is gone and the queue is empty).
    pub async fn recv(&mut self) -> Option<RequestRecord> {
        let q = self.rx.recv().await?;
        self.taken += q.units as u64;
        Some(q.record)
    }

    /// Receives up to `limit` records into `out` (waiting for the first); 0 once the queue is
    /// closed and empty.
    pub async fn recv_many(&mut self, out: &mut Vec<RequestRecord>, limit: usize) -> usize {
        let n = self.rx.recv_many(&mut self.scratch, limit).await;
        for q in self.scratch.drain(..) {
            self.taken += q.units as u64;
            out.push(q.record);
        }
        n
    }

    /// Tells the queue that the records received so far are written (or spilled): their bytes
    /// no longer count against the budget.
    pub fn done(&mut self) {
        let taken = std::mem::take(&mut self.taken);
        if taken > 0 {
            self.room
                .add_permits(usize::try_from(taken).unwrap_or(usize::MAX));
        }
    }

    /// Accepts no new records; what is queued can still be received.
    pub fn close(&mut self) {
        self.rx.close();
    }
}

impl Drop for LogQueue {
    /// A writer gone for good: senders waiting for bytes are told the queue is closed rather
    /// than left waiting.
    fn drop(&mut self) {
        self.room.close();
    }
}

/// Says that a record could not be queued: the writer is gone (after shutdown closed the
/// queue to requests that outlived its patience).
fn closed(record: &RequestRecord) {
    use std::io::Write;
    // Never a panic on a closed stderr.
    let _ = writeln!(
        std::io::stderr(),
        "sluice: request log writer is closed; record {} ({} {}) not stored",
        record.id,
        record.endpoint,
        record.model
    );
}

/// A record whose [`LogSink::send`] waits for room; sent detached if the wait is abandoned.
struct Waiting<'a> {
    sink: &'a LogSink,
    record: Option<RequestRecord>,
    units: u32,
    /// Whether the record's units are taken from the byte budget already.
    charged: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.sink.detached(record, self.units, self.charged);
        }
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[tokio::test]
    async fn the_sink_counts_what_waits_for_the_writer() {
        let (sink, mut rx) = LogSink::channel(8);
        assert_eq!(sink.queued(), 0);
        for _ in 0..3 {
            sink.send(RequestRecord::start(
                Uuid::now_v7(),
                "chat.completions",
                false,
            ))
            .await;
        }
        assert_eq!(sink.queued(), 3);
        rx.recv().await.expect("a record");
        assert_eq!(sink.queued(), 2);
    }

    fn with_body(kib: usize) -> RequestRecord {
        let mut r = RequestRecord::start(Uuid::now_v7(), "chat.completions", false);
        let text = format!("\"{}\"", "x".repeat(kib * 1024));
        r.request_body = Some(RawJson::from_text(text).expect("json"));
        r
    }

    #[tokio::test]
    async fn large_bodies_wait_for_the_byte_budget_not_only_for_a_slot() {
        // Room for 1,000 records but only 1 MiB of bodies.
        let (sink, mut rx) = LogSink::bounded(1000, 1024 * 1024);
        sink.send(with_body(600)).await;
        assert_eq!(sink.queued_bytes(), 601 * 1024);
        // A second 600 KiB record does not fit beside the first: it waits…
        let second = with_body(600);
        let id = second.id;
        let sink2 = sink.clone();
        let mut waiting = tokio::spawn(async move { sink2.send(second).await });
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut waiting)
                .await
                .is_err(),
            "the send should wait for bytes"
        );
        // …even once the writer has taken the first, until it is written.
        rx.recv().await.expect("the first record");
        tokio::task::yield_now().await;
        assert_eq!(sink.queued(), 0, "the second is not queued yet");
        rx.done();
        waiting.await.expect("the send finishes");
        assert_eq!(rx.recv().await.expect("the second record").id, id);
        rx.done();
        assert_eq!(sink.queued_bytes(), 0, "everything given back");
    }

    #[tokio::test]
    async fn a_record_larger_than_the_whole_budget_goes_in_alone() {
        let (sink, mut rx) = LogSink::bounded(10, 1024 * 1024);
        let big = with_body(3 * 1024);
        let id = big.id;
        tokio::time::timeout(std::time::Duration::from_secs(2), sink.send(big))
            .await
            .expect("a record over the budget is not refused forever");
        assert_eq!(sink.queued_bytes(), 1024 * 1024);
        assert_eq!(rx.recv().await.expect("a record").id, id);
        rx.done();
        assert_eq!(sink.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn an_abandoned_send_is_charged_once() {
        // One slot: the second send has its bytes but waits for the slot, then is abandoned.
        let (sink, mut rx) = LogSink::bounded(1, 1024 * 1024);
        sink.send(with_body(10)).await;
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            sink.send(with_body(20)),
        )
        .await;
        assert!(gave_up.is_err(), "the send should have been waiting");
        assert_eq!(sink.queued_bytes(), (11 + 21) * 1024);
        rx.recv().await.expect("first");
        let second = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
            .await
            .expect("the abandoned record arrives");
        assert!(second.is_some());
        rx.done();
        assert_eq!(sink.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_send_abandoned_while_the_queue_is_full_still_delivers_its_record() {
        let (sink, mut rx) = LogSink::channel(1);
        let first = RequestRecord::start(Uuid::now_v7(), "chat.completions", false);
        let second = RequestRecord::start(Uuid::now_v7(), "chat.completions", false);
        let (a, b) = (first.id, second.id);
        sink.send(first).await;
        // The queue is full: the send waits, and its caller gives up.
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(50), sink.send(second)).await;
        assert!(gave_up.is_err(), "the send should have been waiting");
        let got = |r: Option<RequestRecord>| r.expect("a record").id;
        assert_eq!(got(rx.recv().await), a);
        let next = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
            .await
            .expect("the abandoned record still arrives");
        assert_eq!(got(next), b);
    }
}
