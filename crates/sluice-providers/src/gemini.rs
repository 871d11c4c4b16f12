//! Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`), translated both ways
//! (see `sluice_types::gemini`).

use std::collections::BTreeMap;

use ::http::{HeaderMap, HeaderName, Request};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::Full;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::provider::{ChatProvider, ChunkStream};
use sluice_core::secret::SecretRef;
use sluice_types::gemini::{self as wire, GenerateContentResponse, StreamDecoder};
use sluice_types::openai::{ChatCompletion, ChatRequest};

use crate::http::{self, HttpSettings, Timeouts};

/// `type = "gemini"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiConfig {
    /// Default `https://generativelanguage.googleapis.com`.
    #[serde(default = "default_base")]
    pub base_url: String,
    /// The API version path segment.
    #[serde(default = "default_version")]
    pub api_version: String,
    pub api_key: SecretRef,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Timeouts (`[providers.NAME.timeouts]`).
    #[serde(default)]
    pub timeouts: HttpSettings,
}

fn default_base() -> String {
    "https://generativelanguage.googleapis.com".into()
}
fn default_version() -> String {
    "v1beta".into()
}

#[derive(Debug)]
pub struct Gemini {
    client: http::Client,
    root: String,
    /// The configured extra headers and `x-goog-api-key` (marked sensitive).
    headers: HeaderMap,
    timeouts: Timeouts,
}

impl Gemini {
    pub fn new(cfg: &GeminiConfig) -> Result<Self, String> {
        let timeouts = cfg.timeouts.timeouts()?;
        let base = crate::base_url(&cfg.base_url)?;
        let root = format!("{base}/{}", cfg.api_version.trim_matches('/'));
        http::parse_uri(&root).map_err(|e| format!("base_url: {e}"))?;
        let key = cfg.api_key.resolve().map_err(|e| format!("api_key: {e}"))?;
        let mut headers = crate::header_map(&cfg.headers)?;
        headers.insert(
            HeaderName::from_static("x-goog-api-key"),
            crate::secret_header(key.expose())?,
        );
        Ok(Gemini {
            client: http::Client::new(&timeouts)?,
            root,
            headers,
            timeouts,
        })
    }

    fn post(
        &self,
        model: &str,
        method: &str,
        body: &wire::GenerateContentRequest,
    ) -> Result<Request<Full<Bytes>>, ProviderError> {
        // `method` may carry a query (`streamGenerateContent?alt=sse`). A model path keeps its
        // `models/` or `tunedModels/` prefix; each segment is escaped.
        let url = format!(
            "{}/{}:{method}",
            self.root,
            http::path(&wire::model_path(model))
        );
        let uri = http::parse_uri(&url).map_err(|e| {
            ProviderError::Unsupported(format!(
                "the model name `{model}` does not make a valid Gemini URL: {e}"
            ))
        })?;
        http::post_json(&uri, &self.headers, body)
    }
}

/// Whether a stream event finishes the answer: a candidate has a `finishReason`, or the prompt
/// was blocked (`promptFeedback.blockReason`, no candidates: nothing more comes).
fn ends_stream(resp: &GenerateContentResponse) -> bool {
    resp.candidates.iter().any(|c| c.finish_reason.is_some())
        || (resp.candidates.is_empty() && resp.block_reason().is_some())
}

/// An error Gemini sent as a 200 body or stream event (`{"error": {code, message, status}}`),
/// classed by its status and code like one answered with that status.
fn embedded_error(resp: &GenerateContentResponse) -> Option<ProviderError> {
    let err = resp.extra.get("error").filter(|e| !e.is_null())?;
    let body = serde_json::json!({ "error": err }).to_string();
    Some(http::stream_error(body.as_bytes()))
}

fn translate(req: &ChatRequest) -> Result<wire::GenerateContentRequest, ProviderError> {
    wire::request_from_openai(req).map_err(crate::translate_error)
}

#[async_trait]
impl ChatProvider for Gemini {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError> {
        let body = translate(req)?;
        let request = self.post(&req.model, "generateContent", &body)?;
        let out: GenerateContentResponse = self.client.json(request, self.timeouts.request).await?;
        if let Some(e) = embedded_error(&out) {
            return Err(e);
        }
        wire::response_to_openai(out, &req.model).map_err(|e| ProviderError::Protocol(e.0))
    }

    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = translate(req)?;
        let mut request = self.post(&req.model, "streamGenerateContent?alt=sse", &body)?;
        http::accept_event_stream(&mut request);
        let resp = self.client.send(request, self.timeouts.request).await?;
        let events = Box::pin(http::sse_events(
            resp,
            self.timeouts.request,
            self.timeouts.stream_idle,
        ));
        let state = (events, StreamDecoder::new(&req.model), false, false);
        let chunks = futures::stream::unfold(
            state,
            |(mut events, mut dec, mut done, mut finished)| async move {
                if done {
                    return None;
                }
                let item = match events.next().await {
                    None => {
                        done = true;
                        if finished {
                            Ok(dec.finish())
                        } else {
                            Err(ProviderError::Protocol(
                                "stream ended before a finishReason".into(),
                            ))
                        }
                    }
                    Some(Err(e)) => {
                        done = true;
                        Err(e)
                    }
                    Some(Ok(ev)) if ev.data.trim().is_empty() => Ok(Vec::new()),
                    Some(Ok(ev)) => match serde_json::from_str::<GenerateContentResponse>(&ev.data)
                    {
                        Err(e) => {
                            done = true;
                            Err(ProviderError::Protocol(format!(
                                "stream event is not a GenerateContentResponse ({e}): {}",
                                http::snippet(ev.data.as_bytes())
                            )))
                        }
                        Ok(resp) => match embedded_error(&resp) {
                            Some(e) => {
                                done = true;
                                Err(e)
                            }
                            None => {
                                if ends_stream(&resp) {
                                    finished = true;
                                }
                                dec.on_response(resp).map_err(|e| {
                                    done = true;
                                    ProviderError::Protocol(e.0)
                                })
                            }
                        },
                    },
                };
                Some((item, (events, dec, done, finished)))
            },
        );
        Ok(Box::pin(chunks.flat_map(|item| {
            futures::stream::iter(match item {
                Ok(chunks) => chunks.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_whose_prompt_is_blocked_ends_with_its_usage() {
        let event = r#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9},"responseId":"blk-1"}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: {event}\r\n\r\n"
        );
        let (addr, _seen) = crate::http::tests::server(Box::leak(response.into_boxed_str())).await;
        let base = format!("http://{addr}");
        let cfg: GeminiConfig =
            serde_json::from_value(serde_json::json!({"base_url": base, "api_key": "k"})).unwrap();
        let provider = Gemini::new(&cfg).unwrap();
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gemini-2.5-flash",
            "messages": [{"role": "user", "content": "something blocked"}],
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        let items: Vec<_> = provider.chat_stream(&req).await.unwrap().collect().await;
        let chunks: Vec<_> = items
            .into_iter()
            .map(|i| i.unwrap_or_else(|e| panic!("the stream failed: {e}")))
            .collect();
        assert!(
            chunks.iter().any(|c| c
                .choices
                .iter()
                .any(|ch| ch.finish_reason.as_deref() == Some("content_filter"))),
            "{chunks:?}"
        );
        let usage = chunks
            .iter()
            .rev()
            .find_map(|c| c.usage.clone())
            .expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (9, 0));
    }

    #[tokio::test]
    async fn an_error_inside_the_stream_is_classed_by_its_status() {
        let event = r#"{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}"#;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: {event}\r\n\r\n"
        );
        let (addr, _seen) = crate::http::tests::server(Box::leak(response.into_boxed_str())).await;
        let cfg: GeminiConfig = serde_json::from_value(
            serde_json::json!({"base_url": format!("http://{addr}"), "api_key": "k"}),
        )
        .unwrap();
        let provider = Gemini::new(&cfg).unwrap();
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gemini-2.5-flash",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true
        }))
        .unwrap();
        let items: Vec<_> = provider.chat_stream(&req).await.unwrap().collect().await;
        let err = items
            .into_iter()
            .find_map(Result::err)
            .expect("the stream fails");
        assert_eq!(
            err.class(),
            sluice_core::error::ErrorClass::RateLimited,
            "{err:?}"
        );
    }
}
