//! Sluice's core: the vocabulary every other crate speaks.
//!
//! - [`error`]: the stable error codes (each with an HTTP status and an OpenAI error `type`) and
//!   [`ProviderError`](error::ProviderError), what a provider call can fail with.
//! - [`provider`]: the [`ChatProvider`](provider::ChatProvider) trait that every provider module
//!   implements; a streamed response is a [`ChunkStream`](provider::ChunkStream).
//! - [`record`]: the [`RequestRecord`](record::RequestRecord) that every request becomes, the
//!   [`LogStore`](record::LogStore) trait the stores implement, and the [`LogSink`](record::LogSink)
//!   the hot path hands records to.
//! - [`secret`]: secret references (`env::NAME`) that never print.
//! - [`price`]: the shipped price table and cost arithmetic.
//! - [`shard`]: which of the connection runtimes the calling thread runs.
//! - [`usage`]: spend and usage read from the request log, and the cache's persistent tier.

pub mod error;
pub mod keys;
pub mod price;
pub mod provider;
pub mod record;
pub mod secret;
pub mod shard;
pub mod usage;

pub use error::{Error, ErrorCode, ProviderError};
