//! Continuous batching for one local chat model.
//!
//! One engine thread owns the model's compute. Requests queue up; before every step the scheduler
//! admits waiting sequences as long as the batch has room (`max_batch`) and the KV caches fit the
//! memory bound (`max_kv_bytes`, reserved up front for the prompt plus `max_tokens`). Each step is
//! one forward pass over the whole batch ([`LlamaModel::forward_into`]): sequences still in their
//! prompt contribute a chunk of it (at most `PREFILL_CHUNK` tokens), the others their last sampled
//! token. The weights are read once for the whole batch, so throughput grows with concurrency
//! instead of requests queueing behind each other. A sequence leaves the batch when it ends
//! (end-of-sequence token, stop string, `max_tokens`) or when its receiver is dropped (the client
//! went away), freeing its cache.
//!
//! The decode loop does not allocate: each sequence's KV cache is reserved for its prompt plus
//! `max_tokens` when it is admitted, the forward pass runs in a [`Workspace`] kept across steps,
//! the step's bookkeeping vectors are cleared and reused, and the samplers reuse their buffers.
//! Only the text streamed to clients (the `String` pieces sent through the channels) is
//! allocated per token.
//!
//! With `batching = false` the same engine runs one sequence at a time (the baseline the benchmark
//! compares against).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::llama::{
    Batch, KvCache, LlamaModel, Sampler, SamplingParams, StreamDetokenizer, Workspace,
};

/// Why the engine refused a request or could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request can never fit: the model's context or the engine's memory bound.
    #[error("{0}")]
    ContextLength(String),
    #[error("{0}")]
    InvalidInput(String),
    /// As many requests wait as the engine queues (`max_waiting`): try again shortly.
    #[error("{0}")]
    Busy(String),
    /// The engine thread is gone or could not start.
    #[error("{0}")]
    Unavailable(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Bound on the KV-cache memory of all active sequences, in bytes.
    pub max_kv_bytes: usize,
    /// Threads for the model's matrix work.
    pub threads: usize,
    /// Admit new sequences into a running batch. Off: one sequence at a time.
    pub batching: bool,
    /// Most requests waiting for a place in the batch; more are refused ([`EngineError::Busy`]).
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            max_kv_bytes: 1 << 30,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            batching: true,
            max_waiting: 256,
        }
    }
}

/// One generation request: prompt tokens and how to sample.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks that need a fixed length).
    pub ignore_eos: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a generation reports, in order: text pieces, then one `Done` (or one `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    Text(String),
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: FinishReason,
        /// The stop string the text ended before, when one did.
        stop_sequence: Option<String>,
    },
    Error(String),
}

struct Job {
    req: GenRequest,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// A running engine. Dropping it (and every clone of its handle) stops the engine thread once
/// the active sequences finish.
#[derive(Clone)]
pub struct Engine {
    model: Arc<LlamaModel>,
    queue: std_mpsc::Sender<Job>,
    bytes_per_token: usize,
    max_kv_bytes: usize,
    /// Requests submitted and not yet in the batch (nor dropped); the scheduler counts them down.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    /// False once the engine thread has ended.
    running: Arc<AtomicBool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info().name)
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread for `model`.
    pub fn start(model: Arc<LlamaModel>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let bytes_per_token = model.new_cache().bytes_per_token().max(1);
        let (tx, rx) = std_mpsc::channel::<Job>();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("sluice-local-{i}"))
            .build()
            .map_err(|e| {
                EngineError::Unavailable(format!("cannot start the model's thread pool: {e}"))
            })?;
        let m = model.clone();
        let max_kv_bytes = cfg.max_kv_bytes;
        let max_waiting = cfg.max_waiting.max(1);
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let (w, r) = (waiting.clone(), running.clone());
        std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || {
                let _running = Running(r);
                pool.install(|| Scheduler::new(m, cfg, bytes_per_token, w).run(rx));
            })
            .map_err(|e| {
                EngineError::Unavailable(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Engine {
            model,
            queue: tx,
            bytes_per_token,
            max_kv_bytes,
            waiting,
            max_waiting,
            running,
        })
    }

    /// Whether the engine thread still runs (it ends only when every handle is dropped, or on a
    /// fault outside a step).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Requests waiting for a place in the batch.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// KV-cache bytes one token of one sequence takes.
    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token
    }

    /// Queues a generation. Fails at once when the request can never fit (context length or
    /// memory bound). Events arrive on the returned receiver; dropping it cancels the generation.
    pub fn submit(
        &self,
        req: GenRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, EngineError> {
        let ctx = self.model.info().context_length;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if req.max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max_tokens must be at least 1".into(),
            ));
        }
        // Checked here so that a bad sequence never reaches a step, where it would fail the batch.
        let vocab = self.model.tokenizer().vocab_size();
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        if req.prompt.len() >= ctx {
            return Err(EngineError::ContextLength(format!(
                "the prompt alone has {} tokens, and the model's context holds {ctx}",
                req.prompt.len()
            )));
        }
        let need = req.prompt.len().saturating_add(req.max_tokens);
        if need > ctx {
            return Err(EngineError::ContextLength(format!(
                "the prompt has {} tokens and max_tokens is {}, together more than the model's context of {ctx} tokens",
                req.prompt.len(),
                req.max_tokens
            )));
        }
        let bytes = need.saturating_mul(self.bytes_per_token);
        if bytes > self.max_kv_bytes {
            return Err(EngineError::ContextLength(format!(
                "the request needs {:.1} MiB of KV cache, more than the engine's bound of {:.1} MiB (max_kv_mb)",
                bytes as f64 / (1 << 20) as f64,
                self.max_kv_bytes as f64 / (1 << 20) as f64
            )));
        }
        if !self.is_running() {
            return Err(EngineError::Unavailable(
                "the local model engine has stopped".into(),
            ));
        }
        let queued = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_waiting).then_some(n + 1)
            });
        if queued.is_err() {
            return Err(EngineError::Busy(format!(
                "the local model has {} requests waiting for a place in its batch (max_waiting); try again shortly",
                self.max_waiting
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if self.queue.send(Job { req, events: tx }).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable(
                "the local model engine has stopped".into(),
            ));
        }
        Ok(rx)
    }
}

/// Clears the engine's running flag when its thread ends, however it ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Most prompt tokens of one sequence run in one step: a long prompt is prefilled in chunks, so
/// the sequences already decoding are not stalled for the whole prompt.
const PREFILL_CHUNK: usize = 256;

struct Seq {
    cache: KvCache,
    sampler: Sampler,
    detok: StreamDetokenizer,
    /// Prompt tokens not yet run through the model.
    pending: Vec<u32>,
    last: u32,
    generated: usize,
    max_tokens: usize,
    prompt_len: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    /// Text decoded so far, and how much of it was sent.
    text: String,
    sent: usize,
    /// The stop string the text was cut at.
    stopped_by: Option<String>,
    reserved: usize,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// The sequences of one step as the model's [`Batch`]: a chunk of prompt for those still
/// prefilling (`chunks[i] > 0`), the last sampled token for the others.
struct StepBatch<'a> {
    seqs: &'a mut [Seq],
    chunks: &'a [usize],
}

impl Batch for StepBatch<'_> {
    fn sequences(&self) -> usize {
        self.seqs.len()
    }

    fn tokens(&self, i: usize) -> &[u32] {
        let s = &self.seqs[i];
        match self.chunks[i] {
            0 => std::slice::from_ref(&s.last),
            n => &s.pending[..n],
        }
    }

    fn cache(&self, i: usize) -> &KvCache {
        &self.seqs[i].cache
    }

    fn cache_mut(&mut self, i: usize) -> &mut KvCache {
        &mut self.seqs[i].cache
    }
}

struct Scheduler {
    model: Arc<LlamaModel>,
    cfg: EngineConfig,
    bytes_per_token: usize,
    waiting: VecDeque<Job>,
    /// Shared with [`Engine::submit`]: jobs in the channel or in `waiting`.
    queued: Arc<AtomicUsize>,
    active: Vec<Seq>,
    reserved: usize,
    /// Reused from step to step: the forward pass's buffers, the prompt tokens each sequence
    /// runs this step, and the sequences that finished.
    ws: Workspace,
    chunks: Vec<usize>,
    finished: Vec<(usize, FinishReason)>,
}

impl Scheduler {
    fn new(
        model: Arc<LlamaModel>,
        cfg: EngineConfig,
        bytes_per_token: usize,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        Scheduler {
            model,
            cfg,
            bytes_per_token,
            waiting: VecDeque::new(),
            queued,
            active: Vec::new(),
            reserved: 0,
            ws: Workspace::new(),
            chunks: Vec::new(),
            finished: Vec::new(),
        }
    }

    fn batch_limit(&self) -> usize {
        if self.cfg.batching {
            self.cfg.max_batch.max(1)
        } else {
            1
        }
    }

    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        loop {
            // Take everything queued; block only when there is nothing to do.
            if self.active.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            if !self.active.is_empty() {
                let stepped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
                if stepped.is_err() {
                    // A bug in one step (in the model code, say): its sequences fail with an
                    // error, and the engine goes on serving the others and the next requests.
                    tracing::error!(
                        sequences = self.active.len(),
                        "the local model engine panicked during a step; its sequences failed"
                    );
                    self.fail_active("the local model failed (an internal error; see the log)");
                }
            }
        }
    }

    /// Ends every active sequence with an error.
    fn fail_active(&mut self, why: &str) {
        for s in self.active.drain(..) {
            let _ = s.events.send(GenEvent::Error(why.to_string()));
        }
        self.finished.clear();
        self.reserved = 0;
    }

    /// Moves waiting requests into the batch while it has room and the memory bound allows. Their
    /// prompts run in the next steps, together with the other sequences' decode tokens.
    fn admit(&mut self) {
        // Requests whose client left are dropped wherever they wait, not only at the front.
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        self.queued
            .fetch_sub(before - self.waiting.len(), Ordering::AcqRel);
        while self.active.len() < self.batch_limit() {
            let Some(job) = self.waiting.front() else {
                return;
            };
            let need = (job.req.prompt.len() + job.req.max_tokens) * self.bytes_per_token;
            if !self.active.is_empty() && self.reserved + need > self.cfg.max_kv_bytes {
                return;
            }
            let Some(Job { req, events }) = self.waiting.pop_front() else {
                return;
            };
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.reserved += need;
            let mut cache = self.model.new_cache();
            // `submit` checked that prompt plus `max_tokens` fits the context.
            if let Err(e) = cache.reserve(req.prompt.len() + req.max_tokens) {
                tracing::warn!(error = %e, "cannot reserve the KV cache; it will grow as needed");
            }
            self.active.push(Seq {
                cache,
                sampler: Sampler::new(req.sampling),
                detok: self.model.tokenizer().stream_detokenizer(),
                prompt_len: req.prompt.len(),
                pending: req.prompt,
                last: 0,
                generated: 0,
                max_tokens: req.max_tokens,
                stop: req.stop,
                ignore_eos: req.ignore_eos,
                text: String::new(),
                sent: 0,
                stopped_by: None,
                reserved: need,
                events,
            });
        }
    }

    /// One forward pass over the batch: a chunk of prompt for sequences still prefilling, the last
    /// sampled token for the others. Sequences whose prompt is done sample their next token.
    fn step(&mut self) {
        #[cfg(test)]
        if tests::PANIC_NEXT_STEP.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("a step panic injected by a test");
        }
        // Drop sequences whose client went away.
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].events.is_closed() {
                let s = self.active.swap_remove(i);
                self.reserved -= s.reserved;
            } else {
                i += 1;
            }
        }
        if self.active.is_empty() {
            return;
        }
        let started = Instant::now();
        // Per sequence: how many prompt tokens this step consumes (0 for decoding ones).
        self.chunks.clear();
        self.chunks.extend(
            self.active
                .iter()
                .map(|s| s.pending.len().min(PREFILL_CHUNK)),
        );
        let result = self.model.forward_into(
            &mut StepBatch {
                seqs: &mut self.active,
                chunks: &self.chunks,
            },
            &mut self.ws,
        );
        tracing::trace!(
            batch = self.active.len(),
            prompt_tokens = self.chunks.iter().sum::<usize>(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.fail_active(&e.to_string());
                return;
            }
        };
        let vocab = logits.len() / self.active.len();
        self.finished.clear();
        for (idx, ((seq, l), &n)) in self
            .active
            .iter_mut()
            .zip(logits.chunks_exact(vocab))
            .zip(&self.chunks)
            .enumerate()
        {
            if n > 0 {
                seq.pending.drain(..n);
                if !seq.pending.is_empty() {
                    continue;
                }
            }
            let tok = seq.sampler.sample(l);
            if let Some(reason) = Self::accept_token(&self.model, seq, tok) {
                self.finished.push((idx, reason));
            }
        }
        while let Some((idx, reason)) = self.finished.pop() {
            let seq = self.active.swap_remove(idx);
            self.finish(seq, reason);
        }
    }

    /// Takes a sampled token: ends on end-of-sequence, a stop string or `max_tokens`; otherwise
    /// sends whatever text is safe to send (a possible stop-string prefix is held back).
    fn accept_token(model: &LlamaModel, seq: &mut Seq, tok: u32) -> Option<FinishReason> {
        if !seq.ignore_eos && model.tokenizer().is_eos(tok) {
            return Some(FinishReason::Stop);
        }
        seq.generated += 1;
        seq.last = tok;
        if let Some(piece) = seq.detok.push(tok) {
            seq.text.push_str(&piece);
        }
        if let Some((cut, which)) = find_stop(&seq.text, &seq.stop, seq.sent) {
            seq.text.truncate(cut);
            seq.stopped_by = Some(std::mem::take(&mut seq.stop[which]));
            seq.stop.clear();
            // Bytes held back for an unfinished character come after the stop: dropped.
            let _ = seq.detok.finish();
            return Some(FinishReason::Stop);
        }
        if seq.generated >= seq.max_tokens {
            return Some(FinishReason::Length);
        }
        let hold = seq
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut safe = seq.text.len().saturating_sub(hold);
        while !seq.text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > seq.sent {
            let _ = seq
                .events
                .send(GenEvent::Text(seq.text[seq.sent..safe].to_string()));
            seq.sent = safe;
        }
        None
    }

    fn finish(&mut self, mut seq: Seq, reason: FinishReason) {
        self.reserved -= seq.reserved;
        if let Some(which) = close_text(&mut seq.text, &mut seq.detok, &seq.stop, seq.sent) {
            seq.stopped_by = Some(seq.stop[which].clone());
        }
        if seq.text.len() > seq.sent {
            let _ = seq
                .events
                .send(GenEvent::Text(seq.text[seq.sent..].to_string()));
        }
        let _ = seq.events.send(GenEvent::Done {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated,
            finish_reason: reason,
            stop_sequence: seq.stopped_by.take(),
        });
    }
}

/// The end of a sequence's text: what the detokenizer still holds (an unfinished character at
/// the end-of-sequence token becomes U+FFFD, as [`decode`](crate::llama::GgufTokenizer::decode)
/// gives it), cut at a stop string that it completes.
/// Returns the index of the stop string it cut at.
fn close_text(
    text: &mut String,
    detok: &mut StreamDetokenizer,
    stop: &[String],
    sent: usize,
) -> Option<usize> {
    text.push_str(&detok.finish());
    let (cut, which) = find_stop(text, stop, sent)?;
    text.truncate(cut);
    Some(which)
}

/// The byte offset of the first stop string in `text`, searching from a little before `from`, and
/// which stop string it is (the earliest; of two at one offset, the first listed).
fn find_stop(text: &str, stops: &[String], from: usize) -> Option<(usize, usize)> {
    let longest = stops.iter().map(String::len).max()?;
    let mut start = from.saturating_sub(longest);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .filter_map(|(k, s)| text[start..].find(s.as_str()).map(|i| (start + i, k)))
        .min()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Makes the engine's next step panic.
    pub(crate) static PANIC_NEXT_STEP: AtomicBool = AtomicBool::new(false);

    fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenRequest {
        GenRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 1,
            },
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    async fn outcome(mut rx: mpsc::UnboundedReceiver<GenEvent>) -> GenEvent {
        loop {
            match rx.recv().await.expect("an event") {
                GenEvent::Text(_) => continue,
                last => return last,
            }
        }
    }

    #[tokio::test]
    async fn a_panicking_step_fails_its_sequences_and_the_engine_goes_on_and_bounds_its_queue() {
        let Some(path) = std::env::var_os("SLUICE_SMOLLM2_GGUF") else {
            eprintln!("SKIP: SLUICE_SMOLLM2_GGUF is not set");
            return;
        };
        let model = Arc::new(LlamaModel::load(std::path::Path::new(&path)).expect("model"));
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                threads: 1,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        let prompt = model.tokenizer().encode("Hello", false).unwrap();
        // Bad requests are refused up front.
        assert!(matches!(
            engine.submit(greedy(prompt.clone(), 0)),
            Err(EngineError::InvalidInput(_))
        ));
        assert!(matches!(
            engine.submit(greedy(prompt.clone(), usize::MAX)),
            Err(EngineError::ContextLength(_))
        ));
        assert!(matches!(
            engine.submit(greedy(vec![1, u32::MAX], 4)),
            Err(EngineError::InvalidInput(m)) if m.contains("vocabulary")
        ));
        PANIC_NEXT_STEP.store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = engine.submit(greedy(prompt.clone(), 4)).unwrap();
        assert!(
            matches!(outcome(failed).await, GenEvent::Error(e) if e.contains("internal error"))
        );
        let next = engine.submit(greedy(prompt.clone(), 4)).unwrap();
        assert!(
            matches!(outcome(next).await, GenEvent::Done { completion_tokens, .. } if completion_tokens >= 1)
        );
        assert!(engine.is_running());

        // (In the same test: another engine stepping meanwhile could take the injected panic.)
        // One sequence at a time and one waiting: a third request is refused as busy.
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                threads: 1,
                batching: false,
                max_waiting: 1,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        let long = GenRequest {
            ignore_eos: true,
            ..greedy(prompt.clone(), 200)
        };
        let mut running = engine.submit(long.clone()).unwrap();
        // Its first token: it is in the batch, no longer waiting.
        assert!(matches!(running.recv().await, Some(GenEvent::Text(_))));
        assert_eq!(engine.waiting(), 0);
        let queued = engine.submit(greedy(prompt.clone(), 4)).unwrap();
        assert_eq!(engine.waiting(), 1);
        let busy = engine.submit(greedy(prompt.clone(), 4)).unwrap_err();
        assert!(
            matches!(&busy, EngineError::Busy(m) if m.contains("max_waiting")),
            "{busy:?}"
        );
        // A waiting request whose client left frees its place.
        drop(queued);
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while engine.waiting() > 0 {
            assert!(Instant::now() < deadline, "the dropped request still waits");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let after = engine.submit(greedy(prompt, 4)).unwrap();
        drop(running);
        assert!(matches!(outcome(after).await, GenEvent::Done { .. }));
        assert_eq!(engine.waiting(), 0);
    }

    #[test]
    fn stop_strings_are_found_across_pieces() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("hello EN", &stops, 0), None);
        assert_eq!(find_stop("hello END more", &stops, 6), Some((6, 0)));
        assert_eq!(find_stop("a\n\nb", &stops, 1), Some((1, 1)));
        assert_eq!(find_stop("x\n\nEND", &stops, 0), Some((1, 1)));
        assert_eq!(find_stop("héllo", &[], 0), None);
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_not_lost() {
        let t = crate::llama::tokenizer::tests::tiny_spm();
        let byte = |b: u8| t.token_to_id(&format!("<0x{b:02X}>")).unwrap();
        // "a" then the first two bytes of 你 (E4 BD A0); the sequence ends there.
        let mut detok = t.stream_detokenizer();
        let mut text = String::new();
        for id in [byte(b'a'), byte(0xE4), byte(0xBD)] {
            if let Some(piece) = detok.push(id) {
                text.push_str(&piece);
            }
        }
        assert_eq!(text, "a");
        assert_eq!(close_text(&mut text, &mut detok, &[], 1), None);
        let ids = [byte(b'a'), byte(0xE4), byte(0xBD)];
        assert_eq!(text, t.decode(&ids).unwrap());
        assert_eq!(text, "a\u{FFFD}");
        // A stop string the flushed text completes still cuts it.
        let mut detok = t.stream_detokenizer();
        let mut text = "x".to_string();
        detok.push(byte(0xE4));
        assert_eq!(
            close_text(&mut text, &mut detok, &["\u{FFFD}".to_string()], 1),
            Some(0)
        );
        assert_eq!(text, "x");
    }
}
