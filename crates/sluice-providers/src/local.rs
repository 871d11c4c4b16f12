//! `type = "local"`: models that run inside Sluice on the CPU.
//!
//! `path` names either a GGUF file — a Llama-family chat model, served through the continuous
//! batching engine of `sluice_local::engine` — or a sentence-transformers directory (BERT-family,
//! safetensors + tokenizer.json), served on `/v1/embeddings`. The prompt is rendered with the
//! model's own chat template (from the GGUF metadata) and tokenized with its own tokenizer; usage
//! is the real token count.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_local::embed::SentenceEmbedder;
use sluice_local::engine::{Engine, EngineConfig, EngineError, GenEvent, GenRequest};
use sluice_local::llama::{
    LlamaModel, LoadOptions, LocalError, SamplingParams, TemplateMessage, WeightFormat,
};
use sluice_types::ids::unix_now;
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, Embedding, EmbeddingRequest,
    EmbeddingResponse, EmbeddingUsage, Extra, ResponseMessage, Role, Usage,
};

use crate::mock::{encode_embedding, wants_base64};

/// `[providers.NAME]` with `type = "local"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// A GGUF file (chat) or a sentence-transformers model directory (embeddings).
    pub path: PathBuf,
    /// Threads for the model's matrix work (default: every core).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Chat: most sequences decoded together.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Chat: bound on the KV-cache memory of all running sequences, in MB.
    #[serde(default = "default_max_kv_mb")]
    pub max_kv_mb: usize,
    /// Chat: admit new requests into a running batch (continuous batching). Off runs one
    /// request at a time.
    #[serde(default = "yes")]
    pub batching: bool,
    /// Chat: `max_tokens` when the request sets none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: usize,
    /// Chat: most requests waiting for a place in the batch; more get a 429 (with
    /// `Retry-After: 1`), which the router treats like a rate-limited deployment.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Chat: how the weights are held. `quantized` keeps the file's quantization (least memory);
    /// `f32` expands the matrices at load (4 bytes per weight), which on CPU is faster and makes
    /// batching pay; `q8_0` re-quantizes to 8 bits at load; `auto` (default) picks `f32` when that
    /// takes at most 2 GiB, else `q8_0` when that takes at most 8 GiB, else `quantized`.
    #[serde(default)]
    pub weights: WeightMode,
}

/// How a local chat model holds its weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    #[default]
    Auto,
    Quantized,
    /// Re-quantize to Q8_0 at load (for Q4_1/Q5 files, whose CPU kernels are slow).
    #[serde(rename = "q8_0")]
    Q8_0,
    F32,
}

/// `auto` expands the weights when the f32 copy takes at most this much.
const AUTO_F32_LIMIT: u64 = 2 << 30;
/// Else `auto` re-quantizes them to Q8_0 when that copy takes at most this much: Q8_0 runs on
/// Sluice's own batched kernels, whose decode steps allocate nothing and whose cost per sequence
/// falls as the batch grows; only models larger still keep the file's quantization.
const AUTO_Q8_LIMIT: u64 = 8 << 30;

/// The weight format `weights = "auto"` picks for a model of `parameters` weights.
fn auto_format(parameters: u64) -> WeightFormat {
    // Q8_0 stores 32 one-byte values and a 4-byte scale per block of 32.
    if parameters.saturating_mul(4) <= AUTO_F32_LIMIT {
        WeightFormat::F32
    } else if parameters.saturating_mul(36) / 32 <= AUTO_Q8_LIMIT {
        WeightFormat::Q8_0
    } else {
        WeightFormat::AsStored
    }
}

fn default_max_batch() -> usize {
    16
}
fn default_max_kv_mb() -> usize {
    1024
}
fn yes() -> bool {
    true
}
fn default_max_tokens() -> usize {
    512
}
fn default_max_waiting() -> usize {
    256
}

/// Sampling defaults when a request sets none (the usual defaults of local runtimes).
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_P: f32 = 0.95;
const DEFAULT_TOP_K: usize = 40;

/// Builds the provider for `cfg`: chat for a file, embeddings for a directory.
pub fn build(cfg: &LocalConfig) -> Result<Arc<dyn ChatProvider>, String> {
    let path = &cfg.path;
    if !path.exists() {
        return Err(format!(
            "path: `{}` does not exist (hint: `sluice models pull smollm2-135m minilm-l6` installs the default models into ./models)",
            path.display()
        ));
    }
    if cfg.threads == Some(0) {
        return Err("threads: must be at least 1".into());
    }
    if cfg.max_waiting == 0 {
        return Err("max_waiting: must be at least 1".into());
    }
    if path.is_dir() {
        let embedder = SentenceEmbedder::load(path).map_err(|e| format!("path: {e}"))?;
        return Ok(Arc::new(LocalEmbeddings::new(
            Arc::new(embedder),
            cfg.max_waiting,
        )));
    }
    let weights = match cfg.weights {
        WeightMode::Quantized => WeightFormat::AsStored,
        WeightMode::Q8_0 => WeightFormat::Q8_0,
        WeightMode::F32 => WeightFormat::F32,
        WeightMode::Auto => sluice_local::inspect::gguf_parameters(path)
            .map(auto_format)
            .unwrap_or(WeightFormat::AsStored),
    };
    let model =
        LlamaModel::load_with(path, LoadOptions { weights }).map_err(|e| format!("path: {e}"))?;
    let threads = match cfg.threads {
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if cfg.max_batch == 0 {
        return Err("max_batch: must be at least 1".into());
    }
    let engine = Engine::start(
        Arc::new(model),
        EngineConfig {
            max_batch: cfg.max_batch,
            max_kv_bytes: cfg.max_kv_mb.saturating_mul(1 << 20),
            threads,
            batching: cfg.batching,
            max_waiting: cfg.max_waiting,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(LocalChat {
        engine,
        default_max_tokens: cfg.default_max_tokens.max(1),
    }))
}

/// A local chat model.
#[derive(Debug)]
pub struct LocalChat {
    engine: Engine,
    default_max_tokens: usize,
}

fn unsupported(what: &str) -> ProviderError {
    ProviderError::Unsupported(format!("{what} is not supported by local models"))
}

fn engine_error(e: EngineError) -> ProviderError {
    match e {
        EngineError::ContextLength(m) => ProviderError::Status {
            status: 400,
            message: m,
            code: Some("context_length_exceeded".into()),
            param: None,
            retry_after: None,
        },
        EngineError::InvalidInput(m) => ProviderError::Status {
            status: 400,
            message: m,
            code: None,
            param: None,
            retry_after: None,
        },
        EngineError::Busy(m) => ProviderError::Status {
            status: 429,
            message: m,
            code: Some("engine_busy".into()),
            param: None,
            retry_after: Some(std::time::Duration::from_secs(1)),
        },
        other => ProviderError::Connect(other.to_string()),
    }
}

impl LocalChat {
    /// [`prepare`](Self::prepare) on the blocking pool: rendering the template and tokenizing a
    /// prompt of megabytes takes CPU time that would stall every request sharing the async
    /// worker it ran on.
    async fn prepare_off_runtime(&self, req: &ChatRequest) -> Result<GenRequest, ProviderError> {
        let this = LocalChat {
            engine: self.engine.clone(),
            default_max_tokens: self.default_max_tokens,
        };
        let req = req.clone();
        tokio::task::spawn_blocking(move || this.prepare(&req))
            .await
            .map_err(|e| ProviderError::Connect(format!("preparing the prompt failed: {e}")))?
    }

    /// The prompt tokens and generation settings for a request.
    fn prepare(&self, req: &ChatRequest) -> Result<GenRequest, ProviderError> {
        const MAX_STOPS: usize = 16;
        const MAX_STOP_BYTES: usize = 1024;
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tool calling"));
        }
        if req.n.unwrap_or(1) > 1 {
            return Err(unsupported("n > 1"));
        }
        if let Some(rf) = &req.response_format
            && rf.get("type").and_then(|t| t.as_str()) != Some("text")
        {
            return Err(unsupported("response_format other than text"));
        }
        // What it cannot read or give is refused, not dropped, so that a model group can send
        // the request to a deployment that can (an image went unseen, and the model made up its
        // description).
        if let Some(kind) = req.messages.iter().find_map(non_text_part) {
            return Err(unsupported(&format!(
                "`{kind}` content (it reads text only)"
            )));
        }
        if req
            .extra
            .get("logprobs")
            .is_some_and(|v| v.as_bool() == Some(true))
            || req.extra.get("top_logprobs").is_some_and(|v| !v.is_null())
        {
            return Err(unsupported("logprobs"));
        }
        let stops = req.stop_sequences();
        if stops.len() > MAX_STOPS || stops.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            // Each is searched for after every token, on the thread that decodes for everyone.
            return Err(ProviderError::Invalid(format!(
                "stop: at most {MAX_STOPS} sequences of at most {MAX_STOP_BYTES} bytes each for a local model"
            )));
        }
        let model = self.engine.model();
        let messages: Vec<TemplateMessage> = req
            .messages
            .iter()
            .map(|m| TemplateMessage {
                role: match m.role {
                    Role::Developer => "system".into(),
                    r => r.as_str().into(),
                },
                content: m.text_content(),
            })
            .collect();
        // A last message of the assistant's is the start of its answer (a prefill, as the
        // Anthropic API reads one): the model goes on from it. A template that cannot be cut
        // after it gets a fresh turn.
        let continuing = match req.messages.last() {
            Some(m)
                if m.role == Role::Assistant
                    && m.tool_calls.as_ref().is_none_or(|c| c.is_empty())
                    && !m.text_content().trim().is_empty() =>
            {
                model.chat_prompt_continuing(&messages)
            }
            _ => Ok(None),
        };
        let tokens = continuing
            .and_then(|t| match t {
                Some(tokens) => Ok(tokens),
                None => model.chat_prompt(&messages, true),
            })
            .map_err(|e| match e {
                LocalError::Template(e) => ProviderError::Status {
                    status: 400,
                    message: format!("the model's chat template rejected the messages: {e}"),
                    code: None,
                    param: None,
                    retry_after: None,
                },
                other => ProviderError::Protocol(other.to_string()),
            })?;
        let ctx = model.info().context_length;
        let max_tokens = match req.max_output_tokens() {
            Some(0) => {
                return Err(ProviderError::Status {
                    status: 400,
                    message: "max_tokens must be at least 1".into(),
                    code: None,
                    param: None,
                    retry_after: None,
                });
            }
            Some(n) => n as usize,
            None => self
                .default_max_tokens
                .min(ctx.saturating_sub(tokens.len()).max(1)),
        };
        let temperature = req.temperature.map_or(DEFAULT_TEMPERATURE, |t| t as f32);
        let top_p = req.top_p.map_or(DEFAULT_TOP_P, |p| p as f32);
        // A negative `top_k` (vLLM's and llama.cpp's -1) means no limit, as 0 does here.
        let top_k = req
            .extra
            .get("top_k")
            .and_then(|v| v.as_i64())
            .map_or(DEFAULT_TOP_K, |k| usize::try_from(k).unwrap_or(0));
        let seed = req.seed.map_or_else(random_seed, |s| s as u64);
        Ok(GenRequest {
            prompt: tokens,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
            },
            stop: stops,
            ignore_eos: false,
        })
    }
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (std::process::id() as u64).rotate_left(32)
}

fn completion_id() -> String {
    format!("chatcmpl-{}", sluice_types::ids::new_request_id().simple())
}

/// The type of the first content part of a message that is not text (`image_url`,
/// `input_audio`, `file`), if any. An assistant's `refusal` part is text too.
fn non_text_part(m: &sluice_types::openai::Message) -> Option<String> {
    match &m.content {
        Some(sluice_types::openai::Content::Parts(parts)) => parts
            .iter()
            .find(|p| p.kind != "text" && p.kind != "refusal")
            .map(|p| p.kind.clone()),
        _ => None,
    }
}

#[async_trait]
impl ChatProvider for LocalChat {
    fn kind(&self) -> &'static str {
        "local"
    }

    /// A chat model embeds nothing: the deployment's `path` names a GGUF file.
    async fn embed(
        &self,
        _req: &sluice_types::openai::EmbeddingRequest,
    ) -> Result<sluice_types::openai::EmbeddingResponse, ProviderError> {
        Err(ProviderError::Unsupported(
            "this local model is a chat model (a GGUF file); embeddings need a local provider whose path is a sentence-transformers model directory".into(),
        ))
    }

    /// In-process: healthy while the engine thread runs.
    async fn health(&self) -> Result<(), ProviderError> {
        if self.engine.is_running() {
            Ok(())
        } else {
            Err(ProviderError::Connect(
                "the local model engine has stopped".into(),
            ))
        }
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let gen_req = self.prepare_off_runtime(req).await?;
        let mut rx = self.engine.submit(gen_req).map_err(engine_error)?;
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Error(e) => return Err(ProviderError::Connect(e)),
                GenEvent::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                    stop_sequence,
                } => {
                    return Ok(ChatCompletion {
                        id: completion_id(),
                        object: "chat.completion".into(),
                        created: unix_now(),
                        model: req.model.clone(),
                        choices: vec![Choice {
                            index: 0,
                            message: ResponseMessage {
                                role: Role::Assistant,
                                content: Some(text),
                                tool_calls: None,
                                refusal: None,
                                extra: Extra::new(),
                            },
                            finish_reason: Some(finish_reason.as_openai().into()),
                            logprobs: None,
                            extra: stop_reason_extra(stop_sequence),
                        }],
                        usage: Some(Usage::new(
                            prompt_tokens as u64,
                            completion_tokens as u64,
                            0,
                        )),
                        system_fingerprint: None,
                        extra: Extra::new(),
                    });
                }
            }
        }
        Err(ProviderError::Connect(
            "the local model engine stopped mid-generation".into(),
        ))
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let gen_req = self.prepare_off_runtime(req).await?;
        let rx = self.engine.submit(gen_req).map_err(engine_error)?;
        let id = completion_id();
        let model = req.model.clone();
        let created = unix_now();
        let first = ChatCompletionChunk::role(&id, &model, created);
        let chunks = gen_events(rx).flat_map(move |ev| {
            let items: Vec<Result<ChatCompletionChunk, ProviderError>> = match ev {
                GenEvent::Text(t) => vec![Ok(ChatCompletionChunk::text(&id, &model, created, t))],
                GenEvent::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                    stop_sequence,
                } => vec![
                    Ok({
                        let mut c = ChatCompletionChunk::finish(
                            &id,
                            &model,
                            created,
                            finish_reason.as_openai(),
                        );
                        if let Some(choice) = c.choices.first_mut() {
                            choice.extra = stop_reason_extra(stop_sequence);
                        }
                        c
                    }),
                    Ok(ChatCompletionChunk::usage_only(
                        &id,
                        &model,
                        created,
                        Usage::new(prompt_tokens as u64, completion_tokens as u64, 0),
                    )),
                ],
                GenEvent::Error(e) => vec![Err(ProviderError::Connect(e))],
            };
            futures::stream::iter(items)
        });
        Ok(Box::pin(futures::stream::iter([Ok(first)]).chain(chunks)))
    }
}

/// The stop string a generation ended before, as `stop_reason` on its choice (the field vLLM uses;
/// `/v1/messages` clients get it as `stop_sequence`).
fn stop_reason_extra(stop_sequence: Option<String>) -> Extra {
    let mut extra = Extra::new();
    if let Some(s) = stop_sequence {
        extra.insert("stop_reason".into(), serde_json::Value::String(s));
    }
    extra
}

/// The engine's events for one request, ending after `Done` or `Error`. If the engine goes away
/// before either (its thread died), the stream ends with an error rather than quietly, as if the
/// answer were complete.
fn gen_events(
    rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
) -> impl futures::Stream<Item = GenEvent> {
    futures::stream::unfold((rx, false), |(mut rx, over)| async move {
        if over {
            return None;
        }
        match rx.recv().await {
            Some(ev) => {
                let last = matches!(ev, GenEvent::Done { .. } | GenEvent::Error(_));
                Some((ev, (rx, last)))
            }
            None => Some((
                GenEvent::Error("the local model engine stopped mid-generation".into()),
                (rx, true),
            )),
        }
    })
}

/// A local sentence-embedding model, one request at a time (see [`Turns`]).
#[derive(Debug)]
pub struct LocalEmbeddings {
    embedder: Arc<SentenceEmbedder>,
    turns: Turns,
}

impl LocalEmbeddings {
    pub fn new(embedder: Arc<SentenceEmbedder>, max_waiting: usize) -> Self {
        LocalEmbeddings {
            embedder,
            turns: Turns::new(max_waiting),
        }
    }
}

/// Work that runs one at a time (the encoder's matrix work already uses every core), with at
/// most `max_waiting` waiting for their turn: one more is answered 429, so that a burst cannot
/// pile up work and memory.
#[derive(Debug)]
struct Turns {
    one: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

impl Turns {
    fn new(max_waiting: usize) -> Self {
        Turns {
            one: Arc::new(tokio::sync::Semaphore::new(1)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Waits for a turn, or refuses when `max_waiting` already wait. The turn lasts as long as
    /// the permit.
    async fn take(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ProviderError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        if let Ok(p) = self.one.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(engine_error(EngineError::Busy(format!(
                "{} embedding requests are waiting for this local model (max_waiting); retry shortly",
                self.max_waiting
            ))));
        }
        /// Counts the request out of the waiting ones however the wait ends.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.waiting);
        self.one
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ProviderError::Connect("the local embedding model was stopped".into()))
    }
}

#[async_trait]
impl ChatProvider for LocalEmbeddings {
    fn kind(&self) -> &'static str {
        "local"
    }

    /// In-process: healthy while the process runs.
    async fn health(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn chat(&self, _req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        Err(ProviderError::Unsupported(
            "this local model is an embedding model; use /v1/embeddings".into(),
        ))
    }

    async fn chat_stream(&self, _req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        Err(ProviderError::Unsupported(
            "this local model is an embedding model; use /v1/embeddings".into(),
        ))
    }

    async fn embed(&self, req: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
        let texts: Vec<String> = req.input.texts().into_iter().map(str::to_string).collect();
        if texts.len() != req.input.len() {
            return Err(unsupported("token-array embedding input"));
        }
        let base64 = wants_base64(req)?;
        let dims = self.embedder.info().dimensions;
        if let Some(d) = req.dimensions
            && d as usize != dims
        {
            return Err(ProviderError::Unsupported(format!(
                "this model returns {dims} dimensions; `dimensions` = {d} is not supported"
            )));
        }
        let embedder = self.embedder.clone();
        let turn = self.turns.take().await?;
        let (vectors, counts) = tokio::task::spawn_blocking(move || {
            // Held until the work ends, even if the client has gone: the next waits for it.
            let _turn = turn;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            embedder.embed(&refs)
        })
        .await
        .map_err(|e| ProviderError::Connect(format!("embedding task failed: {e}")))?
        .map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let tokens: u64 = counts.iter().map(|&c| c as u64).sum();
        Ok(EmbeddingResponse {
            object: "list".into(),
            data: vectors
                .into_iter()
                .enumerate()
                .map(|(i, v)| Embedding {
                    object: "embedding".into(),
                    index: i as u32,
                    embedding: encode_embedding(v, base64),
                })
                .collect(),
            model: req.model.clone(),
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
            extra: Extra::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_parts_that_are_not_text_are_refused() {
        let message = |content: serde_json::Value| -> sluice_types::openai::Message {
            serde_json::from_value(serde_json::json!({"role": "assistant", "content": content}))
                .unwrap()
        };
        let text = message(serde_json::json!([{"type": "text", "text": "a"},
            {"type": "refusal", "refusal": "no"}]));
        assert_eq!(non_text_part(&text), None);
        let image = message(serde_json::json!([{"type": "text", "text": "a"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]));
        assert_eq!(non_text_part(&image).as_deref(), Some("image_url"));
        assert_eq!(non_text_part(&message(serde_json::json!("plain"))), None);
    }

    /// One at a time, `max_waiting` waiting, the next refused with a 429 to retry; a waiter that
    /// gives up frees its place.
    #[tokio::test]
    async fn embedding_turns_are_bounded() {
        let turns = Arc::new(Turns::new(2));
        let running = turns.take().await.expect("the first runs at once");
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let t = turns.clone();
                tokio::spawn(async move { t.take().await.map(drop) })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        match turns.take().await {
            Err(ProviderError::Status {
                status: 429,
                retry_after: Some(_),
                ..
            }) => {}
            other => panic!("a fourth is refused: {other:?}"),
        }
        waiters[0].abort();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let again = {
            let t = turns.clone();
            tokio::spawn(async move { t.take().await.map(drop) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(running);
        again.await.unwrap().expect("the place given up was taken");
        for w in waiters.into_iter().skip(1) {
            w.await.unwrap().expect("waited its turn");
        }
    }

    #[tokio::test]
    async fn a_generation_the_engine_drops_ends_with_an_error() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(GenEvent::Text("par".into())).unwrap();
        drop(tx);
        let events: Vec<GenEvent> = gen_events(rx).collect().await;
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(&events[0], GenEvent::Text(t) if t == "par"));
        assert!(matches!(&events[1], GenEvent::Error(e) if e.contains("stopped")));
        // A finished one ends at its `Done`.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(GenEvent::Done {
            prompt_tokens: 3,
            completion_tokens: 1,
            finish_reason: sluice_local::engine::FinishReason::Stop,
            stop_sequence: None,
        })
        .unwrap();
        drop(tx);
        let events: Vec<GenEvent> = gen_events(rx).collect().await;
        assert_eq!(events.len(), 1, "{events:?}");
    }

    #[test]
    fn a_busy_engine_is_a_rate_limited_deployment() {
        let e = engine_error(EngineError::Busy("full".into()));
        assert_eq!(e.class(), sluice_core::error::ErrorClass::RateLimited);
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(1)));
        let e = engine_error(EngineError::Unavailable("gone".into()));
        assert_eq!(e.class(), sluice_core::error::ErrorClass::ServerError);
    }

    #[test]
    fn auto_weights_by_model_size() {
        // SmolLM2-135M: 0.5 GB as f32.
        assert_eq!(auto_format(134_515_008), WeightFormat::F32);
        // Exactly 2 GiB as f32 still expands; one weight more does not.
        assert_eq!(auto_format(512 << 20), WeightFormat::F32);
        assert_eq!(auto_format((512 << 20) + 1), WeightFormat::Q8_0);
        // A 1B and a 7B model: 1.4 GB and 7.9 GB as Q8_0.
        assert_eq!(auto_format(1_235_814_400), WeightFormat::Q8_0);
        assert_eq!(auto_format(7_000_000_000), WeightFormat::Q8_0);
        // An 8B model would take 9 GB as Q8_0: it keeps the file's quantization.
        assert_eq!(auto_format(8_030_261_248), WeightFormat::AsStored);
    }
}
