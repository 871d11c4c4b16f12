//! Anthropic's Messages API, translated both ways (see `sluice_types::anthropic`).

use std::collections::BTreeMap;

use ::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_core::secret::SecretRef;
use sluice_types::anthropic::{self as wire, MessagesResponse, StreamDecoder, StreamEvent};
use sluice_types::openai::{ChatCompletion, ChatRequest};

use crate::http::{self, HttpSettings, Timeouts};

/// `type = "anthropic"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicConfig {
    /// Default `https://api.anthropic.com`.
    #[serde(default = "default_base")]
    pub base_url: String,
    pub api_key: SecretRef,
    /// The `anthropic-version` header.
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts (`[providers.NAME.timeouts]`).
    #[serde(default)]
    pub timeouts: HttpSettings,
}

fn default_base() -> String {
    "https://api.anthropic.com".into()
}
fn default_version() -> String {
    "2023-06-01".into()
}

#[derive(Debug)]
pub struct Anthropic {
    client: http::Client,
    url: Uri,
    models_url: Uri,
    /// The configured extra headers, `x-api-key` (marked sensitive) and `anthropic-version`.
    headers: HeaderMap,
    timeouts: Timeouts,
}

impl Anthropic {
    pub fn new(cfg: &AnthropicConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        let key = cfg.api_key.resolve().map_err(|e| format!("api_key: {e}"))?;
        let mut headers = crate::header_map(&cfg.headers)?;
        headers.insert(
            HeaderName::from_static("x-api-key"),
            crate::secret_header(key.expose())?,
        );
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_str(&cfg.version)
                .map_err(|_| "version: not a valid header value".to_string())?,
        );
        let url = |path: &str| {
            http::parse_uri(&format!("{base}{path}")).map_err(|e| format!("base_url: {e}"))
        };
        Ok(Anthropic {
            client: http::Client::new(&timeouts)?,
            url: url("/v1/messages")?,
            models_url: url("/v1/models")?,
            headers,
            timeouts,
        })
    }
}

fn translate(req: &ChatRequest, stream: bool) -> Result<wire::MessagesRequest, ProviderError> {
    let mut body = wire::request_from_openai(req).map_err(crate::translate_error)?;
    body.stream = stream.then_some(true);
    Ok(body)
}

#[async_trait]
impl ChatProvider for Anthropic {
    fn kind(&self) -> &'static str {
        "anthropic"
    }

    async fn health(&self) -> Result<(), ProviderError> {
        self.client
            .send(
                http::get(&self.models_url, &self.headers),
                self.timeouts.request,
            )
            .await
            .map(|_| ())
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let body = translate(req, false)?;
        let request = http::post_json(&self.url, &self.headers, &body)?;
        let msg: MessagesResponse = self.client.json(request, self.timeouts.request).await?;
        Ok(wire::response_to_openai(msg))
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = translate(req, true)?;
        let mut request = http::post_json(&self.url, &self.headers, &body)?;
        http::accept_event_stream(&mut request);
        let resp = self.client.send(request, self.timeouts.request).await?;
        let events = Box::pin(http::sse_events(resp, self.timeouts.stream_idle));
        let state = (events, StreamDecoder::new(), false);
        let chunks = futures::stream::unfold(state, |(mut events, mut dec, mut done)| async move {
            if done {
                return None;
            }
            let item = match events.next().await {
                None => {
                    done = true;
                    Err(ProviderError::Protocol(
                        "stream ended before message_stop".into(),
                    ))
                }
                Some(Err(e)) => {
                    done = true;
                    Err(e)
                }
                Some(Ok(ev)) => {
                    match serde_json::from_str::<StreamEvent>(&ev.data) {
                        Err(e) => {
                            done = true;
                            Err(ProviderError::Protocol(format!(
                                "event `{}` is not a Messages stream event ({e}): {}",
                                ev.event,
                                http::snippet(ev.data.as_bytes())
                            )))
                        }
                        Ok(event) => {
                            // By the event's own `type` (a compatible server may send no
                            // `event:` line).
                            let is_stop = matches!(event, StreamEvent::MessageStop);
                            match dec.on_event(event) {
                                Ok(chunks) => {
                                    done = is_stop;
                                    Ok(chunks)
                                }
                                Err(e) => {
                                    done = true;
                                    let code = wire::stream_error_kind(&e.0).map(str::to_string);
                                    Err(ProviderError::Status {
                                        status: http::stream_error_status(code.as_deref()),
                                        message: e.0,
                                        code,
                                        retry_after: None,
                                    })
                                }
                            }
                        }
                    }
                }
            };
            Some((item, (events, dec, done)))
        });
        Ok(Box::pin(chunks.flat_map(|item| {
            futures::stream::iter(match item {
                Ok(chunks) => chunks.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        })))
    }
}
