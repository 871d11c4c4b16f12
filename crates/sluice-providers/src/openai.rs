//! OpenAI and every OpenAI-compatible server (vLLM, Ollama, TGI, Groq, Together, Mistral, …), and
//! Azure OpenAI, which speaks the same bodies at per-deployment URLs.
//!
//! Requests are forwarded as they came, with only `model` replaced: tools, `response_format`,
//! `logprobs`, `n`, `seed` and unknown fields reach the upstream untouched.

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_core::secret::{Secret, SecretRef};
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, EmbeddingRequest, EmbeddingResponse,
    StreamOptions,
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
    /// Turn off for servers that reject `stream_options`.
    #[serde(default = "yes")]
    pub stream_usage: bool,
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
    #[serde(default = "yes")]
    pub stream_usage: bool,
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
fn yes() -> bool {
    true
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
    chat: reqwest::Url,
    embeddings: reqwest::Url,
    models: reqwest::Url,
}

#[derive(Debug)]
enum Auth {
    None,
    /// The ready `Authorization` / `api-key` header (marked sensitive).
    Header(reqwest::header::HeaderName, reqwest::header::HeaderValue),
}

fn auth_header(name: &'static str, value: String) -> Result<Auth, String> {
    let mut v = reqwest::header::HeaderValue::from_str(&value)
        .map_err(|_| "api_key: contains characters not allowed in an HTTP header".to_string())?;
    v.set_sensitive(true);
    Ok(Auth::Header(
        reqwest::header::HeaderName::from_static(name),
        v,
    ))
}

fn parse_url(u: String) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(&u).map_err(|e| format!("base_url: `{u}` is not a URL: {e}"))
}

/// The OpenAI-compatible provider.
#[derive(Debug)]
pub struct OpenAi {
    kind: &'static str,
    client: reqwest::Client,
    urls: Urls,
    auth: Auth,
    headers: reqwest::header::HeaderMap,
    stream_usage: bool,
    timeouts: Timeouts,
}

fn resolve(key: &Option<SecretRef>) -> Result<Option<Secret>, String> {
    key.as_ref()
        .map(|k| k.resolve().map_err(|e| format!("api_key: {e}")))
        .transpose()
}

impl OpenAi {
    pub fn new(cfg: &OpenAiConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        Ok(OpenAi {
            kind: "openai",
            client: http::client(&timeouts)?,
            urls: Urls::Root(Box::new(RootUrls {
                chat: parse_url(format!("{base}/chat/completions"))?,
                embeddings: parse_url(format!("{base}/embeddings"))?,
                models: parse_url(format!("{base}/models"))?,
            })),
            auth: match resolve(&cfg.api_key)? {
                Some(k) => auth_header("authorization", format!("Bearer {}", k.expose()))?,
                None => Auth::None,
            },
            headers: crate::header_map(&cfg.headers)?,
            stream_usage: cfg.stream_usage,
            timeouts,
        })
    }

    pub fn azure(cfg: &AzureConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        let key = cfg.api_key.resolve().map_err(|e| format!("api_key: {e}"))?;
        Ok(OpenAi {
            kind: "azure",
            client: http::client(&timeouts)?,
            urls: Urls::Azure {
                base: base.to_string(),
                api_version: cfg.api_version.clone(),
            },
            auth: auth_header("api-key", key.expose().to_string())?,
            headers: crate::header_map(&cfg.headers)?,
            stream_usage: cfg.stream_usage,
            timeouts,
        })
    }

    fn url(&self, model: &str, op: &str) -> Result<reqwest::Url, ProviderError> {
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
                let u =
                    format!("{base}/openai/deployments/{model}/{path}?api-version={api_version}");
                reqwest::Url::parse(&u).map_err(|e| {
                    ProviderError::Unsupported(format!(
                        "the deployment name `{model}` does not make a valid Azure URL: {e}"
                    ))
                })
            }
        }
    }

    fn post(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        let b = self.client.post(url).headers(self.headers.clone());
        match &self.auth {
            Auth::None => b,
            Auth::Header(name, value) => b.header(name.clone(), value.clone()),
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
        let b = self.client.get(url).headers(self.headers.clone());
        let b = match &self.auth {
            Auth::None => b,
            Auth::Header(name, value) => b.header(name.clone(), value.clone()),
        };
        http::send(b, self.timeouts.request).await.map(|_| ())
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let started = tokio::time::Instant::now();
        let resp = http::send(
            self.post(self.url(&req.model, "chat")?).json(req),
            self.timeouts.request,
        )
        .await?;
        let left = self.timeouts.request.saturating_sub(started.elapsed());
        http::json_body(resp, left).await
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let mut body = req.clone();
        body.stream = Some(true);
        if self.stream_usage && !body.wants_stream_usage() {
            body.stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
        }
        let resp = http::send(
            self.post(self.url(&req.model, "chat")?)
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .json(&body),
            self.timeouts.request,
        )
        .await?;
        let events = http::sse_events(resp, self.timeouts.stream_idle);
        Ok(Box::pin(openai_chunks(events)))
    }

    async fn embed(&self, req: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
        let started = tokio::time::Instant::now();
        let resp = http::send(
            self.post(self.url(&req.model, "embeddings")?).json(req),
            self.timeouts.request,
        )
        .await?;
        let left = self.timeouts.request.saturating_sub(started.elapsed());
        http::json_body(resp, left).await
    }
}

/// Parses an OpenAI SSE stream into chunks. `[DONE]` ends it; an `{"error": …}` event becomes an
/// error; a stream that ends without `[DONE]` and without a finish reason is reported as cut.
fn openai_chunks(
    events: impl futures::Stream<Item = Result<eventsource_stream::Event, ProviderError>>
    + Send
    + 'static,
) -> impl futures::Stream<Item = Result<ChatCompletionChunk, ProviderError>> + Send + 'static {
    struct State<S> {
        events: std::pin::Pin<Box<S>>,
        finished: bool,
        done: bool,
    }
    let state = State {
        events: Box::pin(events),
        finished: false,
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
                    if st.finished {
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
                        return None;
                    }
                    match serde_json::from_str::<ChatCompletionChunk>(data) {
                        Ok(chunk) => {
                            if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
                                st.finished = true;
                            }
                            return Some((Ok(chunk), st));
                        }
                        Err(parse_err) => {
                            st.done = true;
                            let err = match serde_json::from_str::<serde_json::Value>(data) {
                                Ok(v) if v.get("error").is_some() => {
                                    let (message, code) = http::error_message(data.as_bytes());
                                    ProviderError::Status {
                                        status: 502,
                                        message,
                                        code,
                                        retry_after: None,
                                    }
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
