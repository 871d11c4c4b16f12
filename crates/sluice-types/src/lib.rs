//! Wire types for Sluice.
//!
//! [`openai`] holds the OpenAI chat-completions, embeddings and models shapes; they are Sluice's
//! internal lingua franca: every ingress (OpenAI, Anthropic) is translated into
//! [`openai::ChatRequest`], and every provider translates from it. Unknown fields are kept in
//! `extra` maps so that OpenAI-compatible upstreams receive them untouched.
//!
//! [`anthropic`] and [`gemini`] hold those providers' shapes and the pure functions that translate
//! them to and from the OpenAI shapes, including the stateful stream translators. Nothing here does
//! I/O.

pub mod anthropic;
pub mod gemini;
pub mod ids;
mod json_prefix;
pub mod openai;

/// A request or response that cannot be expressed in the other API's shape (for example `n > 1`
/// for a provider that returns one choice), or a request that is wrong in itself (a tool message
/// without its `tool_call_id`). The message says what and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateError(pub String, pub TranslateKind);

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TranslateKind {
    /// The other API cannot express it (a 422 to the client; another provider may).
    Unsupported,
    /// The request is malformed (a 400: no provider can serve it as it is).
    Invalid,
}

impl TranslateError {
    /// Something the other API cannot express.
    pub fn unsupported(message: impl Into<String>) -> Self {
        TranslateError(message.into(), TranslateKind::Unsupported)
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> Self {
        TranslateError(message.into(), TranslateKind::Invalid)
    }
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TranslateError {}
