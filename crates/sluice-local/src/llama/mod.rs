//! In-process chat inference with quantized Llama-family GGUF models on the
//! CPU, built on candle.
//!
//! * [`LlamaModel`] loads a GGUF file once (weights, [`GgufTokenizer`],
//!   [`ChatTemplate`]) and is shared by every sequence; the state of one
//!   sequence is its [`KvCache`].
//! * [`LlamaModel::prefill`] runs a prompt; [`LlamaModel::decode`] advances
//!   many sequences by one token each in a single batched forward pass, which
//!   is what makes continuous batching pay on a CPU: the weights are read once
//!   per step for all sequences. [`LlamaModel::decode_into`] and
//!   [`LlamaModel::forward_into`] do the same into a reusable [`Workspace`],
//!   without allocating (with f32 or Q8_0 weights).
//! * [`Sampler`] picks tokens (greedy, or temperature / top-k / top-p with a
//!   seeded generator) and [`StreamDetokenizer`] turns them into text as they
//!   come, never splitting a UTF-8 character.
//!
//! ```no_run
//! use sluice_local::llama::{LlamaModel, Sampler, SamplingParams, TemplateMessage};
//! # fn main() -> Result<(), sluice_local::llama::LocalError> {
//! let model = LlamaModel::load("model.gguf".as_ref())?;
//! // The chat template rendered, control tokens typed in the messages kept as text.
//! let tokens = model.chat_prompt(
//!     &[TemplateMessage::new("user", "What is the capital of France?")],
//!     true,
//! )?;
//! let mut cache = model.new_cache();
//! let mut logits = model.prefill(&mut cache, &tokens)?;
//! let mut sampler = Sampler::new(SamplingParams::greedy());
//! let mut text = model.tokenizer().stream_detokenizer();
//! for _ in 0..64 {
//!     let token = sampler.sample(&logits);
//!     if model.tokenizer().is_eos(token) {
//!         break;
//!     }
//!     if let Some(piece) = text.push(token) {
//!         print!("{piece}");
//!     }
//!     logits = model.decode(&mut [(&mut cache, token)])?.remove(0);
//! }
//! print!("{}", text.finish());
//! # Ok(())
//! # }
//! ```

mod error;
pub(crate) mod gguf;
mod kernels;
mod model;
pub(crate) mod q8;
mod sampler;
mod template;
pub(crate) mod tokenizer;

pub use error::LocalError;
pub use model::{Batch, KvCache, LlamaModel, LoadOptions, ModelInfo, WeightFormat, Workspace};
pub use sampler::{Sampler, SamplingParams, argmax};
pub use template::{CHATML_TEMPLATE, ChatTemplate, TemplateMessage};
pub use tokenizer::{GgufTokenizer, StreamDetokenizer};
