//! The provider trait: one implementation per upstream API.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, EmbeddingRequest, EmbeddingResponse,
};

use crate::error::ProviderError;

/// A streamed chat response: chunks in the OpenAI shape, as they arrive.
pub type ChunkStream =
    Pin<Box<dyn Stream<Item = Result<ChatCompletionChunk, ProviderError>> + Send + 'static>>;

/// A chat (and optionally embeddings) provider.
///
/// The request it receives is already addressed to it: `model` is the upstream model name of the
/// chosen deployment. Implementations translate to their wire format, call the upstream, and
/// translate back. They never buffer a stream: each upstream event becomes a chunk as it arrives.
#[async_trait]
pub trait ChatProvider: Send + Sync + 'static {
    /// The provider type (`openai`, `anthropic`, …), for logs and metrics.
    fn kind(&self) -> &'static str;

    /// A whole (non-streamed) completion.
    async fn chat(&self, req: &ChatRequest) -> Result<ChatCompletion, ProviderError>;

    /// A streamed completion. The call returns once the upstream accepted the request (its
    /// response headers arrived), so that errors before the first byte can still be answered as
    /// plain HTTP errors.
    async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError>;

    /// A cheap liveness check of the upstream (for OpenAI-compatible and Anthropic upstreams,
    /// listing the models), for active health checks. Providers without one keep the default.
    async fn health(&self) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "provider type `{}` has no health check",
            self.kind()
        )))
    }

    /// The prompt tokens of a request as the upstream counts them (Anthropic's
    /// `count_tokens`), or `None` for an upstream with no such API (the gateway then counts
    /// with its own tokenizer). Providers without one keep the default.
    async fn count_tokens(&self, _req: &ChatRequest) -> Result<Option<u64>, ProviderError> {
        Ok(None)
    }

    /// Embeddings. Providers without an embeddings API keep the default.
    async fn embed(&self, _req: &EmbeddingRequest) -> Result<EmbeddingResponse, ProviderError> {
        Err(ProviderError::Unsupported(format!(
            "provider type `{}` has no embeddings API",
            self.kind()
        )))
    }
}
