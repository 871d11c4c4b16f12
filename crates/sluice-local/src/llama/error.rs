//! The error type of local chat inference.

use std::path::PathBuf;

/// Errors from loading a GGUF chat model or running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The model file does not exist.
    #[error("model file not found: {}", path.display())]
    ModelNotFound {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// The model file exists but could not be read.
    #[error("cannot read model file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a GGUF file, or its GGUF structure is damaged or uses a
    /// tensor type this build cannot read.
    #[error("{} is not a usable GGUF file: {message}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The GGUF file holds a model architecture this runtime does not implement.
    #[error("unsupported model architecture {architecture:?} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The `general.architecture` of the file.
        architecture: String,
        /// The architectures that are supported, comma-separated.
        supported: String,
    },
    /// The GGUF file is well formed but its metadata or tensors do not describe
    /// a model this runtime can run (a missing key, an inconsistent shape, ...).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// Building the tokenizer, encoding or decoding failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// Compiling or rendering the chat template failed (including an explicit
    /// `raise_exception(...)` from the template itself).
    #[error("chat template error: {0}")]
    Template(String),
    /// A sequence would grow past the model's context length.
    #[error(
        "context length exceeded: the sequence needs {needed} positions, the model has {limit}"
    )]
    ContextOverflow {
        /// Positions the sequence would occupy.
        needed: usize,
        /// The model's context length.
        limit: usize,
    },
    /// A token id outside the vocabulary was given to the model.
    #[error("token id {id} is out of range (vocabulary size {vocab_size})")]
    InvalidToken {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A request to the model was malformed (an empty prompt, a cache that
    /// belongs to another model, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The tensor computation failed.
    #[error("model computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}
