//! A streamed chat response on its way to the client: chunks are forwarded as they arrive, the
//! text is gathered for the record, and the record is completed when the stream ends, fails, or is
//! dropped (client gone: the upstream stream is dropped with it, which cancels the call).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use sluice_core::ProviderError;
use sluice_core::error::Error;
use sluice_core::provider::ChunkStream;
use sluice_core::record::RawJson;
use sluice_types::openai::{ChatCompletionChunk, ChatRequest, ChunkAccumulator, Usage};

use crate::router::DeploymentState;
use crate::{Finisher, tokens};

/// One item for the client.
#[derive(Debug)]
// Nearly every item is a chunk: boxing it would cost an allocation per chunk to shrink the rare
// error.
#[allow(clippy::large_enum_variant)]
pub enum StreamItem {
    Chunk(ChatCompletionChunk),
    /// The stream failed after it started; the client gets an error event, then the end.
    Error(Error),
}

/// The client-facing stream.
pub struct ChatStream {
    inner: Pin<Box<dyn Stream<Item = StreamItem> + Send>>,
    route: String,
    headers: Vec<(&'static str, String)>,
}

/// An upstream stream as the router hands it over: the chunks already read while waiting for
/// the first content, the rest (`None` when it already ended), and the attempt's time limits.
pub struct Upstream {
    pub pending: Vec<ChatCompletionChunk>,
    pub rest: Option<ChunkStream>,
    /// The longest gap between two chunks.
    pub idle: Option<std::time::Duration>,
    /// When the whole stream must have ended.
    pub deadline: Option<std::time::Instant>,
}

impl Upstream {
    async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        if !self.pending.is_empty() {
            return Some(Ok(self.pending.remove(0)));
        }
        let rest = self.rest.as_mut()?;
        let limit = match (self.idle, self.deadline) {
            (None, None) => None,
            (Some(i), None) => Some((std::time::Instant::now() + i, "idle")),
            (None, Some(d)) => Some((d, "total")),
            (Some(i), Some(d)) => {
                let idle_end = std::time::Instant::now() + i;
                Some(if idle_end < d {
                    (idle_end, "idle")
                } else {
                    (d, "total")
                })
            }
        };
        let item = match limit {
            None => rest.next().await,
            Some((at, which)) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(at), rest.next()).await
                {
                    Ok(item) => item,
                    Err(_) => {
                        self.rest = None;
                        return Some(Err(ProviderError::Timeout(
                            match which {
                                "idle" => "the stream stalled longer than the model's timeouts.stream_idle_secs",
                                _ => "the stream ran past the model's timeouts.total_secs",
                            }
                            .to_string(),
                        )));
                    }
                }
            }
        };
        match item {
            None => {
                self.rest = None;
                None
            }
            Some(r) => Some(r),
        }
    }
}

/// The deployment serving a stream. Its breaker and latency hear how the attempt went only when
/// the stream ends: one that breaks after it started is a failure of the deployment.
pub struct Serving {
    pub dep: Arc<DeploymentState>,
    /// How long the stream took to open (to its first content): its latency sample.
    pub opened_in: Duration,
    /// The attempt's half-open probe ticket, if it is its breaker's trial.
    pub probe: Option<crate::breaker::Probe>,
}

impl Serving {
    fn report(&self, failure: Option<&ProviderError>) {
        self.dep.report(
            Instant::now(),
            self.opened_in,
            failure.map(|e| (e.class(), e.retry_after())),
            self.probe,
        );
    }
}

impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatStream")
    }
}

struct State {
    upstream: Upstream,
    fin: Finisher,
    req: ChatRequest,
    serving: Serving,
    client_wants_usage: bool,
    store_body: bool,
    acc: ChunkAccumulator,
    usage: Option<Usage>,
    /// The prompt tokens an Anthropic upstream reported at the start of the stream: the
    /// record's count when the stream fails before its final usage.
    /// The prompt's usage an Anthropic upstream sent before anything else
    /// ([`sluice_types::anthropic::START_USAGE`]).
    start_prompt: Option<Usage>,
    done: bool,
}

/// The tokenizer's counts made by [`State::count`]: the answer's, and the prompt's unless the
/// upstream sent its own at the start.
#[derive(Default)]
struct Counted {
    completion: u64,
    prompt: Option<u64>,
}

impl State {
    /// What the stream produced: the reported usage, else the counts (prompt, completion) —
    /// `counted`, the tokenizer's (see [`State::count`]), or without it four bytes a token —
    /// and the assembled body when bodies are stored. Consumes the gathered text.
    fn outcome(&mut self, counted: Option<Counted>) -> (Option<Usage>, Usage, Option<RawJson>) {
        let usage = self.usage.take();
        let counts = match &usage {
            Some(_) => Usage::default(),
            None => {
                let completion = match &counted {
                    Some(c) => c.completion,
                    None => (self.acc.output_text().len() as u64).div_ceil(4),
                };
                // The upstream's own count of the prompt, cache reads and writes included,
                // when it sent one at the start.
                let mut counts = match (self.start_prompt.take(), counted.and_then(|c| c.prompt)) {
                    (Some(start), _) => start,
                    (None, Some(prompt)) => Usage::new(prompt, 0, 0),
                    (None, None) => Usage::new(tokens::estimate_prompt_by_size(&self.req), 0, 0),
                };
                counts.completion_tokens = completion;
                counts.total_tokens = counts.prompt_tokens.saturating_add(completion);
                counts
            }
        };
        let acc = std::mem::take(&mut self.acc);
        let body = self
            .store_body
            .then(|| RawJson::of(&acc.finish()))
            .flatten();
        (usage, counts, body)
    }

    /// The tokenizer's counts of what the stream produced, for an upstream that reported no
    /// usage: made in place for a short text, on the blocking pool for a long one.
    fn count(&self) -> impl Future<Output = Counted> + Send + 'static {
        let output = self.acc.output_text();
        let long = tokens::counting_is_long(&self.req, output.len());
        let req = self.req.clone();
        let prompt = self.start_prompt.is_none();
        let count = move || Counted {
            completion: tokens::count_text(&req.model, &output),
            prompt: prompt.then(|| tokens::count_prompt_and_media(&req.model, &req)),
        };
        async move {
            if long {
                tokens::off_thread(count).await
            } else {
                count()
            }
        }
    }

    /// Completes the record; returns the tokenizer's usage when the upstream reported none.
    async fn finish(&mut self, error: Option<&Error>) -> Option<Usage> {
        self.done = true;
        let finish_reason = self.acc.finish_reason().map(str::to_string);
        let counted = match self.usage {
            Some(_) => None,
            None => Some(self.count().await),
        };
        let (usage, counts, body) = self.outcome(counted);
        let counted = usage.is_none().then(|| counts.clone());
        self.fin
            .finish_stream(
                usage,
                self.serving.dep.dep.price,
                || counts,
                finish_reason,
                body,
                error,
            )
            .await;
        counted
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The client went away mid-stream: keep what was produced for the cancelled record.
        // The deployment was answering, so for its breaker the attempt succeeded. Chunks read
        // before the client saw any count too. On the record, the attempt was under way when the
        // client left: cancelled.
        self.serving.report(None);
        self.fin.cancel_served_attempt();
        for chunk in std::mem::take(&mut self.upstream.pending) {
            self.acc.push(&chunk);
            if self.start_prompt.is_none() {
                self.start_prompt = sluice_types::anthropic::start_prompt_usage(&chunk);
            }
            if chunk.usage.is_some() {
                self.usage = chunk.usage;
            }
        }
        // Without the upstream's usage (it comes last), the counts are estimated from sizes:
        // no tokenizer runs in `Drop`, on a runtime thread, for a request already gone.
        let (usage, counts, body) = self.outcome(None);
        self.fin
            .note_partial(usage, self.serving.dep.dep.price, || counts, body);
    }
}

async fn step(mut st: State) -> Option<(StreamItem, State)> {
    if st.done {
        return None;
    }
    loop {
        match st.upstream.next().await {
            Some(Ok(mut chunk)) => {
                st.acc.push(&chunk);
                if chunk.usage.is_some() {
                    st.usage.clone_from(&chunk.usage);
                }
                if st.start_prompt.is_none() {
                    st.start_prompt = sluice_types::anthropic::start_prompt_usage(&chunk);
                }
                if !st.client_wants_usage {
                    if chunk.choices.is_empty() && chunk.usage.is_some() {
                        continue;
                    }
                    chunk.usage = None;
                }
                if chunk.has_content() {
                    st.fin.first_token();
                }
                return Some((StreamItem::Chunk(chunk), st));
            }
            Some(Err(e)) => {
                let provider = &st.serving.dep.dep.provider_name;
                tracing::warn!(request_id = %st.fin.id(), provider = %provider, error = %e, "stream failed after it started");
                let err = e.to_error(provider);
                st.serving.report(Some(&e));
                st.fin.fail_served_attempt(e.class(), &err);
                st.finish(Some(&err)).await;
                return Some((StreamItem::Error(err), st));
            }
            None => {
                st.serving.report(None);
                // The stream's id, model and time, for a usage chunk of Sluice's own.
                let last = (st.client_wants_usage && st.usage.is_none())
                    .then(|| st.acc.empty_chunk())
                    .flatten();
                let counted = st.finish(None).await;
                // The client asked for usage and the upstream sent none: it gets Sluice's
                // count, as the record has it, in the usual last chunk.
                if let (Some(usage), Some(mut chunk)) = (counted, last) {
                    chunk.usage = Some(usage);
                    return Some((StreamItem::Chunk(chunk), st));
                }
                return None;
            }
        }
    }
}

impl ChatStream {
    /// Wraps an upstream stream. `req` is the request as sent upstream (for token counting).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        upstream: Upstream,
        fin: Finisher,
        req: ChatRequest,
        serving: Serving,
        client_wants_usage: bool,
        store_body: bool,
        route: String,
    ) -> Self {
        let state = State {
            upstream,
            fin,
            req,
            serving,
            client_wants_usage,
            store_body,
            acc: ChunkAccumulator::default(),
            usage: None,
            start_prompt: None,
            done: false,
        };
        ChatStream {
            inner: Box::pin(futures::stream::unfold(state, step)),
            route,
            headers: Vec::new(),
        }
    }

    /// A stream of chunks already known (an answer from the cache), whose record is closed.
    pub(crate) fn replayed(chunks: Vec<ChatCompletionChunk>, route: String) -> Self {
        ChatStream {
            inner: Box::pin(futures::stream::iter(
                chunks.into_iter().map(StreamItem::Chunk),
            )),
            route,
            headers: Vec::new(),
        }
    }

    /// Adds response headers (`x-ratelimit-*`).
    pub(crate) fn with_headers(mut self, headers: Vec<(&'static str, String)>) -> Self {
        self.headers = headers;
        self
    }

    /// Extra response headers.
    pub fn headers(&self) -> &[(&'static str, String)] {
        &self.headers
    }

    /// The `x-sluice-route` header value.
    pub fn route(&self) -> &str {
        &self.route
    }
}

impl Stream for ChatStream {
    type Item = StreamItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamItem>> {
        self.inner.as_mut().poll_next(cx)
    }
}
