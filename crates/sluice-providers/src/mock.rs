//! `type = "mock"`: a deterministic, in-process provider — a **test double**, not a language
//! model. It answers by echoing the last user message (or a fixed text), with configurable latency,
//! token rate and errors, so tests, demos and benchmarks exercise the whole gateway without an
//! upstream.
//!
//! Errors on demand: a last user message containing `[mock:error=429]` (any 4xx/5xx status) is
//! answered with that upstream status; `fail_status` in the config fails every call.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_types::ids::unix_now;
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, Embedding, EmbeddingRequest,
    EmbeddingResponse, EmbeddingUsage, Extra, ResponseMessage, Role, Usage,
};

/// What the mock answers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MockMode {
    /// The text of the last user message.
    #[default]
    Echo,
    /// The configured `text`.
    Fixed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    #[serde(default)]
    pub mode: MockMode,
    /// The answer in `fixed` mode.
    #[serde(default)]
    pub text: Option<String>,
    /// Milliseconds before the first token.
    #[serde(default)]
    pub latency_ms: u64,
    /// Streaming pace; unset streams as fast as the client reads.
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    /// Fail every call with this upstream HTTP status.
    #[serde(default)]
    pub fail_status: Option<u16>,
    /// Report usage (whitespace words as tokens). Off makes Sluice count with its tokenizer.
    #[serde(default = "yes")]
    pub report_usage: bool,
}

fn yes() -> bool {
    true
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            mode: MockMode::Echo,
            text: None,
            latency_ms: 0,
            tokens_per_second: None,
            fail_status: None,
            report_usage: true,
        }
    }
}

#[derive(Debug)]
pub struct Mock {
    cfg: MockConfig,
    token_gap: Option<Duration>,
}

impl Mock {
    pub fn new(cfg: &MockConfig) -> Result<Self, String> {
        if cfg.mode == MockMode::Fixed && cfg.text.is_none() {
            return Err("text: required when mode = \"fixed\"".into());
        }
        if let Some(s) = cfg.fail_status
            && !(400..=599).contains(&s)
        {
            return Err(format!(
                "fail_status: {s} is not an HTTP error status (400-599)"
            ));
        }
        let token_gap = match cfg.tokens_per_second {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(1.0 / t)),
            Some(t) => return Err(format!("tokens_per_second: must be positive, got {t}")),
        };
        Ok(Mock {
            cfg: cfg.clone(),
            token_gap,
        })
    }

    /// The answer's text, and the stop sequence it was cut at, if any.
    fn answer(&self, req: &ChatRequest) -> Result<(String, Option<String>), ProviderError> {
        let last_user = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.text_content())
            .unwrap_or_default();
        let status = directive_error(&last_user).or(self.cfg.fail_status);
        if let Some(status) = status {
            return Err(ProviderError::Status {
                status,
                message: format!("mock provider failure on demand (HTTP {status})"),
                code: None,
                param: None,
                retry_after: (status == 429).then_some(Duration::from_secs(1)),
            });
        }
        let mut text = match self.cfg.mode {
            MockMode::Echo => last_user,
            MockMode::Fixed => self.cfg.text.clone().unwrap_or_default(),
        };
        let stops = req.stop_sequences();
        let mut matched = None;
        if let Some((pos, stop)) = stops
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, _)| *p)
        {
            text.truncate(pos);
            matched = Some(stop.clone());
        }
        if let Some(max) = req.max_output_tokens() {
            let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
            if words.len() > max as usize {
                text = words[..max as usize].concat();
                matched = None;
            }
        }
        Ok((text, matched))
    }

    /// The choice fields of an answer cut at a stop sequence: `stop_reason`, the sequence, as
    /// vLLM names it (so that an Anthropic client gets `stop_reason: "stop_sequence"`).
    fn stop_extra(matched: Option<&String>, finish: &str) -> Extra {
        let mut extra = Extra::new();
        if let Some(s) = matched.filter(|_| finish == "stop") {
            extra.insert("stop_reason".into(), s.clone().into());
        }
        extra
    }

    fn usage(&self, req: &ChatRequest, text: &str) -> Option<Usage> {
        self.cfg.report_usage.then(|| {
            let prompt: usize = req
                .messages
                .iter()
                .map(|m| m.text_content().split_whitespace().count())
                .sum();
            // Every choice's words, as OpenAI counts `n` choices.
            let n = u64::from(req.n.unwrap_or(1).max(1));
            Usage::new(prompt as u64, text.split_whitespace().count() as u64 * n, 0)
        })
    }

    fn finish_reason(req: &ChatRequest, text: &str) -> &'static str {
        match req.max_output_tokens() {
            Some(max) if text.split_whitespace().count() >= max as usize && max > 0 => "length",
            _ => "stop",
        }
    }
}

/// `[mock:error=503]` in a message asks for that failure.
fn directive_error(text: &str) -> Option<u16> {
    let start = text.find("[mock:error=")? + "[mock:error=".len();
    let rest = &text[start..];
    let end = rest.find(']')?;
    rest[..end]
        .trim()
        .parse()
        .ok()
        .filter(|s| (400..=599).contains(s))
}

fn new_id() -> String {
    format!(
        "chatcmpl-mock-{}",
        sluice_types::ids::new_request_id().simple()
    )
}

#[async_trait]
impl ChatProvider for Mock {
    fn kind(&self) -> &'static str {
        "mock"
    }

    async fn health(&self) -> Result<(), ProviderError> {
        match self.cfg.fail_status {
            Some(status) => Err(ProviderError::Status {
                status,
                message: format!("mock provider failure on demand (HTTP {status})"),
                code: None,
                param: None,
                retry_after: None,
            }),
            None => Ok(()),
        }
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        if self.cfg.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.latency_ms)).await;
        }
        let (text, matched) = self.answer(req)?;
        let n = req.n.unwrap_or(1).max(1);
        let finish = Self::finish_reason(req, &text);
        Ok(ChatCompletion {
            id: new_id(),
            object: "chat.completion".into(),
            created: unix_now(),
            model: req.model.clone(),
            choices: (0..n)
                .map(|i| Choice {
                    index: i,
                    message: ResponseMessage {
                        role: Role::Assistant,
                        content: Some(text.clone()),
                        tool_calls: None,
                        refusal: None,
                        extra: Extra::new(),
                    },
                    finish_reason: Some(finish.into()),
                    logprobs: None,
                    extra: Self::stop_extra(matched.as_ref(), finish),
                })
                .collect(),
            usage: self.usage(req, &text),
            system_fingerprint: None,
            extra: Extra::new(),
        })
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        if self.cfg.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.cfg.latency_ms)).await;
        }
        let (text, matched) = self.answer(req)?;
        let id = new_id();
        let created = unix_now();
        let model = req.model.clone();
        let usage = self.usage(req, &text);
        let finish = Self::finish_reason(req, &text);
        // Each of the `n` choices, piece by piece in turn.
        let n = req.n.unwrap_or(1).max(1);
        let of = |mut chunk: ChatCompletionChunk, i: u32| {
            for c in &mut chunk.choices {
                c.index = i;
            }
            chunk
        };
        let mut chunks: Vec<_> = (0..n)
            .map(|i| of(ChatCompletionChunk::role(&id, &model, created), i))
            .collect();
        for piece in text.split_inclusive(char::is_whitespace) {
            for i in 0..n {
                chunks.push(of(
                    ChatCompletionChunk::text(&id, &model, created, piece.to_string()),
                    i,
                ));
            }
        }
        for i in 0..n {
            let mut last = of(ChatCompletionChunk::finish(&id, &model, created, finish), i);
            for c in &mut last.choices {
                c.extra = Self::stop_extra(matched.as_ref(), finish);
            }
            chunks.push(last);
        }
        if let Some(u) = usage {
            chunks.push(ChatCompletionChunk::usage_only(&id, &model, created, u));
        }
        let gap = self.token_gap;
        let stream = futures::stream::unfold(
            (chunks.into_iter(), true),
            move |(mut it, first)| async move {
                let chunk = it.next()?;
                if let Some(g) = gap
                    && !first
                {
                    tokio::time::sleep(g).await;
                }
                Some((Ok(chunk), (it, false)))
            },
        );
        Ok(Box::pin(stream))
    }

    async fn embed(&self, req: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
        let texts = req.input.texts();
        if texts.len() != req.input.len() {
            return Err(ProviderError::Unsupported(
                "the mock provider embeds text inputs only, not token arrays".into(),
            ));
        }
        let dims = req.dimensions.unwrap_or(16).clamp(1, 4096) as usize;
        let base64 = wants_base64(req)?;
        let mut tokens = 0u64;
        let data = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                tokens += t.split_whitespace().count() as u64;
                Embedding {
                    object: "embedding".into(),
                    index: i as u32,
                    embedding: encode_embedding(hash_embedding(t, dims), base64),
                }
            })
            .collect();
        Ok(EmbeddingResponse {
            object: "list".into(),
            data,
            model: req.model.clone(),
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
            extra: Extra::new(),
        })
    }
}

/// Whether an embeddings request asks for base64 (`encoding_format`), refusing unknown formats.
pub fn wants_base64(req: &EmbeddingRequest) -> Result<bool, ProviderError> {
    match req.encoding_format.as_deref() {
        None | Some("float") => Ok(false),
        Some("base64") => Ok(true),
        Some(other) => Err(ProviderError::Unsupported(format!(
            "encoding_format `{other}` is not one of float, base64"
        ))),
    }
}

/// An embedding as OpenAI returns it: a float array, or with `encoding_format = "base64"` the
/// little-endian f32 bytes in base64.
pub fn encode_embedding(v: Vec<f32>, base64: bool) -> serde_json::Value {
    if base64 {
        use base64::Engine;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        serde_json::Value::from(v)
    }
}

/// A deterministic unit vector from the text's bytes (FNV-1a per dimension) — not semantic.
fn hash_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dims)
        .map(|d| {
            let mut h: u64 = 0xcbf29ce484222325 ^ (d as u64).wrapping_mul(0x9E3779B97F4A7C15);
            for b in text.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100000001b3);
            }
            ((h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use sluice_types::openai::{ChunkAccumulator, Message};

    fn req(text: &str) -> ChatRequest {
        serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": text}]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn echoes_and_streams_the_same_text() {
        let m = Mock::new(&MockConfig::default()).unwrap();
        let r = req("hello there world");
        let whole = m.chat(&r).await.unwrap();
        assert_eq!(
            whole.choices[0].message.content.as_deref(),
            Some("hello there world")
        );
        assert_eq!(whole.usage.as_ref().unwrap().completion_tokens, 3);
        let mut acc = ChunkAccumulator::default();
        let mut s = m.chat_stream(&r).await.unwrap();
        while let Some(c) = s.next().await {
            acc.push(&c.unwrap());
        }
        assert_eq!(acc.output_text(), "hello there world");
        assert_eq!(acc.usage().unwrap().prompt_tokens, 3);
    }

    /// `n` choices, whole and streamed (each with its index), and usage counting every one.
    #[tokio::test]
    async fn n_choices_whole_and_streamed() {
        let m = Mock::new(&MockConfig::default()).unwrap();
        let mut r = req("two words");
        r.n = Some(2);
        let whole = m.chat(&r).await.unwrap();
        assert_eq!(whole.choices.len(), 2);
        assert_eq!(whole.usage.as_ref().unwrap().completion_tokens, 4);
        let mut acc = ChunkAccumulator::default();
        let mut s = m.chat_stream(&r).await.unwrap();
        while let Some(c) = s.next().await {
            acc.push(&c.unwrap());
        }
        let done = acc.finish();
        assert_eq!(done.choices.len(), 2);
        for c in &done.choices {
            assert_eq!(c.message.content.as_deref(), Some("two words"));
            assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        }
        assert_eq!(done.usage.unwrap().completion_tokens, 4);
    }

    #[tokio::test]
    async fn errors_on_demand() {
        let m = Mock::new(&MockConfig::default()).unwrap();
        let err = m
            .chat(&req("please [mock:error=503] now"))
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Status { status: 503, .. }));
        let mut r = req("x");
        r.messages
            .push(Message::text(Role::Assistant, "[mock:error=500]"));
        assert!(
            m.chat(&r).await.is_ok(),
            "only user messages carry directives"
        );
    }

    #[test]
    fn base64_embeddings_decode_to_the_float_vector() {
        use base64::Engine;
        let v = hash_embedding("abc", 4);
        let serde_json::Value::String(b) = encode_embedding(v.clone(), true) else {
            panic!("base64 is a string");
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, v);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = hash_embedding("abc", 16);
        assert_eq!(a, hash_embedding("abc", 16));
        assert_ne!(a, hash_embedding("abd", 16));
        let n: f32 = a.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-5);
    }
}
