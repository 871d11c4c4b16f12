//! Models that run inside Sluice, on the CPU, with candle.
//!
//! - [`llama`]: Llama-family chat models from GGUF files — the model with a KV cache per
//!   sequence and a batched forward pass, the tokenizer and chat template read from the file's own
//!   metadata, and seeded sampling.
//! - [`engine`]: continuous batching over one chat model: requests join a running batch between
//!   steps, under a batch-size and KV-memory bound.
//! - [`embed`]: BERT-family sentence-transformers embedding models (pooling and normalization as
//!   the model's own configuration says).
//! - [`inspect`]: what a model file is, without loading it.
//!
//! The `local` provider in `sluice-providers` serves these through the OpenAI-compatible API.

pub mod embed;
pub mod engine;
pub mod inspect;
pub mod llama;
