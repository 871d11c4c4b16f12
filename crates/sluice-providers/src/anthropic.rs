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
    count_url: Uri,
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
            count_url: url("/v1/messages/count_tokens")?,
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

const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

impl Anthropic {
    /// The request to the Messages endpoint: the body without the client's beta flags, which go
    /// in `anthropic-beta` after any configured ones.
    fn post(
        &self,
        body: wire::MessagesRequest,
    ) -> Result<::http::Request<http_body_util::Full<bytes::Bytes>>, ProviderError> {
        self.post_to(&self.url, body, None)
    }

    /// Like [`Anthropic::post`], to `url`; with `only`, the body keeps only those fields.
    fn post_to(
        &self,
        url: &Uri,
        mut body: wire::MessagesRequest,
        only: Option<&[&str]>,
    ) -> Result<::http::Request<http_body_util::Full<bytes::Bytes>>, ProviderError> {
        let betas = match body.extra.shift_remove(wire::BETAS) {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s],
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => Ok(s),
                    _ => Err(()),
                })
                .collect::<Result<Vec<_>, ()>>()
                .map_err(|()| bad_betas())?,
            Some(_) => return Err(bad_betas()),
        };
        let mut request = match only {
            None => http::post_json(url, &self.headers, &body)?,
            Some(fields) => {
                let mut v = serde_json::to_value(&body).map_err(|e| {
                    ProviderError::Invalid(format!("cannot encode the request: {e}"))
                })?;
                if let Some(o) = v.as_object_mut() {
                    o.retain(|k, _| fields.contains(&k.as_str()));
                }
                http::post_json(url, &self.headers, &v)?
            }
        };
        let betas: Vec<&str> = betas
            .iter()
            .flat_map(|b| b.split(','))
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if !betas.is_empty() {
            let mut all: Vec<&str> = Vec::new();
            let configured = self
                .headers
                .get_all(&ANTHROPIC_BETA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|b| !b.is_empty());
            for b in configured.chain(betas) {
                if !all.contains(&b) {
                    all.push(b);
                }
            }
            let value = HeaderValue::from_str(&all.join(",")).map_err(|_| {
                ProviderError::Invalid("anthropic-beta holds a character a header cannot".into())
            })?;
            request.headers_mut().insert(ANTHROPIC_BETA, value);
        }
        Ok(request)
    }
}

/// The fields `count_tokens` takes (it refuses `max_tokens`, `stream` and sampling settings).
const COUNT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "cache_control",
    "context_management",
    "mcp_servers",
    "output_config",
    "output_format",
    "speed",
];

/// `count_tokens`'s answer.
#[derive(serde::Deserialize)]
struct Counted {
    input_tokens: u64,
}

fn bad_betas() -> ProviderError {
    ProviderError::Invalid(format!(
        "`{}.{}` must be a list of strings",
        wire::ANTHROPIC_FIELDS,
        wire::BETAS
    ))
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

    async fn count_tokens(&self, req: &ChatRequest) -> Result<Option<u64>, ProviderError> {
        let request = self.post_to(&self.count_url, translate(req, false)?, Some(COUNT_FIELDS))?;
        let counted: Counted = self.client.json(request, self.timeouts.request).await?;
        Ok(Some(counted.input_tokens))
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let request = self.post(translate(req, false)?)?;
        let msg: MessagesResponse = self.client.json(request, self.timeouts.request).await?;
        Ok(wire::response_to_openai(msg))
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let mut request = self.post(translate(req, true)?)?;
        http::accept_event_stream(&mut request);
        let resp = self.client.send(request, self.timeouts.request).await?;
        let events = Box::pin(http::sse_events(
            resp,
            self.timeouts.request,
            self.timeouts.stream_idle,
        ));
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
                                    Err(ProviderError::Embedded(Box::new(ProviderError::Status {
                                        status: http::stream_error_status(code.as_deref()),
                                        message: e.0,
                                        code,
                                        param: None,
                                        retry_after: None,
                                    })))
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
