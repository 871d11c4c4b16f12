//! The request-log writer: one task that drains the [`LogSink`](sluice_core::record::LogSink)
//! queue in batches into a store.
//!
//! It takes whatever is queued (up to the batch size) in one transaction, so batches grow with
//! load and a lone request is written at once. A failed batch is retried with backoff (each try
//! bounded in time); if the store stays down, the batch is appended to a spill file (JSON lines)
//! beside the database instead of being dropped, and `sluice` says where. Until the store answers
//! again, later batches go to the spill file at once (one tries the store each second), and when
//! it does, the spill file is written to it. A record the store refuses as data (a value it cannot
//! hold) is set apart in `FILE.rejected` beside the spill file, and the rest of its batch is
//! written: one bad record never keeps the others out. The task ends when every sender is gone and
//! the queue is empty: that is the graceful-shutdown drain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::record::{LogQueue, LogStore, RequestRecord, StoreError, WriterObserver};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What the writer did, reported when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub batches: u64,
    pub spilled: u64,
    /// Records the store refused as data, kept in the spill file's `.rejected` file.
    pub rejected: u64,
    /// Batches that took at least [`SLOW_WRITE`] to write (each one is also logged as a warning).
    pub slow: u64,
}

/// The running writer.
#[derive(Debug)]
pub struct LogWriter {
    handle: JoinHandle<WriterStats>,
    close: Arc<Notify>,
}

/// How many records must be queued at once for the writer to linger for more.
pub const LINGER_FROM: usize = 64;

/// A batch that takes longer than this to write is reported: while the writer waits, the queue
/// fills, and once it is full, requests wait for room.
pub const SLOW_WRITE: Duration = Duration::from_secs(1);

impl LogWriter {
    /// Starts draining `rx` into `store`. `spill` is where batches go if the store stays down.
    pub fn spawn(
        store: Arc<dyn LogStore>,
        rx: LogQueue,
        batch_size: usize,
        spill: PathBuf,
    ) -> Self {
        Self::spawn_with(store, rx, batch_size, spill, Duration::ZERO)
    }

    /// Like [`LogWriter::spawn`]; when records arrive quickly (at least [`LINGER_FROM`] queued
    /// while the last batch was written), the writer waits up to `linger` for the batch to fill,
    /// so that under load it writes a few large transactions instead of many small ones. At a
    /// lighter load it writes what is queued at once: many small writes spread the work, where
    /// lingering would gather it into bursts that delay the requests being served meanwhile.
    pub fn spawn_with(
        store: Arc<dyn LogStore>,
        rx: LogQueue,
        batch_size: usize,
        spill: PathBuf,
        linger: Duration,
    ) -> Self {
        Self::spawn_observed(store, rx, batch_size, spill, linger, None)
    }

    /// Like [`LogWriter::spawn_with`], telling `observer` what becomes of the records (written,
    /// spilled, refused, slow batches) as it happens.
    pub fn spawn_observed(
        store: Arc<dyn LogStore>,
        mut rx: LogQueue,
        batch_size: usize,
        spill: PathBuf,
        linger: Duration,
        observer: Option<Arc<dyn WriterObserver>>,
    ) -> Self {
        let close = Arc::new(Notify::new());
        let close_rx = close.clone();
        let handle = tokio::spawn(async move {
            let mut stats = WriterStats::default();
            let mut health = Health::default();
            let mut batch = Vec::with_capacity(batch_size);
            let mut closed = false;
            loop {
                tokio::select! {
                    biased;
                    n = rx.recv_many(&mut batch, batch_size) => {
                        if n == 0 {
                            break;
                        }
                        if !linger.is_zero() && n >= LINGER_FROM {
                            let until = tokio::time::Instant::now() + linger;
                            while batch.len() < batch_size {
                                let room = batch_size - batch.len();
                                match tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => {}
                                }
                            }
                        }
                        let before = stats;
                        write_batch(&store, &batch, &spill, &mut stats, &mut health).await;
                        batch.clear();
                        rx.done();
                        if let Some(o) = &observer {
                            report(o.as_ref(), before, stats);
                        }
                    }
                    _ = close_rx.notified(), if !closed => {
                        // Accept nothing new; what is queued is still written.
                        rx.close();
                        closed = true;
                    }
                    // No batch came for a while after records were spilled: the store is tried
                    // by writing the spill file to it (it was tried only by the next batch, so
                    // an idle gateway kept its records in the file).
                    () = tokio::time::sleep(REPLAY_AGAIN_EVERY), if health.outage.is_some() => {
                        health.replay(&store, &spill);
                    }
                }
            }
            tracing::debug!(
                written = stats.written,
                batches = stats.batches,
                spilled = stats.spilled,
                rejected = stats.rejected,
                slow = stats.slow,
                "request log writer drained"
            );
            stats
        });
        LogWriter { handle, close }
    }

    /// Waits until every sender is dropped and everything queued is written. If senders are
    /// still alive after `patience` (requests that outlived the shutdown grace period), the queue
    /// is closed to new records and what it holds is written.
    pub async fn drain(mut self, patience: Duration) -> WriterStats {
        match tokio::time::timeout(patience, &mut self.handle).await {
            Ok(r) => r.unwrap_or_default(),
            Err(_) => {
                tracing::warn!("requests still running at shutdown; closing the log queue");
                self.close.notify_one();
                self.handle.await.unwrap_or_default()
            }
        }
    }
}

/// Tells an observer what changed between two readings of the writer's counts.
fn report(o: &dyn WriterObserver, before: WriterStats, after: WriterStats) {
    let d = |a: u64, b: u64| b.saturating_sub(a);
    if after.written > before.written {
        o.written(d(before.written, after.written));
    }
    if after.spilled > before.spilled {
        o.spilled(d(before.spilled, after.spilled));
    }
    if after.rejected > before.rejected {
        o.refused(d(before.rejected, after.rejected));
    }
    for _ in before.slow..after.slow {
        o.slow_batch();
    }
}

/// The longest one write attempt may take: a store that hangs (a network partition) is treated
/// as down rather than holding the writer, and with it every request once the queue is full.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the retries of one batch may go on before it is spilled.
pub const RETRY_BUDGET: Duration = Duration::from_secs(5);

/// While the store is down, how often a batch tries it; the others go to the spill file at once,
/// so requests keep flowing during an outage.
pub const OUTAGE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// The longest a probe during an outage may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// While the store answers, how often the writer looks for a spill file that is still there (a
/// replay that failed half way, or one left by the start) and writes it to the store again.
pub const REPLAY_AGAIN_EVERY: Duration = Duration::from_secs(5);

/// What the writer knows of the store's health.
#[derive(Default)]
struct Health {
    /// Since when the store is taken for down (the last probe).
    outage: Option<tokio::time::Instant>,
    /// A replay of the spill file is running.
    replaying: Arc<std::sync::atomic::AtomicBool>,
    /// When to look for a spill file left over next.
    look_again: Option<tokio::time::Instant>,
}

impl Health {
    /// Writes the spill file to the store in the background, unless a replay is running.
    fn replay(&mut self, store: &Arc<dyn LogStore>, spill: &std::path::Path) {
        use std::sync::atomic::Ordering;
        self.look_again = Some(tokio::time::Instant::now() + REPLAY_AGAIN_EVERY);
        if self.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, path, running) = (store.clone(), spill.to_path_buf(), self.replaying.clone());
        /// Clears the flag however the replay ends (a panic too).
        struct Done(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        tokio::spawn(async move {
            let _done = Done(running);
            match replay_spill_running(&*store, &path).await {
                Ok(r) if r.records + r.bad_lines + r.rejected > 0 => tracing::warn!(
                    records = r.records,
                    unreadable_lines = r.bad_lines,
                    refused_by_the_store = r.rejected,
                    "spilled request records written to the store"
                ),
                Ok(_) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    retry_in_secs = REPLAY_AGAIN_EVERY.as_secs(),
                    "the spilled request records could not be written yet; they stay in the spill file"
                ),
            }
        });
    }

    /// After a batch was written: a spill file still there is written again, every
    /// [`REPLAY_AGAIN_EVERY`] at most.
    fn after_write(&mut self, store: &Arc<dyn LogStore>, spill: &std::path::Path) {
        let now = tokio::time::Instant::now();
        if self.look_again.is_some_and(|at| now < at) {
            return;
        }
        self.look_again = Some(now + REPLAY_AGAIN_EVERY);
        if spill.exists() {
            self.replay(store, spill);
        }
    }
}

/// Writes a batch. Normally it is retried with backoff before it is spilled; once one has been
/// spilled the store is taken for down, and until a write succeeds again a batch tries it once
/// at most every [`OUTAGE_PROBE_EVERY`] and is otherwise spilled at once. When the store is back,
/// the spill file is written to it in the background, and written again while it is still there
/// (a replay that failed half way).
async fn write_batch(
    store: &Arc<dyn LogStore>,
    batch: &[RequestRecord],
    spill: &std::path::Path,
    stats: &mut WriterStats,
    health: &mut Health,
) {
    let outage = &mut health.outage;
    if let Some(probed) = *outage {
        let now = tokio::time::Instant::now();
        if now.duration_since(probed) < OUTAGE_PROBE_EVERY {
            spill_or_lose(spill, batch, stats, false);
            return;
        }
        match try_write(
            &**store,
            batch,
            spill,
            stats,
            1,
            PROBE_TIMEOUT,
            PROBE_TIMEOUT,
        )
        .await
        {
            Tried::Failed => {
                spill_or_lose(spill, batch, stats, false);
                // The next probe a second after this one ended, however long it took.
                *outage = Some(tokio::time::Instant::now());
            }
            answered => {
                // The store answered (a batch it refused whole is kept in the spill file).
                if answered == Tried::Refused {
                    spill_or_lose(spill, batch, stats, true);
                }
                *outage = None;
                tracing::warn!("the store answers again; writing the spill file's records to it");
                health.replay(store, spill);
            }
        }
        return;
    }
    match try_write(
        &**store,
        batch,
        spill,
        stats,
        6,
        ATTEMPT_TIMEOUT,
        RETRY_BUDGET,
    )
    .await
    {
        Tried::Written => health.after_write(store, spill),
        // The store answered, refusing the whole batch (a schema changed under the writer,
        // say): kept in the spill file, with no retry (the same batch would be refused again)
        // and no outage (the next batch is tried as usual).
        Tried::Refused => spill_or_lose(spill, batch, stats, true),
        Tried::Failed => {
            spill_or_lose(spill, batch, stats, true);
            *outage = Some(tokio::time::Instant::now());
        }
    }
}

/// What came of [`try_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tried {
    /// Written (records the store refused as data set apart).
    Written,
    /// The store refused every record of a batch of several: not the data's fault.
    Refused,
    /// The store did not answer, or failed, through every try.
    Failed,
}

/// Tries to write a batch up to `attempts` times with backoff, each try bounded by `limit` and
/// all of them by `budget`. Records the store refuses as data are set apart (see
/// [`insert_isolating`]) and the batch counts as written; a batch refused whole is not tried
/// again.
async fn try_write(
    store: &dyn LogStore,
    batch: &[RequestRecord],
    spill: &std::path::Path,
    stats: &mut WriterStats,
    attempts: u32,
    limit: Duration,
    budget: Duration,
) -> Tried {
    let mut delay = Duration::from_millis(50);
    let first = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + budget;
    for attempt in 1..=attempts {
        let started = std::time::Instant::now();
        match insert_isolating(store, batch, limit, deadline).await {
            Ok(refused) => {
                stats.written += (batch.len() - refused.len()) as u64;
                stats.batches += 1;
                if !refused.is_empty() {
                    stats.rejected += refused.len() as u64;
                    set_apart(spill, &refused);
                }
                let took = started.elapsed();
                if took >= SLOW_WRITE {
                    stats.slow += 1;
                    tracing::warn!(
                        records = batch.len(),
                        seconds = took.as_secs_f64(),
                        "writing request records was slow; requests wait once the log queue is full"
                    );
                }
                return Tried::Written;
            }
            Err(e @ StoreError::Rejected(_)) => {
                tracing::warn!(records = batch.len(), error = %e, "the store refused every record of a batch; it goes to the spill file");
                return Tried::Refused;
            }
            Err(e) => {
                tracing::warn!(attempt, records = batch.len(), error = %e, "writing request records failed");
                if first.elapsed() >= budget {
                    break;
                }
                if attempt < attempts {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
    Tried::Failed
}

/// A record the store refused, and its reason.
type Refused<'a> = (&'a RequestRecord, String);

/// Writes `batch`, each insert bounded by `limit` and all of them by `deadline`. When the store
/// refuses the data ([`StoreError::Rejected`]), the batch is split in halves until each refused
/// record stands alone, and the others are written; those are returned with the store's reason.
/// Any other error (the store is down or busy), running out of time, or every record of a batch
/// of several refused (then the data is not the cause: a schema changed under the writer, say)
/// is returned as an error: a retry sends the whole batch again, and what was written meanwhile
/// is not written twice.
pub async fn insert_isolating<'a>(
    store: &dyn LogStore,
    batch: &'a [RequestRecord],
    limit: Duration,
    deadline: tokio::time::Instant,
) -> Result<Vec<Refused<'a>>, StoreError> {
    let mut refused = Vec::new();
    let mut todo = vec![batch];
    while let Some(part) = todo.pop() {
        if part.is_empty() {
            continue;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(StoreError::Database(
                "out of time for this batch while setting refused records apart".into(),
            ));
        }
        let limit = limit.min(deadline - now);
        let result = match tokio::time::timeout(limit, store.insert_batch(part)).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Database(format!(
                "no answer within {:.1} s",
                limit.as_secs_f64()
            ))),
        };
        match result {
            Ok(()) => {}
            Err(StoreError::Rejected(why)) if part.len() == 1 => refused.push((&part[0], why)),
            Err(StoreError::Rejected(_)) => {
                let (a, b) = part.split_at(part.len() / 2);
                todo.push(b);
                todo.push(a);
            }
            Err(e) => return Err(e),
        }
    }
    if batch.len() > 1 && refused.len() == batch.len() {
        return Err(StoreError::Rejected(format!(
            "every record of the batch was refused: {}",
            refused[0].1
        )));
    }
    Ok(refused)
}

/// Where records the store refused are kept, beside the spill file `spill`.
pub fn rejected_path(spill: &std::path::Path) -> PathBuf {
    spill.with_extension("jsonl.rejected")
}

/// Records as JSON lines, as the spill file holds them. A body kept as the client sent it may
/// hold line breaks between its tokens (pretty-printed JSON); they become spaces, which JSON
/// reads the same (a line break inside a string is always escaped), so that a record is always
/// one line.
fn json_lines<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
) -> std::io::Result<Vec<u8>> {
    let mut lines = Vec::new();
    for r in records {
        let start = lines.len();
        serde_json::to_writer(&mut lines, r)?;
        for b in &mut lines[start..] {
            if *b == b'\n' || *b == b'\r' {
                *b = b' ';
            }
        }
        lines.push(b'\n');
    }
    Ok(lines)
}

/// Keeps records the store refused in [`rejected_path`] (JSON lines, as spilled), and says so:
/// they are not written again by themselves.
fn set_apart(spill: &std::path::Path, refused: &[Refused<'_>]) {
    let path = rejected_path(spill);
    let kept = json_lines(refused.iter().map(|(r, _)| *r)).and_then(|lines| append(&path, &lines));
    let (first_id, reason) = (refused[0].0.id, refused[0].1.as_str());
    tracing::error!(
        records = refused.len(),
        %first_id,
        error = reason,
        path = %path.display(),
        file_error = kept.as_ref().err().map(tracing::field::display),
        "the store refused request records; they are kept in the file named, unless file_error says they could not be"
    );
}

/// Appends a batch to the spill file; `loud` logs it as an error (the first of an outage; the
/// others are logged at debug level, so that an outage does not flood the log).
fn spill_or_lose(
    spill: &std::path::Path,
    batch: &[RequestRecord],
    stats: &mut WriterStats,
    loud: bool,
) {
    match spill_batch(spill, batch) {
        Ok(()) => {
            stats.spilled += batch.len() as u64;
            if loud {
                tracing::error!(records = batch.len(), path = %spill.display(), "store unavailable; request records go to the spill file until it answers again (they are written to it then)");
            } else {
                tracing::debug!(records = batch.len(), path = %spill.display(), "store still unavailable; request records appended to the spill file");
            }
        }
        Err(e) => {
            tracing::error!(records = batch.len(), error = %e, path = %spill.display(), "store unavailable and the spill file cannot be written; records lost");
        }
    }
}

fn spill_batch(path: &std::path::Path, batch: &[RequestRecord]) -> std::io::Result<()> {
    // The whole batch in one append: lines of several writers (replicas sharing the directory)
    // do not interleave, and a failure leaves no half line before the next batch.
    append(path, &json_lines(batch)?)
}

/// What [`replay_spill`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records written to the store (a record already there counts and is left as it is).
    pub records: u64,
    /// Lines that were not a record (a line cut short by a crash), kept in `FILE.bad`.
    pub bad_lines: u64,
    /// Records the store refused as data, kept in `FILE.rejected`.
    pub rejected: u64,
}

/// Writes the records of a spill file (left by a writer whose store was down) to the store, then
/// removes it.
///
/// One replay runs at a time among the processes sharing the file: each holds a lock on
/// `FILE.lock` while it runs, and one that finds it held leaves the file to its holder. The store
/// is tried with the file's first record before anything moves, so a store still down costs a
/// single insert (a failed replay puts every line it has not written back, which for a large
/// file is a copy of gigabytes). The file is then claimed, by linking it under a second name
/// (renaming it where hard links fail), so that new spills start a fresh file; a claim left by a
/// replay that stopped half way is taken up by the next replay that holds the lock. Records are
/// read and written 512 at a time. Writing a record twice is a no-op, so a replay may safely
/// repeat. Records the store refuses as data go to `FILE.rejected`. If the store fails, the
/// records not yet written go back to the spill file and the error is returned.
pub async fn replay_spill(
    store: &dyn LogStore,
    path: &std::path::Path,
) -> Result<Replayed, String> {
    replay(store, path, true).await
}

/// [`replay_spill`] while the server runs. Where the file system has no locks, a claim that
/// exists may belong to another replica's replay, so it is left for the next start.
pub async fn replay_spill_running(
    store: &dyn LogStore,
    path: &std::path::Path,
) -> Result<Replayed, String> {
    replay(store, path, false).await
}

async fn replay(
    store: &dyn LogStore,
    path: &std::path::Path,
    take_over: bool,
) -> Result<Replayed, String> {
    replay_linking(store, path, take_over, |from, to| {
        std::fs::hard_link(from, to)
    })
    .await
}

/// [`replay`], claiming the file with `link` (a test stands in a file system without hard links).
async fn replay_linking(
    store: &dyn LogStore,
    path: &std::path::Path,
    take_over: bool,
    link: impl Fn(&std::path::Path, &std::path::Path) -> std::io::Result<()>,
) -> Result<Replayed, String> {
    use std::io::BufRead;
    let claimed = path.with_extension("jsonl.replaying");
    let mut out = Replayed::default();
    let lock = match replay_lock(path) {
        Ok(Some(lock)) => Some(lock),
        // Another process is replaying the file.
        Ok(None) => return Ok(out),
        Err(e) => {
            tracing::debug!(error = %e, path = %path.display(), "no lock for the spill file's replay; its claim alone keeps replays apart");
            None
        }
    };
    // Holding the lock, no other replay runs: a claim that exists was left half way.
    let take_over = take_over || lock.is_some();
    if path.exists() {
        try_store(store, path).await?;
    }
    loop {
        if path.exists() {
            match link(path, &claimed) {
                Ok(()) => {
                    // Ours now: new spills start a fresh file.
                    std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
                    fence_appends(&claimed);
                }
                // Claimed by another replica, or left by a replay that stopped half way.
                Err(_) if claimed.exists() => {
                    if !take_over {
                        return Ok(out);
                    }
                }
                // No claim, and yet no link: a file system without hard links (some network
                // mounts). The claim is taken by creating it (which fails if another replica
                // made one meanwhile), then the file is renamed over it.
                Err(e) => {
                    match std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&claimed)
                    {
                        Ok(_) => {}
                        Err(ce) if ce.kind() == std::io::ErrorKind::AlreadyExists => {
                            if !take_over {
                                return Ok(out);
                            }
                        }
                        Err(ce) => {
                            return Err(format!(
                                "{}: cannot claim it for writing to the store (linking: {e}; creating the claim: {ce})",
                                path.display()
                            ));
                        }
                    }
                    std::fs::rename(path, &claimed).map_err(|re| {
                        format!(
                            "{}: cannot claim it for writing to the store (linking: {e}; renaming: {re})",
                            path.display()
                        )
                    })?;
                    fence_appends(&claimed);
                }
            }
        } else if !(take_over && claimed.exists()) {
            return Ok(out);
        }
        let file =
            std::fs::File::open(&claimed).map_err(|e| format!("{}: {e}", claimed.display()))?;
        let mut lines = std::io::BufReader::new(file).split(b'\n');
        let mut chunk = Vec::with_capacity(512);
        let mut chunk_bytes = 0;
        let mut bad = Vec::new();
        loop {
            let line = match lines.next() {
                Some(l) => Some(l.map_err(|e| format!("{}: {e}", claimed.display()))?),
                None => None,
            };
            if let Some(line) = &line
                && !line.is_empty()
            {
                match serde_json::from_slice::<RequestRecord>(line) {
                    Ok(r) => chunk.push(r),
                    Err(_) => {
                        bad.extend_from_slice(line);
                        bad.push(b'\n');
                        out.bad_lines += 1;
                    }
                }
            }
            if let Some(line) = &line {
                chunk_bytes += line.len();
            }
            if chunk.len() < 512 && chunk_bytes < REPLAY_CHUNK_BYTES && line.is_some() {
                continue;
            }
            if !chunk.is_empty() {
                let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
                let written = insert_isolating(store, &chunk, ATTEMPT_TIMEOUT, deadline)
                    .await
                    .map(|refused| {
                        if !refused.is_empty() {
                            set_apart(path, &refused);
                        }
                        refused.len() as u64
                    });
                let refused = match written {
                    Ok(n) => n,
                    Err(e) => {
                        // Back to the spill file: this chunk and every line not read yet, a
                        // few megabytes at a time (the rest of a spill can be gigabytes). A
                        // crash meanwhile leaves some lines in both files: the claim is replayed
                        // again, and a record already stored is skipped.
                        let put_back = |back: &[u8]| {
                            append(path, back).map_err(|se| {
                                format!("{e}; and putting the records back failed: {se}")
                            })
                        };
                        let mut back = json_lines(&chunk).map_err(|e| e.to_string())?;
                        let mut left = chunk.len();
                        for l in lines.by_ref() {
                            let l = l.map_err(|e| format!("{}: {e}", claimed.display()))?;
                            if !l.is_empty() {
                                back.extend_from_slice(&l);
                                back.push(b'\n');
                                left += 1;
                            }
                            if back.len() >= PUT_BACK_BYTES {
                                put_back(&back)?;
                                back.clear();
                            }
                        }
                        put_back(&back)?;
                        keep_bad(path, &bad)?;
                        let _ = std::fs::remove_file(&claimed);
                        return Err(format!("{e} ({left} records stay in {})", path.display()));
                    }
                };
                out.rejected += refused;
                out.records += chunk.len() as u64 - refused;
                chunk.clear();
                chunk_bytes = 0;
            }
            if line.is_none() {
                break;
            }
        }
        keep_bad(path, &bad)?;
        std::fs::remove_file(&claimed).map_err(|e| format!("{}: {e}", claimed.display()))?;
        // Spilled again meanwhile (or left beside an old claim): go round once more.
    }
}

/// Takes the lock that keeps replays of the spill file `path` apart (`FILE.lock`, created if
/// missing; released when the returned file closes). `Ok(None)`: another process holds it. An
/// error: the file system has no locks.
fn replay_lock(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let lock_path = path.with_extension("jsonl.lock");
    if let Some(dir) = lock_path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Tries the store with the first record of the spill file `path`, before the file is claimed:
/// a store that does not take it leaves the file where it is. A record the store refuses as data
/// shows the store answers (the replay sets it apart); a file whose first lines are no record
/// is replayed without a try.
async fn try_store(store: &dyn LogStore, path: &std::path::Path) -> Result<(), String> {
    use std::io::BufRead;
    let first = (|| {
        let file = std::fs::File::open(path).ok()?;
        std::io::BufReader::new(file)
            .split(b'\n')
            .take(16)
            .map_while(Result::ok)
            .find_map(|line| serde_json::from_slice::<RequestRecord>(&line).ok())
    })();
    let Some(first) = first else {
        return Ok(());
    };
    let tried = match tokio::time::timeout(
        ATTEMPT_TIMEOUT,
        store.insert_batch(std::slice::from_ref(&first)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(StoreError::Database(format!(
            "no answer within {:.1} s",
            ATTEMPT_TIMEOUT.as_secs_f64()
        ))),
    };
    match tried {
        Ok(()) | Err(StoreError::Rejected(_)) => Ok(()),
        Err(e) => Err(format!("{e} (the records stay in {})", path.display())),
    }
}

/// Waits for appends to a spill file just claimed that began before it was claimed: an append
/// holds the file's lock while it writes, and checks after taking it that the file is still the
/// spill file (see [`open_for_append`]), so once this has had the lock no more lines go into the
/// claim.
fn fence_appends(claimed: &std::path::Path) {
    // Opened for writing: where locks are emulated with record locks (NFS), an exclusive lock
    // needs it.
    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(claimed) {
        let _ = f.lock();
    }
}

/// Opens `path` to append to it, holding its lock: a file claimed by a replay (unlinked from
/// `path`) between the open and the lock is let go and `path` opened again, so that no line is
/// written into a file already read.
fn open_for_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    loop {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        if let Err(e) = f.lock() {
            // No locks here (unsupported, or a network mount without a lock service): the
            // record goes in all the same, appends and claims kept apart by timing alone.
            tracing::debug!(error = %e, path = %path.display(), "appending to the spill file without a lock");
            return Ok(f);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let mine = f.metadata()?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == mine.ino() && now.dev() == mine.dev() => return Ok(f),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        #[cfg(not(unix))]
        return Ok(f);
    }
}

/// The most a replay writes in one go: 512 records, or fewer when their lines add up to this
/// many bytes (records with large bodies), so that memory stays bounded and one insert fits its
/// time limit.
const REPLAY_CHUNK_BYTES: usize = 8 << 20;

/// How much of a spill file a failed replay holds in memory at once while putting it back.
const PUT_BACK_BYTES: usize = 4 << 20;

/// Appends lines to a file, creating it and its directory. A file left ending in a partial line
/// (a write cut short by a crash or a full disk) gets a line end first, so the cut line, not the
/// next record, is the one that fails to parse on replay.
fn append(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = open_for_append(path)?;
    let len = f.seek(SeekFrom::End(0))?;
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    f.write_all(bytes)?;
    f.sync_data()
}

/// Keeps the lines that were not records in `FILE.bad`.
fn keep_bad(path: &std::path::Path, bad: &[u8]) -> Result<(), String> {
    if bad.is_empty() {
        return Ok(());
    }
    let kept = path.with_extension("jsonl.bad");
    append(&kept, bad).map_err(|e| format!("{}: {e}", kept.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::RecordQuery;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A store that counts what it is given (and keeps the largest batch and the records).
    #[derive(Default)]
    struct Counting(AtomicU64, AtomicU64, std::sync::Mutex<Vec<RequestRecord>>);

    #[async_trait::async_trait]
    impl LogStore for Counting {
        async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
            self.0.fetch_add(records.len() as u64, Ordering::SeqCst);
            self.1.fetch_max(records.len() as u64, Ordering::SeqCst);
            self.2.lock().unwrap().extend_from_slice(records);
            Ok(())
        }
        async fn get(&self, id: uuid::Uuid) -> Result<Option<RequestRecord>, StoreError> {
            Ok(self.2.lock().unwrap().iter().find(|r| r.id == id).cloned())
        }
        async fn list(&self, _query: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError> {
            Ok(Vec::new())
        }
        async fn count(&self) -> Result<u64, StoreError> {
            Ok(self.0.load(Ordering::SeqCst))
        }
    }

    /// On a file system without hard links the spill file is claimed by renaming it (it used to
    /// be taken for claimed by another replica, and never written to the store). While another
    /// process replays (holds the lock) nothing is touched; a claim left behind by a replay that
    /// stopped half way is taken up by the next one (a running server left it for the next
    /// start, so its records stayed out of the store while it ran).
    #[tokio::test]
    async fn a_spill_file_is_replayed_where_hard_links_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let records: Vec<_> = (0..3)
            .map(|_| RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false))
            .collect();
        append(&path, &json_lines(&records).unwrap()).unwrap();
        let no_links = |_: &std::path::Path, _: &std::path::Path| {
            Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
        };
        let store = Counting::default();
        let claim = path.with_extension("jsonl.replaying");
        let left = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        std::fs::write(&claim, json_lines([&left]).unwrap()).unwrap();
        let other = replay_lock(&path).unwrap().expect("the lock is free");
        let r = replay_linking(&store, &path, false, no_links)
            .await
            .unwrap();
        assert_eq!(r.records, 0, "another process's replay is left alone");
        assert!(path.exists() && claim.exists());
        drop(other);
        let r = replay_linking(&store, &path, false, no_links)
            .await
            .unwrap();
        assert_eq!(r.records, 4, "the claim left behind, then the spill file");
        assert_eq!(
            store.0.load(Ordering::SeqCst),
            5,
            "the spill file's first record tried, then the four"
        );
        assert!(store.get(left.id).await.unwrap().is_some());
        assert!(!path.exists() && !claim.exists());
    }

    /// A replay on a store that is still down tries one record and moves nothing (it claimed
    /// the file and copied every line back, gigabytes for a large file, every few seconds of an
    /// outage).
    #[tokio::test]
    async fn a_replay_on_a_store_still_down_moves_nothing() {
        struct Down(AtomicU64);
        #[async_trait::async_trait]
        impl LogStore for Down {
            async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
                self.0.fetch_add(records.len() as u64, Ordering::SeqCst);
                Err(StoreError::Database("connection refused".into()))
            }
            async fn get(&self, _: uuid::Uuid) -> Result<Option<RequestRecord>, StoreError> {
                Ok(None)
            }
            async fn list(&self, _: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError> {
                Ok(Vec::new())
            }
            async fn count(&self) -> Result<u64, StoreError> {
                Ok(0)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let records: Vec<_> = (0..1000)
            .map(|_| RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false))
            .collect();
        spill_batch(&path, &records).unwrap();
        let before = std::fs::metadata(&path).unwrap();
        let store = Down(AtomicU64::new(0));
        let e = replay_spill_running(&store, &path).await.unwrap_err();
        assert!(e.contains("connection refused"), "{e}");
        assert_eq!(store.0.load(Ordering::SeqCst), 1, "one record tried");
        let after = std::fs::metadata(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(after.ino(), before.ino(), "the same file, not a copy");
        }
        assert!(!path.with_extension("jsonl.replaying").exists());
    }

    /// An append that opened the spill file just before a replay claimed it lets the claimed
    /// file go and writes to a fresh spill file (its lines went into a file already read, which
    /// the replay then removed).
    #[test]
    fn an_append_never_lands_in_a_claimed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        append(&path, b"{\"id\":1}\n").unwrap();
        // The appender has the file open and waits for its lock, which the replay's fence
        // holds while it claims the file.
        let held = std::fs::File::open(&path).unwrap();
        held.lock().unwrap();
        let appender = {
            let path = path.clone();
            std::thread::spawn(move || append(&path, b"{\"id\":2}\n"))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let claim = path.with_extension("jsonl.replaying");
        std::fs::hard_link(&path, &claim).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(held);
        appender.join().unwrap().unwrap();
        assert_eq!(std::fs::read(&claim).unwrap(), b"{\"id\":1}\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"id\":2}\n");
    }

    /// A spill file cut mid-line by a crash: the next batch starts on a line of its own, so only
    /// the cut line is lost, not the record after it.
    #[test]
    fn appending_after_a_cut_line_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        append(&path, b"{\"id\":1}\n{\"id\":2, \"cut").unwrap();
        append(&path, b"{\"id\":3}\n").unwrap();
        append(&path, b"{\"id\":4}\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["{\"id\":1}", "{\"id\":2, \"cut", "{\"id\":3}", "{\"id\":4}"]
        );
        // A fresh file gets no leading line end.
        let fresh = dir.path().join("sub/new.jsonl");
        append(&fresh, b"x\n").unwrap();
        assert_eq!(std::fs::read(&fresh).unwrap(), b"x\n");
    }

    /// A body kept as the client sent it, pretty-printed over several lines, is spilled as one
    /// line and comes back whole (it was split into unreadable lines and lost).
    #[tokio::test]
    async fn a_pretty_printed_body_spills_as_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        let body = b"{\r\n  \"model\": \"m\",\n  \"messages\": [\"a\\nb\"]\n}\n";
        r.request_body = sluice_core::record::RawJson::from_bytes(body);
        assert!(r.request_body.as_ref().unwrap().get().contains('\n'));
        spill_batch(&path, std::slice::from_ref(&r)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        let store = Counting::default();
        let got = replay_spill(&store, &path).await.unwrap();
        assert_eq!((got.records, got.bad_lines), (1, 0));
        let back = store.get(r.id).await.unwrap().expect("replayed");
        assert_eq!(
            back.request_body.unwrap().to_value(),
            serde_json::json!({"model": "m", "messages": ["a\nb"]})
        );
    }

    /// Records with large bodies are replayed a few at a time (512 at once could take gigabytes).
    #[tokio::test]
    async fn a_replay_of_large_records_goes_in_small_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let body = sluice_core::record::RawJson::from_text(format!("\"{}\"", "x".repeat(1 << 20)))
            .unwrap();
        let records: Vec<_> = (0..20)
            .map(|_| {
                let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
                r.request_body = Some(body.clone());
                r
            })
            .collect();
        spill_batch(&path, &records).unwrap();
        let store = Counting::default();
        let got = replay_spill(&store, &path).await.unwrap();
        assert_eq!(got.records, 20);
        let largest = store.1.load(Ordering::SeqCst);
        assert!(largest <= 8, "a chunk of {largest} records of 1 MiB");
    }

    /// A cost or latency goes through the spill file unchanged to the last bit.
    #[tokio::test]
    async fn numbers_survive_the_spill_file_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        r.cost_usd = 0.09144338512092887;
        r.latency_ms = 123.456_789_012_345_67;
        spill_batch(&path, std::slice::from_ref(&r)).unwrap();
        let store = Counting::default();
        replay_spill(&store, &path).await.unwrap();
        let back = store.get(r.id).await.unwrap().expect("replayed");
        assert_eq!(back.cost_usd.to_bits(), r.cost_usd.to_bits());
        assert_eq!(back.latency_ms.to_bits(), r.latency_ms.to_bits());
    }
}
