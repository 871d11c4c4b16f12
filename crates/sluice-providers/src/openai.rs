//! OpenAI and every OpenAI-compatible server (vLLM, Ollama, TGI, Groq, Together, Mistral, …), and
//! Azure OpenAI, which speaks the same bodies at per-deployment URLs.
//!
//! Requests are forwarded as they came, with only `model` replaced: tools, `response_format`,
//! `logprobs`, `n`, `seed` and unknown fields reach the upstream untouched.

use std::collections::BTreeMap;

use ::http::{HeaderMap, HeaderName, Uri, header};
use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_core::secret::{Secret, SecretRef};
use sluice_types::anthropic::{
    ANTHROPIC_FIELDS, BLOCK_ORDER, CACHE_CONTROL, THINKING_BLOCKS, TOOL_IS_ERROR,
};
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Content, EmbeddingRequest, EmbeddingResponse,
    Role, StreamOptions, ToolCallPlacer,
};

use crate::http::{self, HttpSettings, Timeouts};

/// `type = "openai"`: OpenAI or any OpenAI-compatible base URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root, up to and including `/v1` (default `https://api.openai.com/v1`).
    #[serde(default = "default_openai_base")]
    pub base_url: String,
    /// `env::NAME` reference to the key; local servers often need none.
    #[serde(default)]
    pub api_key: Option<SecretRef>,
    /// Extra headers sent with every request (for example `OpenAI-Organization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Ask streams for a final usage chunk even when the client did not, so usage is exact.
    /// Off for servers that reject `stream_options`; by default on, but for Mistral's API.
    #[serde(default)]
    pub stream_usage: Option<bool>,
    /// Send prompt-caching breakpoints (`cache_control` on content parts, tools and messages,
    /// from an Anthropic client or an OpenAI one) to this server: for gateways that read them
    /// (OpenRouter, LiteLLM). Off by default: most servers have no use for them, and strict ones
    /// refuse the field.
    #[serde(default)]
    pub forward_cache_control: bool,
    /// Timeouts (`[providers.NAME.timeouts]`).
    #[serde(default)]
    pub timeouts: HttpSettings,
}

/// `type = "azure"`: Azure OpenAI. A deployment's `model` is the Azure deployment name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// The resource endpoint, e.g. `https://my-resource.openai.azure.com`.
    pub base_url: String,
    /// The `api-version` query parameter.
    #[serde(default = "default_azure_version")]
    pub api_version: String,
    pub api_key: SecretRef,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Whether streams ask for the usage chunk (`stream_options`); by default, from api-version
    /// 2024-09-01 on (older versions refuse the field).
    #[serde(default)]
    pub stream_usage: Option<bool>,
    /// Timeouts (`[providers.NAME.timeouts]`).
    #[serde(default)]
    pub timeouts: HttpSettings,
}

fn default_openai_base() -> String {
    "https://api.openai.com/v1".into()
}
fn default_azure_version() -> String {
    "2024-10-21".into()
}
#[derive(Debug)]
enum Urls {
    /// `{base}/chat/completions`, parsed once.
    Root(Box<RootUrls>),
    /// `{base}/openai/deployments/{deployment}/chat/completions?api-version=V`
    Azure { base: String, api_version: String },
}

#[derive(Debug)]
struct RootUrls {
    chat: Uri,
    embeddings: Uri,
    models: Uri,
}

fn parse_url(u: String) -> Result<Uri, String> {
    http::parse_uri(&u).map_err(|e| format!("base_url: {e}"))
}

/// The OpenAI-compatible provider.
#[derive(Debug)]
pub struct OpenAi {
    kind: &'static str,
    client: http::Client,
    urls: Urls,
    /// The configured extra headers and the key's header (`authorization` or `api-key`, marked
    /// sensitive), sent with every request.
    headers: HeaderMap,
    stream_usage: bool,
    timeouts: Timeouts,
    /// OpenAI's own API or Azure OpenAI, which refuse some fields other servers take.
    official: Option<CapField>,
    /// Whether `cache_control` breakpoints go to this server.
    forward_cache_control: bool,
    /// Google's OpenAI-compatible API, the one server that reads a tool call's
    /// `extra_content` (Gemini's thought signature).
    google: bool,
}

fn resolve(key: &Option<SecretRef>) -> Result<Option<Secret>, String> {
    key.as_ref()
        .map(|k| k.resolve().map_err(|e| format!("api_key: {e}")))
        .transpose()
}

impl OpenAi {
    /// The body of a streamed request: asking for the usage chunk where the server takes
    /// `stream_options`, and without any `stream_options` (a client's own, or those a
    /// `/v1/messages` request carries) where it does not: Sluice counts the tokens then.
    fn stream_body(&self, req: &ChatRequest) -> ChatRequest {
        let mut body = match self.adjusted(req) {
            Some(b) => b,
            None => req.clone(),
        };
        body.stream = Some(true);
        if !self.stream_usage {
            body.stream_options = None;
        } else if !body.wants_stream_usage() {
            body.stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
        }
        body
    }

    pub fn new(cfg: &OpenAiConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        let mut headers = crate::header_map(&cfg.headers)?;
        if let Some(k) = resolve(&cfg.api_key)? {
            headers.insert(
                header::AUTHORIZATION,
                crate::secret_header(&format!("Bearer {}", k.expose()))?,
            );
        }
        Ok(OpenAi {
            kind: "openai",
            client: http::Client::new(&timeouts)?,
            urls: Urls::Root(Box::new(RootUrls {
                chat: parse_url(format!("{base}/chat/completions"))?,
                embeddings: parse_url(format!("{base}/embeddings"))?,
                models: parse_url(format!("{base}/models"))?,
            })),
            headers,
            stream_usage: cfg.stream_usage.unwrap_or(!is_mistral_host(base)),
            timeouts,
            official: is_openai_host(base).then_some(CapField::MaxCompletionTokens),
            forward_cache_control: cfg.forward_cache_control,
            google: http::parse_uri(base)
                .is_ok_and(|u| u.host() == Some("generativelanguage.googleapis.com")),
        })
    }

    pub fn azure(cfg: &AzureConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        parse_url(base.to_string())?;
        let key = cfg.api_key.resolve().map_err(|e| format!("api_key: {e}"))?;
        let mut headers = crate::header_map(&cfg.headers)?;
        headers.insert(
            HeaderName::from_static("api-key"),
            crate::secret_header(key.expose())?,
        );
        // `max_completion_tokens` and `stream_options` came with api-version 2024-09-01-preview;
        // older versions refuse them (ISO dates compare as text).
        let recent = cfg.api_version.as_str() >= "2024-09-01";
        Ok(OpenAi {
            kind: "azure",
            client: http::Client::new(&timeouts)?,
            urls: Urls::Azure {
                base: base.to_string(),
                api_version: http::path_segment(&cfg.api_version).into_owned(),
            },
            headers,
            stream_usage: cfg.stream_usage.unwrap_or(recent),
            timeouts,
            official: Some(if recent {
                CapField::MaxCompletionTokens
            } else {
                CapField::MaxTokens
            }),
            forward_cache_control: false,
            google: false,
        })
    }

    fn url(&self, model: &str, op: &str) -> Result<Uri, ProviderError> {
        match &self.urls {
            Urls::Root(u) => Ok(match op {
                "embeddings" => u.embeddings.clone(),
                "models" => u.models.clone(),
                _ => u.chat.clone(),
            }),
            Urls::Azure { base, api_version } => {
                let path = if op == "embeddings" {
                    "embeddings"
                } else {
                    "chat/completions"
                };
                let u = format!(
                    "{base}/openai/deployments/{}/{path}?api-version={api_version}",
                    http::path_segment(model)
                );
                http::parse_uri(&u).map_err(|e| {
                    ProviderError::Unsupported(format!(
                        "the deployment name `{model}` does not make a valid Azure URL: {e}"
                    ))
                })
            }
        }
    }
}

#[async_trait]
impl ChatProvider for OpenAi {
    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn health(&self) -> Result<(), ProviderError> {
        if matches!(self.urls, Urls::Azure { .. }) {
            return Err(ProviderError::Unsupported(
                "Azure OpenAI has no deployment-independent model list to check".into(),
            ));
        }
        let url = self.url("", "models")?;
        self.client
            .send(http::get(&url, &self.headers), self.timeouts.request)
            .await
            .map(|_| ())
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let url = self.url(&req.model, "chat")?;
        let adjusted = self.adjusted(req);
        let request = http::post_json(&url, &self.headers, adjusted.as_ref().unwrap_or(req))?;
        let mut completion: ChatCompletion =
            self.client.json(request, self.timeouts.request).await?;
        // An answer that carries an error (OpenRouter's, during generation) is that error.
        if let Some(e) = completion.extra.get("error").filter(|e| !e.is_null()) {
            let body = serde_json::to_vec(&serde_json::json!({ "error": e })).unwrap_or_default();
            return Err(http::stream_error(&body));
        }
        for c in &mut completion.choices {
            openai_finish_reason(&mut c.finish_reason);
        }
        Ok(completion)
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = self.stream_body(req);
        let url = self.url(&req.model, "chat")?;
        let mut request = http::post_json(&url, &self.headers, &body)?;
        http::accept_event_stream(&mut request);
        let resp = self.client.send(request, self.timeouts.request).await?;
        let events = http::sse_events(resp, self.timeouts.request, self.timeouts.stream_idle);
        Ok(Box::pin(openai_chunks(events)))
    }

    async fn embed(&self, req: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
        let url = self.url(&req.model, "embeddings")?;
        let request = http::post_json(&url, &self.headers, req)?;
        self.client.json(request, self.timeouts.request).await
    }
}

impl OpenAi {
    /// The request as this upstream takes it, when it needs changing: [`for_official`] on
    /// OpenAI's own API; and, on any, without what only Anthropic reads: the thinking blocks an
    /// assistant message may carry from `/v1/messages` (signed data), a tool message's
    /// `is_error`, and a Messages request's own
    /// top-level fields ([`ANTHROPIC_FIELDS`]); and caching breakpoints (`cache_control`) unless
    /// the provider forwards them.
    fn adjusted(&self, req: &ChatRequest) -> Option<ChatRequest> {
        let mut out = self.official.and_then(|cap| for_official(req, cap));
        if req.messages.iter().any(|m| {
            [THINKING_BLOCKS, BLOCK_ORDER, TOOL_IS_ERROR]
                .iter()
                .any(|k| m.extra.contains_key(*k))
        }) {
            let o = out.get_or_insert_with(|| req.clone());
            for m in &mut o.messages {
                m.extra.remove(THINKING_BLOCKS);
                m.extra.remove(BLOCK_ORDER);
                m.extra.remove(TOOL_IS_ERROR);
            }
        }
        if req.extra.contains_key(ANTHROPIC_FIELDS) {
            out.get_or_insert_with(|| req.clone())
                .extra
                .remove(ANTHROPIC_FIELDS);
        }
        // A Messages tool's own fields (`strict`, `input_examples`, …) are Anthropic's.
        if req
            .tools
            .iter()
            .flatten()
            .any(|t| t.extra.contains_key(ANTHROPIC_FIELDS))
        {
            let o = out.get_or_insert_with(|| req.clone());
            for t in o.tools.iter_mut().flatten() {
                t.extra.remove(ANTHROPIC_FIELDS);
            }
        }
        // OpenAI's own API refuses them whatever the setting says.
        if (!self.forward_cache_control || self.official.is_some()) && has_cache_control(req) {
            strip_cache_control(out.get_or_insert_with(|| req.clone()));
        }
        // A Gemini thought signature on a tool call is Google's: other servers are not given
        // it (some refuse fields they do not know).
        if !self.google
            && req.messages.iter().any(|m| {
                m.tool_calls
                    .iter()
                    .flatten()
                    .any(|c| c.extra.contains_key(GOOGLE_EXTRA))
            })
        {
            let o = out.get_or_insert_with(|| req.clone());
            for c in o
                .messages
                .iter_mut()
                .flat_map(|m| m.tool_calls.iter_mut().flatten())
            {
                c.extra.remove(GOOGLE_EXTRA);
            }
        }
        // OpenAI refuses a `user` over 64 characters (OpenRouter over 128); a `/v1/messages`
        // client's `metadata.user_id` (Claude Code's run past 150) goes as its first 64. The
        // record keeps the whole id.
        if let Some(user) = &req.user
            && let Some((end, _)) = user.char_indices().nth(USER_MAX_CHARS)
        {
            out.get_or_insert_with(|| req.clone()).user = Some(user[..end].to_string());
        }
        out
    }
}

/// Where Gemini's OpenAI-compatible shape keeps a tool call's thought signature.
const GOOGLE_EXTRA: &str = "extra_content";

/// The most characters OpenAI takes in a request's `user`.
const USER_MAX_CHARS: usize = 64;

/// Whether a request carries a caching breakpoint anywhere OpenAI's shape lets one ride.
fn has_cache_control(req: &ChatRequest) -> bool {
    req.extra.contains_key(CACHE_CONTROL)
        || req
            .tools
            .iter()
            .flatten()
            .any(|t| t.extra.contains_key(CACHE_CONTROL))
        || req.messages.iter().any(|m| {
            m.extra.contains_key(CACHE_CONTROL)
                || matches!(&m.content, Some(Content::Parts(parts))
                    if parts.iter().any(|p| p.extra.contains_key(CACHE_CONTROL)))
                || m.tool_calls
                    .iter()
                    .flatten()
                    .any(|tc| tc.extra.contains_key(CACHE_CONTROL))
        })
}

/// Removes every caching breakpoint. Text that became a list of parts only to carry one (a
/// system prompt or an assistant turn from an Anthropic client, a lone text part) is one string
/// again, as servers that take only strings there want.
fn strip_cache_control(req: &mut ChatRequest) {
    req.extra.remove(CACHE_CONTROL);
    for t in req.tools.iter_mut().flatten() {
        t.extra.remove(CACHE_CONTROL);
    }
    for m in &mut req.messages {
        m.extra.remove(CACHE_CONTROL);
        for tc in m.tool_calls.iter_mut().flatten() {
            tc.extra.remove(CACHE_CONTROL);
        }
        let Some(Content::Parts(parts)) = &mut m.content else {
            continue;
        };
        let mut marked = false;
        for p in parts.iter_mut() {
            marked |= p.extra.remove(CACHE_CONTROL).is_some();
        }
        let plain_text = parts
            .iter()
            .all(|p| p.kind == "text" && p.text.is_some() && p.extra.is_empty());
        let joined_by = match m.role {
            Role::Assistant => Some(""),
            Role::System | Role::Developer => Some("\n"),
            _ if parts.len() == 1 => Some(""),
            _ => None,
        };
        if let (true, true, Some(sep)) = (marked, plain_text, joined_by) {
            let text: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
            m.content = Some(Content::Text(text.join(sep)));
        }
    }
}

/// Whether a base URL is OpenAI's own API (or one of its data-residency hosts,
/// `eu.api.openai.com`).
fn is_openai_host(base: &str) -> bool {
    http::parse_uri(base).is_ok_and(|u| {
        u.host()
            .is_some_and(|h| h == "api.openai.com" || h.ends_with(".api.openai.com"))
    })
}

/// Whether a base URL is Mistral's own API, which refuses `stream_options` (its last chunk
/// carries the usage anyway).
fn is_mistral_host(base: &str) -> bool {
    http::parse_uri(base).is_ok_and(|u| u.host() == Some("api.mistral.ai"))
}

/// The field in which OpenAI's own API (or an Azure OpenAI API version) takes the output-token
/// cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapField {
    /// `max_completion_tokens`: every chat model reads it, and reasoning models (o-series,
    /// GPT-5) refuse `max_tokens`. OpenAI, and Azure from api-version 2024-09-01.
    MaxCompletionTokens,
    /// `max_tokens`: older Azure API versions refuse `max_completion_tokens`.
    MaxTokens,
}

/// The request as OpenAI's own API (and Azure OpenAI) takes it, when it needs changing: the
/// output-token cap in the field the API version reads (`cap`); and they refuse `top_k` and
/// `thinking` (which an Anthropic client, or a request that fell back from a Claude deployment,
/// may carry), which are left out. `metadata` (which Sluice reads for attribution) is refused
/// unless `store` is on, and then takes string values only: it goes only with `store`, without
/// the values that are not strings.
fn for_official(req: &ChatRequest, cap: CapField) -> Option<ChatRequest> {
    let stored = req.extra.get("store").and_then(|v| v.as_bool()) == Some(true);
    let metadata_refused = req
        .metadata
        .as_ref()
        .is_some_and(|m| !stored || m.values().any(|v| !v.is_string()));
    let cap_moves = match cap {
        CapField::MaxCompletionTokens => req.max_tokens.is_some(),
        CapField::MaxTokens => req.max_completion_tokens.is_some(),
    };
    if !cap_moves
        && !req.extra.contains_key("top_k")
        && !req.extra.contains_key("thinking")
        && !metadata_refused
    {
        return None;
    }
    let mut out = req.clone();
    match cap {
        CapField::MaxCompletionTokens => {
            let max = out.max_tokens.take();
            out.max_completion_tokens = out.max_completion_tokens.or(max);
        }
        CapField::MaxTokens => {
            let max = out.max_completion_tokens.take();
            out.max_tokens = out.max_tokens.or(max);
        }
    }
    out.extra.remove("top_k");
    out.extra.remove("thinking");
    if stored {
        if let Some(m) = out.metadata.as_mut() {
            m.retain(|_, v| v.is_string());
        }
    } else {
        out.metadata = None;
    }
    Some(out)
}

/// Parses an OpenAI SSE stream into chunks. `[DONE]` ends it; an `{"error": …}` event becomes an
/// error; a stream that ends without `[DONE]` and without a finish reason is reported as cut.
fn openai_chunks(
    events: impl futures::Stream<Item = Result<http::Event, ProviderError>> + Send + 'static,
) -> impl futures::Stream<Item = Result<ChatCompletionChunk, ProviderError>> + Send + 'static {
    struct State<S> {
        events: std::pin::Pin<Box<S>>,
        /// Choices that finished, and those seen that have not: a stream that ends without
        /// `[DONE]` is whole only if every choice it started finished.
        finished: std::collections::BTreeSet<u32>,
        unfinished: std::collections::BTreeSet<u32>,
        placer: ToolCallPlacer,
        done: bool,
    }
    let state = State {
        events: Box::pin(events),
        finished: Default::default(),
        unfinished: Default::default(),
        placer: ToolCallPlacer::default(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.events.next().await {
                None => {
                    st.done = true;
                    if !st.finished.is_empty() && st.unfinished.is_empty() {
                        return None;
                    }
                    return Some((
                        Err(ProviderError::Protocol(
                            "stream ended before the response was complete".into(),
                        )),
                        st,
                    ));
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Some(Ok(ev)) => {
                    let data = ev.data.trim();
                    if data.is_empty() {
                        continue;
                    }
                    if data == "[DONE]" {
                        if st.finished.is_empty() && st.unfinished.is_empty() {
                            // Not one chunk: no answer at all.
                            st.done = true;
                            return Some((
                                Err(ProviderError::Protocol(
                                    "stream ended ([DONE]) without any chunk".into(),
                                )),
                                st,
                            ));
                        }
                        return None;
                    }
                    // An error as its own event (llama.cpp's server sends an `error:` field,
                    // which the decoder makes an `error` event).
                    if ev.event == "error" {
                        st.done = true;
                        return Some((Err(http::stream_error(data.as_bytes())), st));
                    }
                    match serde_json::from_str::<ChatCompletionChunk>(data) {
                        // A chunk that carries an error (OpenRouter reports errors during
                        // generation so, with `finish_reason: "error"`).
                        Ok(chunk) if chunk.extra.get("error").is_some_and(|e| !e.is_null()) => {
                            st.done = true;
                            return Some((Err(http::stream_error(data.as_bytes())), st));
                        }
                        Ok(mut chunk) => {
                            st.placer.place(&mut chunk);
                            for c in &mut chunk.choices {
                                openai_finish_reason(&mut c.finish_reason);
                            }
                            for c in &chunk.choices {
                                if c.finish_reason.is_some() {
                                    st.finished.insert(c.index);
                                    st.unfinished.remove(&c.index);
                                } else if !st.finished.contains(&c.index) {
                                    st.unfinished.insert(c.index);
                                }
                            }
                            return Some((Ok(chunk), st));
                        }
                        Err(parse_err) => {
                            st.done = true;
                            let err = match serde_json::from_str::<serde_json::Value>(data) {
                                Ok(v) if v.get("error").is_some() => {
                                    http::stream_error(data.as_bytes())
                                }
                                _ => ProviderError::Protocol(format!(
                                    "stream event is not a chat.completion.chunk ({parse_err}): {}",
                                    http::snippet(data.as_bytes())
                                )),
                            };
                            return Some((Err(err), st));
                        }
                    }
                }
            }
        }
    })
}

/// A finish reason in OpenAI's words: Mistral's `model_length` (the model's context was full)
/// is OpenAI's `length`, which clients test for.
fn openai_finish_reason(reason: &mut Option<String>) {
    if reason.as_deref() == Some("model_length") {
        *reason = Some("length".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mistrals_model_length_is_openais_length() {
        let chunk = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"model_length"}]}"#;
        let got = chunks_of(&[chunk, "[DONE]"]).await;
        let chunk = got[0].as_ref().expect("a chunk");
        assert_eq!(chunk.choices[0].finish_reason.as_deref(), Some("length"));
    }

    /// The chunks (or the error) `openai_chunks` gives for these SSE data lines.
    async fn chunks_of(datas: &[&str]) -> Vec<Result<ChatCompletionChunk, ProviderError>> {
        use futures::StreamExt;
        let events: Vec<Result<http::Event, ProviderError>> = datas
            .iter()
            .map(|d| {
                Ok(http::Event {
                    event: "message".into(),
                    data: (*d).to_string(),
                    id: String::new(),
                    retry: None,
                })
            })
            .collect();
        openai_chunks(futures::stream::iter(events)).collect().await
    }

    #[tokio::test]
    async fn an_n_2_stream_cut_before_every_choice_finished_is_an_error() {
        let both = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#;
        let first_done = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let second_done = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}"#;
        let cut = chunks_of(&[both, first_done]).await;
        assert!(
            matches!(cut.last(), Some(Err(ProviderError::Protocol(_)))),
            "{cut:?}"
        );
        // Every choice finished: whole, even without `[DONE]`.
        let whole = chunks_of(&[both, first_done, second_done]).await;
        assert!(whole.iter().all(Result::is_ok), "{whole:?}");
    }

    #[tokio::test]
    async fn errors_inside_a_stream_in_every_shape_end_it_as_errors() {
        use futures::StreamExt;
        use sluice_core::error::ErrorClass;
        let ev = |event: &str, data: &str| {
            Ok(http::Event {
                event: event.into(),
                data: data.into(),
                id: String::new(),
                retry: None,
            })
        };
        let run = |events: Vec<Result<http::Event, ProviderError>>| async move {
            openai_chunks(futures::stream::iter(events))
                .collect::<Vec<_>>()
                .await
        };
        // llama.cpp: an `error` event, then [DONE]: the error, not an empty success.
        let out = run(vec![
            ev(
                "error",
                r#"{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}"#,
            ),
            ev("message", "[DONE]"),
        ])
        .await;
        let err = out.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.class(), ErrorClass::ContextWindowExceeded, "{err:?}");
        // OpenRouter: a chunk that carries an error and finishes with "error".
        let chunk = r#"{"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m","error":{"code":502,"message":"Provider disconnected"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#;
        let out = run(vec![ev("message", chunk), ev("message", "[DONE]")]).await;
        assert_eq!(out.len(), 1, "{out:?}");
        let err = out[0].as_ref().unwrap_err();
        assert_eq!(err.class(), ErrorClass::ServerError, "{err:?}");
        assert!(err.to_string().contains("Provider disconnected"), "{err}");
        // Nothing but [DONE]: no answer.
        let out = run(vec![ev("message", "[DONE]")]).await;
        assert!(
            matches!(out.as_slice(), [Err(ProviderError::Protocol(_))]),
            "{out:?}"
        );
    }

    #[test]
    fn a_user_over_64_characters_goes_as_its_first_64() {
        let long = format!("user_{}_account_x_session_y", "é".repeat(70));
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "user": long, "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        let sent = compatible_server().adjusted(&req).expect("adjusted");
        let user = sent.user.expect("a user");
        assert_eq!(user.chars().count(), 64);
        assert!(long.starts_with(&user));
        let short: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "user": "ann", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert!(compatible_server().adjusted(&short).is_none());
    }

    /// A provider for the server at `base`.
    fn server_at(base: &str) -> OpenAi {
        configured(base, Some(true))
    }

    fn configured(base: &str, stream_usage: Option<bool>) -> OpenAi {
        OpenAi::new(&OpenAiConfig {
            base_url: base.into(),
            api_key: None,
            headers: BTreeMap::new(),
            stream_usage,
            forward_cache_control: false,
            timeouts: HttpSettings::default(),
        })
        .unwrap()
    }

    /// Mistral's API refuses `stream_options` (every stream failed with 422 unless
    /// `stream_usage = false` was set); OpenAI's data-residency hosts are OpenAI's API; a base
    /// URL with a query is refused (the paths went inside it).
    #[test]
    fn hosts_get_what_they_take() {
        assert!(!configured("https://api.mistral.ai/v1", None).stream_usage);
        assert!(configured("https://api.mistral.ai/v1", Some(true)).stream_usage);
        assert!(configured("http://localhost:8000/v1", None).stream_usage);
        for base in [
            "https://api.openai.com/v1",
            "https://eu.api.openai.com/v1",
            "https://us.api.openai.com/v1",
        ] {
            assert!(is_openai_host(base), "{base}");
        }
        assert!(!is_openai_host("https://api.openai.com.evil.example/v1"));
        let e = OpenAi::new(&OpenAiConfig {
            base_url: "https://gw.example/v1?key=x".into(),
            api_key: None,
            headers: BTreeMap::new(),
            stream_usage: None,
            forward_cache_control: false,
            timeouts: HttpSettings::default(),
        })
        .expect_err("a query is refused");
        assert!(e.contains("query"), "{e}");
    }

    /// A provider for an OpenAI-compatible server (not OpenAI's own API).
    fn compatible_server() -> OpenAi {
        server_at("http://localhost:8000/v1")
    }

    /// A Gemini thought signature on a tool call goes to Google's OpenAI-compatible API, which
    /// reads it, and to no other server.
    #[test]
    fn gemini_signatures_on_tool_calls_go_only_to_google() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": "{}"},
                    "extra_content": {"google": {"thought_signature": "sig"}}}]},
                {"role": "tool", "tool_call_id": "c", "content": "r"}
            ]
        }))
        .unwrap();
        assert!(
            server_at("https://generativelanguage.googleapis.com/v1beta/openai")
                .adjusted(&req)
                .is_none()
        );
        for server in [compatible_server(), server_at("https://api.openai.com/v1")] {
            let sent = serde_json::to_value(server.adjusted(&req).expect("changed")).unwrap();
            let call = &sent["messages"][1]["tool_calls"][0];
            assert!(call.get("extra_content").is_none(), "{sent:#}");
            assert_eq!(call["id"], "c");
        }
    }

    #[test]
    fn stream_options_go_only_to_servers_that_take_them() {
        let req = |options: serde_json::Value| -> ChatRequest {
            let mut v = serde_json::json!({"model": "m", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]});
            if !options.is_null() {
                v["stream_options"] = options;
            }
            serde_json::from_value(v).unwrap()
        };
        let asked = serde_json::json!({"include_usage": true});
        let taking = compatible_server();
        for r in [req(serde_json::Value::Null), req(asked.clone())] {
            let body = serde_json::to_value(taking.stream_body(&r)).unwrap();
            assert_eq!(body["stream_options"]["include_usage"], true, "{body}");
        }
        let refusing = OpenAi {
            stream_usage: false,
            ..compatible_server()
        };
        // Nor those of a client (or of a `/v1/messages` request, which always asks).
        for r in [req(serde_json::Value::Null), req(asked)] {
            let body = serde_json::to_value(refusing.stream_body(&r)).unwrap();
            assert!(body.get("stream_options").is_none(), "{body}");
            assert_eq!(body["stream"], true);
        }
    }

    #[test]
    fn a_messages_tools_own_fields_are_not_sent_to_openai_compatible_servers() {
        let local = compatible_server();
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"},
                       "anthropic": {"strict": true, "input_examples": [{}]}}]
        }))
        .unwrap();
        let out = serde_json::to_value(local.adjusted(&req).expect("changed")).unwrap();
        assert_eq!(
            out["tools"][0],
            serde_json::json!({"type": "function", "function": {"name": "f"}}),
            "{out}"
        );
    }

    #[test]
    fn anthropic_thinking_blocks_are_not_sent_to_openai_compatible_servers() {
        let local = compatible_server();
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok", "reasoning_content": "r",
                 "thinking_blocks": [{"type": "thinking", "thinking": "t", "signature": "s"}],
                 "block_order": [2, "thinking"]},
                {"role": "user", "content": "more"},
                {"role": "tool", "tool_call_id": "c", "content": "Error: boom", "is_error": true}
            ]
        }))
        .unwrap();
        let out = serde_json::to_value(local.adjusted(&req).expect("changed")).unwrap();
        assert!(out["messages"][1].get("thinking_blocks").is_none(), "{out}");
        assert!(out["messages"][1].get("block_order").is_none(), "{out}");
        assert!(out["messages"][3].get("is_error").is_none(), "{out}");
        assert_eq!(out["messages"][3]["content"], "Error: boom");
        // Everything else is as it was.
        assert_eq!(out["messages"][1]["reasoning_content"], "r");
        assert_eq!(out["messages"][2]["content"], "more");
        let plain: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert!(local.adjusted(&plain).is_none());
    }

    #[test]
    fn openais_own_api_gets_max_completion_tokens_and_no_top_k() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "o4-mini", "max_tokens": 1024, "top_k": 40,
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        let out = for_official(&req, CapField::MaxCompletionTokens).expect("changed");
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["max_completion_tokens"], 1024);
        // Attribution metadata goes only with `store`, and only its string values.
        let with_meta = |store: bool| -> ChatRequest {
            serde_json::from_value(serde_json::json!({
                "model": "gpt-4o", "store": store,
                "metadata": {"session_id": "s1", "tags": ["a", "b"]},
                "messages": [{"role": "user", "content": "hi"}]
            }))
            .unwrap()
        };
        let v = serde_json::to_value(
            for_official(&with_meta(false), CapField::MaxCompletionTokens).unwrap(),
        )
        .unwrap();
        assert!(v.get("metadata").is_none(), "{v}");
        let v = serde_json::to_value(
            for_official(&with_meta(true), CapField::MaxCompletionTokens).unwrap(),
        )
        .unwrap();
        assert_eq!(v["metadata"], serde_json::json!({"session_id": "s1"}));
        assert!(v.get("max_tokens").is_none(), "{v}");
        assert!(v.get("top_k").is_none(), "{v}");
        // A request that needs nothing is sent as it is.
        let plain: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "max_completion_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert!(for_official(&plain, CapField::MaxCompletionTokens).is_none());

        assert!(is_openai_host("https://api.openai.com/v1"));
        assert!(!is_openai_host("http://127.0.0.1:8000/v1"));
        assert!(!is_openai_host("https://api.openai.com.example.net/v1"));
        let local = compatible_server();
        assert!(
            local.official.is_none(),
            "compatible servers take max_tokens and top_k as they are"
        );
    }

    /// What a `/v1/messages` client sends for Anthropic: its top-level fields reach no
    /// OpenAI-type upstream; caching breakpoints only one that forwards them (and text that
    /// became parts to carry one is a string again without them); `thinking` never reaches
    /// OpenAI's own API.
    #[test]
    fn anthropic_fields_and_breakpoints_by_upstream() {
        let cc = serde_json::json!({"type": "ephemeral"});
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "max_completion_tokens": 5,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "s1"}, {"type": "text", "text": "s2", "cache_control": cc}]},
                {"role": "user", "content": [{"type": "text", "text": "u", "cache_control": cc}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": cc}], "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}, "cache_control": cc}
                ]},
                {"role": "tool", "tool_call_id": "c", "content": "r", "cache_control": cc},
                {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "https://i"}, "cache_control": cc}]}
            ],
            "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": cc}],
            "cache_control": cc,
            "anthropic": {"thinking": {"type": "enabled", "budget_tokens": 1024}}
        }))
        .unwrap();
        let server = compatible_server();
        let plain = serde_json::to_value(server.adjusted(&req).unwrap()).unwrap();
        assert!(plain.get("anthropic").is_none(), "{plain}");
        assert!(!plain.to_string().contains("cache_control"), "{plain}");
        assert_eq!(plain["messages"][0]["content"], "s1\ns2");
        assert_eq!(plain["messages"][1]["content"], "u");
        assert_eq!(plain["messages"][2]["content"], "ab");
        assert_eq!(plain["messages"][3]["content"], "r");
        assert_eq!(plain["messages"][4]["content"][1]["type"], "image_url");

        let gateway = OpenAi {
            forward_cache_control: true,
            ..compatible_server()
        };
        let kept = serde_json::to_value(gateway.adjusted(&req).unwrap()).unwrap();
        assert!(kept.get("anthropic").is_none(), "{kept}");
        assert_eq!(kept["messages"][0]["content"][1]["cache_control"], cc);
        assert_eq!(kept["tools"][0]["cache_control"], cc);
        assert_eq!(kept["cache_control"], cc);

        let thinking: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        let official =
            serde_json::to_value(for_official(&thinking, CapField::MaxTokens).expect("changed"))
                .unwrap();
        assert!(official.get("thinking").is_none(), "{official}");

        // Older Azure API versions: the cap goes back to `max_tokens`, and the fields no Azure
        // version takes stay out.
        let azure_2024_06 = OpenAi::azure(&AzureConfig {
            base_url: "https://r.openai.azure.com".into(),
            api_version: "2024-06-01".into(),
            api_key: SecretRef::literal("k"),
            headers: BTreeMap::new(),
            stream_usage: None,
            timeouts: HttpSettings::default(),
        })
        .unwrap();
        // Nor do its streams ask for the usage chunk (`stream_options` is refused there).
        let streamed: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        let v = serde_json::to_value(azure_2024_06.stream_body(&streamed)).unwrap();
        assert!(v.get("stream_options").is_none(), "{v}");
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "max_completion_tokens": 50, "top_k": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": cc}]}]
        }))
        .unwrap();
        let v = serde_json::to_value(azure_2024_06.adjusted(&req).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 50, "{v}");
        assert!(
            v.get("max_completion_tokens").is_none() && v.get("top_k").is_none(),
            "{v}"
        );
        assert_eq!(v["messages"][0]["content"], "hi", "{v}");

        // OpenAI's own API never gets breakpoints, whatever the provider says.
        let openai = OpenAi {
            forward_cache_control: true,
            official: Some(CapField::MaxCompletionTokens),
            ..compatible_server()
        };
        let v = serde_json::to_value(openai.adjusted(&req).unwrap()).unwrap();
        assert!(!v.to_string().contains("cache_control"), "{v}");
    }
}
