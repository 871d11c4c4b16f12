//! Anthropic Messages API (`POST /v1/messages`): wire types and translations to and from the
//! OpenAI shapes in [`crate::openai`].
//!
//! Two directions are covered:
//!
//! * **Egress** — Sluice calls Anthropic on behalf of an OpenAI-shaped request:
//!   [`request_from_openai`], [`response_to_openai`] and the stateful [`StreamDecoder`], which
//!   turns Anthropic stream events into `chat.completion.chunk`s.
//! * **Ingress** — an Anthropic SDK calls Sluice's `/v1/messages`; the request is routed as an
//!   OpenAI-shaped one and the answer goes back in Anthropic's shape: [`request_to_openai`],
//!   [`response_from_openai`] and the stateful [`StreamEncoder`], which turns chunks into
//!   Anthropic's exact event sequence.
//!
//! The main structs keep the fields they do not name in `extra`, and content blocks, image sources,
//! deltas and stream events of types this module does not know parse into an `Other(Value)`
//! variant instead of failing, so newer API features survive parsing. The translations never
//! forward one API's unknown fields to the other API: a Messages request's own top-level fields
//! (`thinking`, `cache_control`, `context_management`, …) travel in the OpenAI shape under
//! [`ANTHROPIC_FIELDS`], which only an Anthropic upstream reads, and prompt-caching breakpoints
//! (`cache_control` on blocks and tools) as `cache_control` on the matching OpenAI content parts,
//! tools, tool calls and tool messages (the shape OpenAI-compatible gateways use for it). Nothing
//! here does I/O or panics on input.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::TranslateError;
use crate::ids::{new_request_id, unix_now};
use crate::json_prefix::JsonPrefix;
use crate::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, ChunkChoice, Content, ContentPart,
    Delta, Extra, FunctionCall, FunctionCallDelta, FunctionDef, ImageUrl, Message, ResponseMessage,
    Role, Stop, StreamOptions, Tool, ToolCall, ToolCallDelta, Usage, reasoning_text,
};

/// The `max_tokens` Sluice sends to Anthropic when the OpenAI request sets no cap (Anthropic
/// requires one).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

// ---------------------------------------------------------------------------------------------
// Wire types: request
// ---------------------------------------------------------------------------------------------

/// `POST /v1/messages` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<AnthropicMessage>,
    /// The output-token cap; Anthropic requires it.
    pub max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemPrompt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<AnthropicTool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RequestMetadata>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl MessagesRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client turned extended thinking on (`thinking` of a type other than
    /// `disabled`): only then does the answer carry thinking blocks, as Anthropic's does.
    pub fn wants_thinking(&self) -> bool {
        self.extra
            .get("thinking")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t != "disabled")
    }
}

/// Takes the thinking blocks out of an answer (for a client that did not turn thinking on).
pub fn without_thinking(resp: &mut MessagesResponse) {
    resp.content.retain(|b| {
        !matches!(
            b,
            ContentBlock::Thinking { .. } | ContentBlock::RedactedThinking { .. }
        )
    });
}

/// `system`: a string or a list of text blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SystemPrompt {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

impl SystemPrompt {
    /// The prompt's text; text blocks are joined with newlines, other blocks are skipped.
    pub fn to_text(&self) -> String {
        match self {
            SystemPrompt::Text(s) => s.clone(),
            SystemPrompt::Blocks(blocks) => join_block_text(blocks, "\n"),
        }
    }
}

/// A message's role: Anthropic has only these two (the system prompt is a separate field).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AnthropicRole {
    User,
    Assistant,
}

/// One message of the conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnthropicMessage {
    pub role: AnthropicRole,
    pub content: MessageContent,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Message content: a string (one text block) or a list of blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

/// A content block, tagged by `type`. Blocks of a type not listed here (documents, server tool
/// results, …), and listed types whose fields do not fit, are kept whole in [`ContentBlock::Other`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    Text {
        text: String,
        #[serde(flatten)]
        extra: Extra,
    },
    Image {
        source: ImageSource,
        #[serde(flatten)]
        extra: Extra,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
        #[serde(flatten)]
        extra: Extra,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<ToolResultContent>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        is_error: Option<bool>,
        #[serde(flatten)]
        extra: Extra,
    },
    Thinking {
        thinking: String,
        #[serde(default)]
        signature: String,
        #[serde(flatten)]
        extra: Extra,
    },
    RedactedThinking {
        data: String,
        #[serde(flatten)]
        extra: Extra,
    },
    /// Any other block, as received.
    #[serde(untagged)]
    Other(Value),
}

impl ContentBlock {
    /// A `text` block.
    pub fn text(text: impl Into<String>) -> Self {
        ContentBlock::Text {
            text: text.into(),
            extra: Extra::new(),
        }
    }

    /// A `tool_use` block.
    pub fn tool_use(id: impl Into<String>, name: impl Into<String>, input: Value) -> Self {
        ContentBlock::ToolUse {
            id: id.into(),
            name: name.into(),
            input,
            extra: Extra::new(),
        }
    }

    /// The block's `type` as sent on the wire (`"unknown"` for an `Other` without a string type).
    pub fn kind(&self) -> &str {
        match self {
            ContentBlock::Text { .. } => "text",
            ContentBlock::Image { .. } => "image",
            ContentBlock::ToolUse { .. } => "tool_use",
            ContentBlock::ToolResult { .. } => "tool_result",
            ContentBlock::Thinking { .. } => "thinking",
            ContentBlock::RedactedThinking { .. } => "redacted_thinking",
            ContentBlock::Other(v) => v.get("type").and_then(Value::as_str).unwrap_or("unknown"),
        }
    }
}

/// An image block's `source`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 {
        media_type: String,
        data: String,
    },
    Url {
        url: String,
    },
    /// Any other source (for example `file`), as received.
    #[serde(untagged)]
    Other(Value),
}

/// A tool result's `content`: a string or a list of (text and image) blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

impl ToolResultContent {
    /// The text of the result; text blocks are joined with newlines, other blocks are skipped.
    pub fn to_text(&self) -> String {
        match self {
            ToolResultContent::Text(s) => s.clone(),
            ToolResultContent::Blocks(blocks) => join_block_text(blocks, "\n"),
        }
    }
}

/// A client tool the model may call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AnthropicTool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the tool's input (absent, i.e. null, for Anthropic's server tools).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input_schema: Value,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `tool_choice.type`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceKind {
    Auto,
    Any,
    Tool,
    None,
}

/// `tool_choice`: how the model may use the tools.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolChoice {
    #[serde(rename = "type")]
    pub kind: ToolChoiceKind,
    /// The tool to call, for [`ToolChoiceKind::Tool`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_parallel_tool_use: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Request `metadata`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

// ---------------------------------------------------------------------------------------------
// Wire types: response, stream events, errors
// ---------------------------------------------------------------------------------------------

/// A `message` object: the non-streamed response, and the `message` of `message_start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MessagesResponse {
    pub id: String,
    /// Always `"message"`.
    #[serde(rename = "type", default = "message_kind")]
    pub kind: String,
    #[serde(default = "assistant_role")]
    pub role: AnthropicRole,
    #[serde(default)]
    pub content: Vec<ContentBlock>,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
    /// Absent when the upstream reported none (Sluice then counts with its tokenizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<AnthropicUsage>,
    #[serde(flatten)]
    pub extra: Extra,
}

fn message_kind() -> String {
    "message".into()
}

fn assistant_role() -> AnthropicRole {
    AnthropicRole::Assistant
}

/// Token usage of a message. `input_tokens` excludes the cached and cache-writing tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One server-sent event of a streamed response, tagged by `type` (which is also the SSE `event:`
/// name, see [`StreamEvent::name`]). Events of unknown types parse into [`StreamEvent::Other`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: MessagesResponse,
    },
    ContentBlockStart {
        index: u32,
        content_block: ContentBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<DeltaUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: ApiError,
    },
    /// Any other event, as received.
    #[serde(untagged)]
    Other(Value),
}

impl StreamEvent {
    /// The SSE `event:` name, equal to the event's `type` (`"unknown"` for [`StreamEvent::Other`]).
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
            StreamEvent::Ping => "ping",
            StreamEvent::Error { .. } => "error",
            StreamEvent::Other(_) => "unknown",
        }
    }
}

/// The `delta` of a `content_block_delta` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    SignatureDelta {
        signature: String,
    },
    /// Any other delta (for example `citations_delta`), as received.
    #[serde(untagged)]
    Other(Value),
}

/// The `delta` of a `message_delta` event.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MessageDeltaBody {
    #[serde(default)]
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The `usage` of a `message_delta` event. The counts are cumulative for the whole message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeltaUsage {
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The Anthropic error body: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorResponse {
    /// Always `"error"`.
    #[serde(rename = "type", default = "error_kind")]
    pub kind: String,
    pub error: ApiError,
    #[serde(flatten)]
    pub extra: Extra,
}

fn error_kind() -> String {
    "error".into()
}

impl ErrorResponse {
    /// An error body with the given error type and message.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorResponse {
            kind: error_kind(),
            error: ApiError::new(kind, message),
            extra: Extra::new(),
        }
    }

    /// An error body for an HTTP status, typed by [`error_type_for_status`].
    pub fn for_status(status: u16, message: impl Into<String>) -> Self {
        ErrorResponse::new(error_type_for_status(status), message)
    }
}

/// The `error` object of an error body or an `error` stream event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    #[serde(flatten)]
    pub extra: Extra,
}

impl ApiError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            kind: kind.into(),
            message: message.into(),
            extra: Extra::new(),
        }
    }
}

/// The Anthropic error type for an HTTP status, per Anthropic's error documentation: 400
/// `invalid_request_error` (also any other 4xx not listed), 401 `authentication_error`, 402
/// `billing_error`, 403 `permission_error`, 404 `not_found_error`, 409 `conflict_error`, 413
/// `request_too_large`, 429 `rate_limit_error`, 504 `timeout_error`, 529 `overloaded_error`, and
/// `api_error` for 500 and every other status.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The field of an OpenAI-shaped assistant message (and stream delta) that carries Anthropic
/// thinking blocks as they are (`thinking` with its `signature`, `redacted_thinking` with its
/// `data`): Anthropic wants them back unchanged in the next turn of a tool-using conversation with
/// extended thinking, and refuses the turn without them.
pub const THINKING_BLOCKS: &str = "thinking_blocks";

/// The field of the first chunk of a stream from an Anthropic upstream that carries the usage
/// of its `message_start` (the input and cache counts, known from the start), so that a
/// `/v1/messages` client's `message_start` has them too. Only Sluice reads it: it is taken out
/// before a chunk reaches an OpenAI client, the cache or the record.
pub const START_USAGE: &str = "sluice_start_usage";

/// The prompt's usage in a chunk's [`START_USAGE`], in OpenAI's terms (`prompt_tokens` with
/// the cache reads and writes in it and their breakdown; no completion): what an Anthropic
/// upstream counted before it streamed anything, kept for a stream that fails before its final
/// usage, so that the prompt is priced with its cache reads and writes as such.
pub fn start_prompt_usage(chunk: &ChatCompletionChunk) -> Option<Usage> {
    let u = AnthropicUsage::deserialize(chunk.extra.get(START_USAGE)?).ok()?;
    Some(openai_usage(
        u.input_tokens,
        0,
        u.cache_read_input_tokens.unwrap_or(0),
        u.cache_creation_input_tokens.unwrap_or(0),
        one_hour_writes(&u.extra),
    ))
}

/// The field of an OpenAI tool message that says its `tool_result` was an error (`is_error`),
/// so that an Anthropic upstream gets the flag back; OpenAI-type upstreams never see it (their
/// model reads the `"Error: "` the text starts with).
pub const TOOL_IS_ERROR: &str = "is_error";

/// The prefix of an error result's text in an OpenAI tool message.
const ERROR_PREFIX: &str = "Error: ";

/// The field of an OpenAI-shaped request's `extra` that carries a Messages request's top-level
/// fields with no OpenAI counterpart (`thinking`, `cache_control`, `context_management`,
/// `service_tier`, …) and the client's `anthropic-beta` header values (as [`BETAS`]): an
/// Anthropic upstream gets them back as sent; an OpenAI-compatible one never sees them.
pub const ANTHROPIC_FIELDS: &str = "anthropic";

/// Inside [`ANTHROPIC_FIELDS`] (and a translated request's `extra`): the `anthropic-beta` header
/// values the client sent, which go upstream as that header, not in the body.
pub const BETAS: &str = "betas";

/// A prompt-caching breakpoint (`{"type": "ephemeral"}`, with an optional `ttl`): on Anthropic
/// blocks and tools, and on the OpenAI content parts, tools, tool calls and messages that stand for
/// them.
pub const CACHE_CONTROL: &str = "cache_control";

/// Top-level fields an OpenAI-shaped request may carry for an Anthropic upstream outside
/// [`ANTHROPIC_FIELDS`] (the names OpenAI-compatible gateways use for them).
const OPENAI_SHAPED_ANTHROPIC_FIELDS: [&str; 2] = ["thinking", CACHE_CONTROL];

/// Sluice's own per-request cache control (`{"cache": {"no_store": true}}`), on either route.
const SLUICE_CACHE_FIELD: &str = "cache";

/// The Messages request fields Sluice writes itself, never taken from [`ANTHROPIC_FIELDS`].
const TYPED_REQUEST_FIELDS: [&str; 13] = [
    SLUICE_CACHE_FIELD,
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
];

/// The fields of a block that can carry a caching breakpoint; `None` for thinking blocks (cached
/// with the turn around them, never marked themselves).
fn markable_fields(block: &ContentBlock) -> Option<&Extra> {
    match block {
        ContentBlock::Text { extra, .. }
        | ContentBlock::Image { extra, .. }
        | ContentBlock::ToolUse { extra, .. }
        | ContentBlock::ToolResult { extra, .. } => Some(extra),
        ContentBlock::Other(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// [`markable_fields`], to change.
fn markable_fields_mut(block: &mut ContentBlock) -> Option<&mut Extra> {
    match block {
        ContentBlock::Text { extra, .. }
        | ContentBlock::Image { extra, .. }
        | ContentBlock::ToolUse { extra, .. }
        | ContentBlock::ToolResult { extra, .. } => Some(extra),
        ContentBlock::Other(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// A block's caching breakpoint, if it has one.
fn block_cache_control(block: &ContentBlock) -> Option<&Value> {
    markable_fields(block)?
        .get(CACHE_CONTROL)
        .filter(|v| !v.is_null())
}

/// Sets a block's caching breakpoint; `false` for a block that cannot take one.
fn set_block_cache_control(block: &mut ContentBlock, cc: Value) -> bool {
    markable_fields_mut(block)
        .map(|f| f.insert(CACHE_CONTROL.into(), cc))
        .is_some()
}

/// A message-level breakpoint (`cache_control` on an OpenAI message) goes on the last block of
/// that message which can take one.
fn mark_last_block(blocks: &mut [ContentBlock], cc: Option<&Value>) {
    let Some(cc) = cc.filter(|v| !v.is_null()) else {
        return;
    };
    for b in blocks.iter_mut().rev() {
        if set_block_cache_control(b, cc.clone()) {
            return;
        }
    }
}

/// `extra` holding only a breakpoint, when there is one.
fn cache_control_extra(cc: Option<&Value>) -> Extra {
    let mut extra = Extra::new();
    if let Some(cc) = cc.filter(|v| !v.is_null()) {
        extra.insert(CACHE_CONTROL.into(), cc.clone());
    }
    extra
}

/// A text part, with the breakpoint of the block it stands for.
fn text_part(text: &str, cc: Option<&Value>) -> ContentPart {
    let mut part = ContentPart::text(text);
    part.extra = cache_control_extra(cc);
    part
}

/// Where a stored thinking block stood in its turn, when tool calls came before it (interleaved
/// thinking): how many. Left out when none did.
pub const TOOL_CALLS_BEFORE: &str = "tool_calls_before";

/// A thinking block as kept in [`THINKING_BLOCKS`]: the block, with how many tool calls came
/// before it in its turn.
fn stored_thinking(block: &ContentBlock, tool_calls_before: usize) -> Value {
    let mut v = serde_json::to_value(block).unwrap_or(Value::Null);
    if tool_calls_before > 0
        && let Some(o) = v.as_object_mut()
    {
        o.insert(TOOL_CALLS_BEFORE.into(), tool_calls_before.into());
    }
    v
}

/// The thinking blocks kept in an OpenAI-shaped message's `extra`, each with how many tool calls
/// came before it; with `signed_only`, only those Anthropic can take back (signed `thinking`,
/// `redacted_thinking`: one with no signature came from another model, and Anthropic would
/// refuse it).
fn kept_thinking(extra: &Extra, signed_only: bool) -> Vec<(usize, ContentBlock)> {
    let Some(Value::Array(blocks)) = extra.get(THINKING_BLOCKS) else {
        return Vec::new();
    };
    blocks
        .iter()
        .filter_map(|b| {
            let (before, block) = parse_stored_thinking(b)?;
            keeps(&block, signed_only).then_some((before, block))
        })
        .collect()
}

/// Whether a kept thinking block goes (see [`kept_thinking`]).
fn keeps(block: &ContentBlock, signed_only: bool) -> bool {
    match block {
        ContentBlock::Thinking { signature, .. } => !signed_only || !signature.is_empty(),
        ContentBlock::RedactedThinking { .. } => true,
        _ => false,
    }
}

/// A streamed [`THINKING_BLOCKS`] entry's place in the list (not part of the block).
const LIST_INDEX: &str = "index";

/// A block as kept in [`THINKING_BLOCKS`], and how many tool calls came before it.
fn parse_stored_thinking(stored: &Value) -> Option<(usize, ContentBlock)> {
    let mut b = stored.clone();
    let o = b.as_object_mut();
    let before = o
        .and_then(|o| {
            o.shift_remove(LIST_INDEX);
            o.shift_remove(TOOL_CALLS_BEFORE)
        })
        .and_then(|n| n.as_u64())
        .unwrap_or(0) as usize;
    Some((before, serde_json::from_value(b).ok()?))
}

/// An assistant turn in Anthropic's order: thinking that came before any tool call, the text,
/// then each tool call preceded by the thinking that came just before it.
fn in_turn_order<T>(thinking: Vec<(usize, T)>, text: Vec<T>, tool_uses: Vec<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(thinking.len() + text.len() + tool_uses.len());
    let mut thinking = thinking.into_iter().peekable();
    while let Some((_, b)) = thinking.next_if(|(before, _)| *before == 0) {
        out.push(b);
    }
    out.extend(text);
    for (k, tool_use) in tool_uses.into_iter().enumerate() {
        while let Some((_, b)) = thinking.next_if(|(before, _)| *before <= k) {
            out.push(b);
        }
        out.push(tool_use);
    }
    out.extend(thinking.map(|(_, b)| b));
    out
}

/// The order of an Anthropic assistant turn's blocks, kept in an OpenAI-shaped message's `extra`
/// when the default order of [`in_turn_order`] would not give it back (text after a thinking
/// block or a tool call, several text blocks): one entry a block, `"thinking"` (the next of
/// [`THINKING_BLOCKS`]), `"tool_use"` (the next tool call) or a number (a text block of that
/// many bytes of the message's text, or the next text part). Anthropic wants a turn with thinking
/// back exactly as it was made.
pub const BLOCK_ORDER: &str = "block_order";

/// One block of a turn, for [`BLOCK_ORDER`].
enum Placed {
    Text(usize),
    Thinking,
    ToolUse,
}

/// The [`BLOCK_ORDER`] of a turn with these blocks, when the default order would lose it.
fn block_order(blocks: &[ContentBlock]) -> Option<Value> {
    let placed: Vec<Placed> = blocks
        .iter()
        .filter_map(|b| match b {
            ContentBlock::Text { text, .. } => Some(Placed::Text(text.len())),
            ContentBlock::Thinking { .. } | ContentBlock::RedactedThinking { .. } => {
                Some(Placed::Thinking)
            }
            ContentBlock::ToolUse { .. } => Some(Placed::ToolUse),
            _ => None,
        })
        .collect();
    // The order `in_turn_order` gives these blocks (their text in one block).
    let kind = |p: &Placed| match p {
        Placed::Text(_) => 0u8,
        Placed::Thinking => 1,
        Placed::ToolUse => 2,
    };
    let (mut thinking, mut texts, mut tools) = (Vec::new(), 0usize, 0usize);
    for p in &placed {
        match p {
            Placed::Thinking => thinking.push((tools, 1u8)),
            Placed::ToolUse => tools += 1,
            Placed::Text(_) => texts += 1,
        }
    }
    let text = if texts > 0 { vec![0u8] } else { Vec::new() };
    let default = in_turn_order(thinking, text, vec![2u8; tools]);
    let actual: Vec<u8> = placed.iter().map(kind).collect();
    // Several text blocks differ from the default's one too.
    (actual != default).then(|| {
        Value::Array(
            placed
                .iter()
                .map(|p| match p {
                    Placed::Text(n) => Value::from(*n),
                    Placed::Thinking => Value::from("thinking"),
                    Placed::ToolUse => Value::from("tool_use"),
                })
                .collect(),
        )
    })
}

/// A turn's blocks in its [`BLOCK_ORDER`]: the text taken from `text` (cut at the given byte
/// lengths) or from `parts` (one part a text entry, with its breakpoint), each thinking block
/// from `thinking` in turn (`None`: one left out, an unsigned block for Anthropic) and each tool
/// call from `tool_uses`. `None` when the order does not fit what the message holds (a client
/// changed it): the caller falls back to [`in_turn_order`]. Text of whitespace alone is left out,
/// as Anthropic refuses it.
fn in_block_order(
    order: &Value,
    text: TextSource<'_>,
    thinking: Vec<Option<ContentBlock>>,
    tool_uses: Vec<ContentBlock>,
) -> Option<Vec<ContentBlock>> {
    let order = order.as_array()?;
    let mut out = Vec::with_capacity(order.len());
    let mut thinking = thinking.into_iter();
    let mut tool_uses = tool_uses.into_iter();
    let mut at = 0usize;
    let mut parts = match text {
        TextSource::Parts(p) => Some(p.iter()),
        TextSource::Text(_) => None,
    };
    // Whitespace of a block of its own goes with the next text; before anything else, or at the
    // end, it is left out.
    let mut held = String::new();
    for entry in order {
        match entry {
            Value::String(k) if k == "thinking" => {
                held.clear();
                if let Some(b) = thinking.next()? {
                    out.push(b);
                }
            }
            Value::String(k) if k == "tool_use" => {
                held.clear();
                out.push(tool_uses.next()?);
            }
            Value::Number(n) => {
                let len = usize::try_from(n.as_u64()?).ok()?;
                let mut block = match (&mut parts, text) {
                    (Some(parts), _) => {
                        let p = parts.next()?;
                        let t = p.text.as_deref()?;
                        (t.len() == len).then(|| ContentBlock::Text {
                            text: t.to_string(),
                            extra: cache_control_extra(p.extra.get(CACHE_CONTROL)),
                        })?
                    }
                    (None, TextSource::Text(s)) => {
                        let piece = s.get(at..at.checked_add(len)?)?;
                        at += len;
                        ContentBlock::text(piece)
                    }
                    (None, TextSource::Parts(_)) => return None,
                };
                if let ContentBlock::Text { text, .. } = &mut block {
                    if text.trim().is_empty() {
                        held.push_str(text);
                        continue;
                    }
                    if !held.is_empty() {
                        text.insert_str(0, &std::mem::take(&mut held));
                    }
                }
                out.push(block);
            }
            _ => return None,
        }
    }
    let text_used = match (parts, text) {
        (Some(mut rest), _) => rest.next().is_none(),
        (None, TextSource::Text(s)) => at == s.len(),
        (None, TextSource::Parts(_)) => false,
    };
    (text_used && thinking.next().is_none() && tool_uses.next().is_none()).then_some(out)
}

/// Where [`in_block_order`] takes a turn's text from.
#[derive(Clone, Copy)]
enum TextSource<'a> {
    Text(&'a str),
    Parts(&'a [ContentPart]),
}

impl<'a> TextSource<'a> {
    fn of(content: Option<&'a Content>) -> Self {
        match content {
            Some(Content::Parts(p)) => TextSource::Parts(p),
            Some(Content::Text(s)) => TextSource::Text(s),
            None => TextSource::Text(""),
        }
    }
}

/// Every thinking block kept in an OpenAI-shaped message's `extra`, in order; with
/// `signed_only`, `None` in place of those Anthropic cannot take back (see [`kept_thinking`]).
fn thinking_in_order(extra: &Extra, signed_only: bool) -> Vec<Option<ContentBlock>> {
    let Some(Value::Array(blocks)) = extra.get(THINKING_BLOCKS) else {
        return Vec::new();
    };
    blocks
        .iter()
        .map(|b| {
            let (_, block) = parse_stored_thinking(b)?;
            keeps(&block, signed_only).then_some(block)
        })
        .collect()
}

fn err(msg: impl Into<String>) -> TranslateError {
    TranslateError::unsupported(msg)
}

fn invalid(msg: impl Into<String>) -> TranslateError {
    TranslateError::invalid(msg)
}

fn join_block_text(blocks: &[ContentBlock], sep: &str) -> String {
    let mut out = String::new();
    for b in blocks {
        if let ContentBlock::Text { text, .. } = b {
            if !out.is_empty() {
                out.push_str(sep);
            }
            out.push_str(text);
        }
    }
    out
}

fn fresh_id(prefix: &str) -> String {
    format!("{prefix}{}", new_request_id().simple())
}

/// An Anthropic-looking message id: kept when it already starts with `msg_`, else prefixed.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_string()
    } else if id.is_empty() {
        fresh_id("msg_")
    } else {
        format!("msg_{id}")
    }
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
fn finish_reason_for(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// How [`StreamDecoder`] words an `error` event: this prefix, the error's type, `): `, its message.
pub const STREAM_ERROR_PREFIX: &str = "Anthropic stream error (";

/// The type of an `error` event, from the message [`StreamDecoder`] made of it.
pub fn stream_error_kind(message: &str) -> Option<&str> {
    message
        .strip_prefix(STREAM_ERROR_PREFIX)
        .and_then(|rest| rest.split_once("): "))
        .map(|(kind, _)| kind)
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`. A plain stop with tool calls in the answer
/// becomes `tool_use`, since Anthropic clients run tools on that reason.
fn stop_reason_for(finish_reason: Option<&str>, has_tool_use: bool) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("content_filter") => "refusal",
        Some("tool_calls" | "function_call") => "tool_use",
        _ if has_tool_use => "tool_use",
        _ => "end_turn",
    }
}

/// The choice field that names the stop sequence a completion ended on. vLLM's OpenAI server
/// sends the same field, so an Anthropic client gets `stop_reason: "stop_sequence"` from either.
const STOP_SEQUENCE_FIELD: &str = "stop_reason";

/// The stop sequence an OpenAI choice says it ended on, if it ended on one.
fn matched_stop_sequence<'a>(finish_reason: Option<&str>, extra: &'a Extra) -> Option<&'a str> {
    match (finish_reason, extra.get(STOP_SEQUENCE_FIELD)) {
        (Some("stop"), Some(Value::String(s))) => Some(s.as_str()),
        _ => None,
    }
}

/// A tool call's id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): ids from other servers (Kimi's
/// `functions.get_weather:0`) have every other character replaced by `_` and a hash of the whole
/// id appended, so that the call and its result, translated alike, still match, and two ids that
/// differ only in such characters stay apart. Ids Anthropic takes are kept as they are.
fn anthropic_tool_id(id: &str) -> String {
    let fits = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(fits) {
        return id.to_string();
    }
    // FNV-1a: the same on every replica and every version.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let kept: String = id.chars().map(|c| if fits(c) { c } else { '_' }).collect();
    format!("{kept}_{hash:016x}")
}

/// OpenAI usage from Anthropic's counts: the prompt includes cache reads and cache writes (of
/// which `written_for_an_hour` at the one-hour price, when Anthropic gave the breakdown).
fn openai_usage(
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
    written_for_an_hour: Option<u64>,
) -> Usage {
    let prompt = input
        .saturating_add(cache_read)
        .saturating_add(cache_creation);
    let mut usage = Usage::new(prompt, output, cache_read);
    usage.set_cache_write_tokens(cache_creation);
    if let Some(n) = written_for_an_hour {
        usage.set_cache_write_1h_tokens(n.min(cache_creation));
    }
    usage
}

/// The `cache_creation` breakdown of Anthropic usage: the tokens written for an hour.
fn one_hour_writes(usage_extra: &Extra) -> Option<u64> {
    usage_extra
        .get(CACHE_CREATION)?
        .get("ephemeral_1h_input_tokens")?
        .as_u64()
}

/// Anthropic usage's breakdown of the cache writes by lifetime.
const CACHE_CREATION: &str = "cache_creation";

/// The `cache_creation` breakdown for a `/v1/messages` client, when the upstream gave one.
fn cache_creation_extra(u: &Usage) -> Extra {
    let mut extra = Extra::new();
    let writes = u.cache_write_tokens();
    if writes > 0 && u.cache_write_1h_reported() {
        let hour = u.cache_write_1h_tokens().min(writes);
        extra.insert(
            CACHE_CREATION.into(),
            json!({"ephemeral_5m_input_tokens": writes - hour, "ephemeral_1h_input_tokens": hour}),
        );
    }
    extra
}

/// Anthropic's `input_tokens` (those neither read from nor written to the cache), cache reads
/// and cache writes, from OpenAI usage.
fn anthropic_input(u: &Usage) -> (u64, u64, u64) {
    let cached = u.cached_tokens();
    let writes = u.cache_write_tokens();
    let input = u
        .prompt_tokens
        .saturating_sub(cached)
        .saturating_sub(writes);
    (input, cached, writes)
}

// ---------------------------------------------------------------------------------------------
// Egress: OpenAI request → Anthropic, Anthropic response/stream → OpenAI
// ---------------------------------------------------------------------------------------------

/// Translates an OpenAI chat request into an Anthropic Messages request.
///
/// System and developer messages are joined into `system`; tool messages become `tool_result`
/// blocks in user messages; consecutive messages of the same role are merged (Anthropic requires
/// alternation), with tool results first in a merged user message. `cache_control` on a content
/// part, tool, tool call or message becomes a breakpoint on the matching block or tool (a
/// message's on its last block; a tool message's on its `tool_result`; any on a system message
/// makes `system` a list of blocks); the top-level fields of [`anthropic_fields`] are kept.
/// Other OpenAI-only fields are dropped. Fails on `n > 1`, OpenAI's legacy `functions` and
/// `function_call`, audio output, `web_search_options`, tool-call arguments that are not a JSON
/// object, tool messages without `tool_call_id`, and content or tools Anthropic cannot take.
pub fn request_from_openai(req: &ChatRequest) -> Result<MessagesRequest, TranslateError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(err("n > 1 is not supported by Anthropic models"));
    }
    if let Some(kind) = req
        .response_format
        .as_ref()
        .and_then(|rf| rf.get("type"))
        .and_then(Value::as_str)
        .filter(|k| *k != "text")
    {
        return Err(err(format!(
            "response_format `{kind}` is not supported by Anthropic models (describe the JSON in the prompt, or use a tool with an input_schema)"
        )));
    }
    let set = |field: &str| req.extra.get(field).is_some_and(|v| !v.is_null());
    for field in ["functions", "function_call"] {
        if set(field) {
            return Err(err(format!(
                "`{field}` (OpenAI's legacy function calling) is not supported for Anthropic models; use `tools` and `tool_choice`"
            )));
        }
    }
    let audio_out = req
        .extra
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|m| m == "audio"));
    if audio_out || set("audio") {
        return Err(err("audio output is not supported by Anthropic models"));
    }
    if set("web_search_options") {
        return Err(err(
            "`web_search_options` is not supported for Anthropic models (give the request Anthropic's web search tool instead)",
        ));
    }

    let mut system: Vec<String> = Vec::new();
    // The system prompt as blocks, used when one of them is a caching breakpoint.
    let mut system_blocks: Vec<ContentBlock> = Vec::new();
    let mut messages: Vec<AnthropicMessage> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => {
                let text = m.text_content();
                if !text.is_empty() {
                    system.push(text);
                }
                let mut blocks = text_part_blocks(m);
                mark_last_block(&mut blocks, m.extra.get(CACHE_CONTROL));
                system_blocks.extend(blocks);
            }
            Role::User => {
                let mut blocks = user_blocks(m.content.as_ref(), i)?;
                mark_last_block(&mut blocks, m.extra.get(CACHE_CONTROL));
                push_blocks(&mut messages, AnthropicRole::User, blocks);
            }
            Role::Assistant => {
                let blocks = assistant_blocks(m, i)?;
                push_blocks(&mut messages, AnthropicRole::Assistant, blocks);
            }
            Role::Tool => {
                let tool_use_id = m
                    .tool_call_id
                    .as_deref()
                    .filter(|id| !id.is_empty())
                    .map(anthropic_tool_id)
                    .ok_or_else(|| {
                        invalid(format!("messages[{i}]: tool message has no tool_call_id"))
                    })?;
                // Anthropic takes a breakpoint on the `tool_result` block, not inside it.
                let mut cc = m.extra.get(CACHE_CONTROL).filter(|v| !v.is_null()).cloned();
                let is_error = m.extra.get(TOOL_IS_ERROR) == Some(&Value::Bool(true));
                let content = match &m.content {
                    None => None,
                    // The flag says it: the prefix the text got for OpenAI-type models goes.
                    Some(Content::Text(s)) if is_error => Some(ToolResultContent::Text(
                        s.strip_prefix(ERROR_PREFIX).unwrap_or(s).to_string(),
                    )),
                    Some(Content::Text(s)) => Some(ToolResultContent::Text(s.clone())),
                    Some(Content::Parts(parts)) => {
                        let mut blocks = Vec::new();
                        for p in parts {
                            blocks.extend(part_to_block(p, i)?);
                        }
                        for b in &mut blocks {
                            if let Some(inner) = take_block_cache_control(b) {
                                cc.get_or_insert(inner);
                            }
                        }
                        Some(ToolResultContent::Blocks(blocks))
                    }
                };
                let mut block = ContentBlock::ToolResult {
                    tool_use_id,
                    content,
                    is_error: is_error.then_some(true),
                    extra: Extra::new(),
                };
                if let Some(cc) = cc {
                    set_block_cache_control(&mut block, cc);
                }
                push_blocks(&mut messages, AnthropicRole::User, vec![block]);
            }
            Role::Function => {
                return Err(err(format!(
                    "messages[{i}]: legacy function messages are not supported by Anthropic \
                     models; use tool messages"
                )));
            }
        }
    }
    for m in &mut messages {
        if m.role == AnthropicRole::User
            && let MessageContent::Blocks(blocks) = &mut m.content
        {
            // Anthropic wants the tool results first in a user message.
            let (mut results, rest): (Vec<_>, Vec<_>) = std::mem::take(blocks)
                .into_iter()
                .partition(|b| matches!(b, ContentBlock::ToolResult { .. }));
            results.extend(rest);
            *blocks = results;
        }
    }

    let tools = match req.tools.as_deref() {
        Some(tools) if !tools.is_empty() => Some(
            tools
                .iter()
                .map(tool_from_openai)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let parallel_disabled = req
        .extra
        .get("parallel_tool_calls")
        .and_then(Value::as_bool)
        == Some(false);
    let tool_choice = if tools.is_some() {
        tool_choice_from_openai(req.tool_choice.as_ref(), parallel_disabled)?
    } else {
        None
    };

    // Anthropic refuses stop sequences of whitespace alone (`"\n"`): they are left out.
    let stop: Vec<String> = req
        .stop_sequences()
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .collect();

    let system = if system_blocks
        .iter()
        .any(|b| block_cache_control(b).is_some())
    {
        Some(SystemPrompt::Blocks(system_blocks))
    } else {
        (!system.is_empty()).then(|| SystemPrompt::Text(system.join("\n\n")))
    };
    if messages.is_empty() {
        // Anthropic answers a bare `messages: []` with a 400 that names nothing the client sent.
        return Err(err(
            "Anthropic models need a user or assistant message with content, and this request has none (only a system prompt, or only empty text)",
        ));
    }
    let extra = anthropic_fields(req)?;
    let max_tokens = req
        .max_output_tokens()
        .unwrap_or_else(|| default_max_tokens(&extra));
    Ok(MessagesRequest {
        model: req.model.clone(),
        messages,
        max_tokens,
        system,
        stop_sequences: (!stop.is_empty()).then_some(stop),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req
            .extra
            .get("top_k")
            .and_then(Value::as_u64)
            .and_then(|k| u32::try_from(k).ok()),
        stream: req.stream,
        tools,
        tool_choice,
        metadata: req.user.as_ref().map(|u| RequestMetadata {
            user_id: Some(u.clone()),
            extra: Extra::new(),
        }),
        extra,
    })
}

/// The output-token cap Anthropic gets for a request without one: [`DEFAULT_MAX_TOKENS`], on top
/// of the thinking budget when there is one (Anthropic wants `max_tokens` above it). `fields` are
/// the request's Anthropic fields ([`anthropic_fields`]).
fn default_max_tokens(fields: &Extra) -> u32 {
    let budget = fields
        .get("thinking")
        .and_then(|t| t.get("budget_tokens"))
        .and_then(Value::as_u64)
        .map(|b| u32::try_from(b).unwrap_or(u32::MAX));
    budget.map_or(DEFAULT_MAX_TOKENS, |b| b.saturating_add(DEFAULT_MAX_TOKENS))
}

/// The most an Anthropic deployment may be asked to generate for a request without a cap of its
/// own, when the request enables thinking: its budget and [`DEFAULT_MAX_TOKENS`] (for worst-case
/// budget checks); `None` when it does not.
pub fn thinking_cap(req: &ChatRequest) -> Option<u32> {
    let fields = anthropic_fields(req).ok()?;
    fields
        .contains_key("thinking")
        .then(|| default_max_tokens(&fields))
}

/// Keeps a `/v1/messages` client's `anthropic-beta` header values (each may list several, comma
/// separated) on its translated request, for an Anthropic upstream.
pub fn set_betas<'a>(req: &mut ChatRequest, header_values: impl IntoIterator<Item = &'a str>) {
    let betas: Vec<Value> = header_values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| Value::String(b.to_string()))
        .collect();
    if betas.is_empty() {
        return;
    }
    let fields = req
        .extra
        .entry(ANTHROPIC_FIELDS)
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(o) = fields {
        o.insert(BETAS.into(), Value::Array(betas));
    }
}

/// The top-level Messages fields an OpenAI-shaped request carries for Anthropic: `thinking` and
/// `cache_control` as OpenAI-compatible gateways name them, then whatever [`ANTHROPIC_FIELDS`]
/// holds (a `/v1/messages` client's own fields, which win), less the fields Sluice writes; and
/// without a `thinking` of its own, the one its `reasoning_effort` stands for
/// ([`ChatRequest::reasoning_budget`]).
fn anthropic_fields(req: &ChatRequest) -> Result<Extra, TranslateError> {
    let mut out = Extra::new();
    for name in OPENAI_SHAPED_ANTHROPIC_FIELDS {
        if let Some(v) = req.extra.get(name).filter(|v| !v.is_null()) {
            out.insert(name.into(), v.clone());
        }
    }
    match req.extra.get(ANTHROPIC_FIELDS) {
        None | Some(Value::Null) => {}
        Some(Value::Object(fields)) => {
            for (k, v) in fields {
                if !TYPED_REQUEST_FIELDS.contains(&k.as_str()) {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        Some(_) => {
            return Err(invalid(format!(
                "`{ANTHROPIC_FIELDS}` must be an object of Messages API fields"
            )));
        }
    }
    if !out.contains_key("thinking")
        && let Some(budget) = req.reasoning_budget().map_err(invalid)?
        && thinking_fits(req)
    {
        // OpenAI's output cap counts the reasoning too, and Anthropic wants `max_tokens` above
        // the budget: the budget fits under the client's cap, and without room for Anthropic's
        // least budget there is no thinking (as for `none`).
        let budget = match req.max_output_tokens() {
            Some(cap) => budget.min(cap.saturating_sub(1)),
            None => budget,
        };
        if budget >= MIN_THINKING_BUDGET {
            out.insert(
                "thinking".into(),
                json!({"type": "enabled", "budget_tokens": budget}),
            );
        }
    }
    Ok(out)
}

/// The least thinking budget Anthropic takes, in tokens.
const MIN_THINKING_BUDGET: u32 = 1024;

/// Whether Anthropic takes extended thinking with the rest of this request: not with a
/// `temperature` other than 1, a `top_p` below 0.95, `top_k` or a forced tool choice, nor after
/// an assistant turn that
/// called tools without the thinking blocks Anthropic signed for it (an OpenAI client's agent
/// loop). Where it does not, `reasoning_effort` turns no thinking on, rather than making a
/// request that worked a refused one.
fn thinking_fits(req: &ChatRequest) -> bool {
    let forced = match &req.tool_choice {
        Some(Value::String(s)) => s == "required",
        Some(Value::Object(_)) => true,
        _ => false,
    };
    req.temperature.is_none_or(|t| t == 1.0)
        && req.top_p.is_none_or(|p| p >= 0.95)
        && !req.extra.contains_key("top_k")
        && !forced
        && !req.messages.iter().any(|m| {
            m.role == Role::Assistant
                && m.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
                && kept_thinking(&m.extra, true).is_empty()
        })
}

/// A message's text as text blocks, each text part with its breakpoint; blank text left out.
fn text_part_blocks(m: &Message) -> Vec<ContentBlock> {
    match &m.content {
        None => Vec::new(),
        Some(Content::Text(s)) if s.trim().is_empty() => Vec::new(),
        Some(Content::Text(s)) => vec![ContentBlock::text(s.clone())],
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter_map(|p| {
                let text = p.text.as_deref().filter(|t| !t.trim().is_empty())?;
                Some(ContentBlock::Text {
                    text: text.to_string(),
                    extra: cache_control_extra(p.extra.get(CACHE_CONTROL)),
                })
            })
            .collect(),
    }
}

/// Removes a block's breakpoint and returns it.
fn take_block_cache_control(block: &mut ContentBlock) -> Option<Value> {
    markable_fields_mut(block)?
        .shift_remove(CACHE_CONTROL)
        .filter(|v| !v.is_null())
}

/// Appends blocks to the last message when it has the same role, else starts a new message.
fn push_blocks(
    messages: &mut Vec<AnthropicMessage>,
    role: AnthropicRole,
    blocks: Vec<ContentBlock>,
) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut()
        && last.role == role
    {
        match &mut last.content {
            MessageContent::Blocks(existing) => existing.extend(blocks),
            MessageContent::Text(text) => {
                let mut merged = vec![ContentBlock::text(std::mem::take(text))];
                merged.extend(blocks);
                last.content = MessageContent::Blocks(merged);
            }
        }
        return;
    }
    messages.push(AnthropicMessage {
        role,
        content: MessageContent::Blocks(blocks),
        extra: Extra::new(),
    });
}

fn user_blocks(content: Option<&Content>, i: usize) -> Result<Vec<ContentBlock>, TranslateError> {
    match content {
        None => Ok(Vec::new()),
        // Anthropic refuses text blocks of whitespace alone.
        Some(Content::Text(s)) if s.trim().is_empty() => Ok(Vec::new()),
        Some(Content::Text(s)) => Ok(vec![ContentBlock::text(s.clone())]),
        Some(Content::Parts(parts)) => {
            let mut blocks = Vec::new();
            for p in parts {
                blocks.extend(part_to_block(p, i)?);
            }
            Ok(blocks)
        }
    }
}

/// One OpenAI content part as an Anthropic block (`None` for empty text), with the part's
/// caching breakpoint.
fn part_to_block(part: &ContentPart, i: usize) -> Result<Option<ContentBlock>, TranslateError> {
    let mut block = part_block(part, i)?;
    if let (Some(b), Some(cc)) = (
        block.as_mut(),
        part.extra.get(CACHE_CONTROL).filter(|v| !v.is_null()),
    ) {
        set_block_cache_control(b, cc.clone());
    }
    Ok(block)
}

fn part_block(part: &ContentPart, i: usize) -> Result<Option<ContentBlock>, TranslateError> {
    match part.kind.as_str() {
        "text" => Ok(part
            .text
            .as_ref()
            .filter(|t| !t.trim().is_empty())
            .map(|t| ContentBlock::text(t.clone()))),
        "image_url" => {
            let url = part
                .image_url
                .as_ref()
                .map(|u| u.url.as_str())
                .ok_or_else(|| invalid(format!("messages[{i}]: image_url part has no url")))?;
            Ok(Some(ContentBlock::Image {
                source: image_source(url, i)?,
                extra: Extra::new(),
            }))
        }
        "file" => {
            let data_url = part
                .extra
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    err(format!(
                        "messages[{i}]: only file parts with inline file_data are supported by \
                         Anthropic models"
                    ))
                })?;
            let (media_type, data) = parse_data_url(data_url).ok_or_else(|| {
                invalid(format!("messages[{i}]: file_data is not a base64 data URL"))
            })?;
            let mut doc = json!({
                "type": "document",
                "source": {"type": "base64", "media_type": media_type, "data": data}
            });
            // A file's name is the document's title, unless it is the one Sluice gave a
            // document without a title.
            if let Some(name) = part
                .extra
                .get("file")
                .and_then(|f| f.get("filename"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty() && *n != DEFAULT_DOCUMENT_NAME)
            {
                doc["title"] = Value::String(name.to_string());
            }
            Ok(Some(ContentBlock::Other(doc)))
        }
        other => Err(err(format!(
            "messages[{i}]: content part type `{other}` is not supported by Anthropic models"
        ))),
    }
}

/// The file name an OpenAI `file` part gets for a document without a `title`.
const DEFAULT_DOCUMENT_NAME: &str = "document.pdf";

fn image_source(url: &str, i: usize) -> Result<ImageSource, TranslateError> {
    if url.starts_with("data:") {
        let (media_type, data) = parse_data_url(url).ok_or_else(|| {
            invalid(format!(
                "messages[{i}]: image data URL must be base64 with a media type"
            ))
        })?;
        Ok(ImageSource::Base64 { media_type, data })
    } else if url.starts_with("https://") || url.starts_with("http://") {
        Ok(ImageSource::Url {
            url: url.to_string(),
        })
    } else {
        Err(invalid(format!(
            "messages[{i}]: image URL must be a data: or http(s): URL"
        )))
    }
}

/// Splits `data:<media type>[;params];base64,<data>` into media type and data.
fn parse_data_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("data:")?;
    let (header, data) = rest.split_once(',')?;
    let mut params = header.split(';');
    let media_type = params.next()?.trim();
    if media_type.is_empty() || !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return None;
    }
    Some((media_type.to_string(), data.to_string()))
}

fn assistant_blocks(m: &Message, i: usize) -> Result<Vec<ContentBlock>, TranslateError> {
    let mut text_blocks = Vec::new();
    match &m.content {
        // Text parts with a breakpoint stay blocks of their own, so the mark keeps its place.
        Some(Content::Parts(parts))
            if parts
                .iter()
                .any(|p| p.extra.get(CACHE_CONTROL).is_some_and(|v| !v.is_null())) =>
        {
            text_blocks = text_part_blocks(m);
        }
        _ => {
            let text = m.text_content();
            if !text.trim().is_empty() {
                text_blocks.push(ContentBlock::text(text));
            }
        }
    }
    let mut blocks = Vec::new();
    for tc in m.tool_calls.iter().flatten() {
        let input = parse_tool_arguments(&tc.function.arguments).map_err(|why| {
            invalid(format!(
                "messages[{i}]: tool call `{}` ({}) has invalid arguments: {why}",
                tc.id, tc.function.name
            ))
        })?;
        blocks.push(ContentBlock::ToolUse {
            id: anthropic_tool_id(&tc.id),
            name: tc.function.name.clone(),
            input,
            extra: cache_control_extra(tc.extra.get(CACHE_CONTROL)),
        });
    }
    // In the turn's own order when it came from Anthropic; else thinking first, interleaved
    // thinking before the tool call it came before.
    let mut out = match m.extra.get(BLOCK_ORDER).and_then(|order| {
        in_block_order(
            order,
            TextSource::of(m.content.as_ref()),
            thinking_in_order(&m.extra, true),
            blocks.clone(),
        )
    }) {
        Some(out) => out,
        None => in_turn_order(kept_thinking(&m.extra, true), text_blocks, blocks),
    };
    mark_last_block(&mut out, m.extra.get(CACHE_CONTROL));
    Ok(out)
}

/// Parses OpenAI tool-call arguments into an Anthropic `input` object (empty or `null` → `{}`).
fn parse_tool_arguments(raw: &str) -> Result<Value, String> {
    if raw.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(Value::Null) => Ok(Value::Object(Map::new())),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("not valid JSON ({e})")),
    }
}

fn tool_from_openai(tool: &Tool) -> Result<AnthropicTool, TranslateError> {
    if tool.kind != "function" {
        return Err(err(format!(
            "tool type `{}` is not supported by Anthropic models",
            tool.kind
        )));
    }
    let mut input_schema = tool
        .function
        .parameters
        .clone()
        .filter(|p| !p.is_null())
        .unwrap_or_else(|| json!({"type": "object"}));
    if let Value::Object(schema) = &mut input_schema
        && !schema.contains_key("type")
    {
        schema.insert("type".into(), Value::String("object".into()));
    }
    let mut extra = cache_control_extra(tool.extra.get(CACHE_CONTROL));
    // The tool's own Messages fields (`strict`, `input_examples`, `defer_loading`, …), as the
    // client sent them.
    if let Some(Value::Object(fields)) = tool.extra.get(ANTHROPIC_FIELDS) {
        for (k, v) in fields {
            extra.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    Ok(AnthropicTool {
        name: tool.function.name.clone(),
        description: tool.function.description.clone(),
        input_schema,
        extra,
    })
}

fn tool_choice_from_openai(
    choice: Option<&Value>,
    parallel_disabled: bool,
) -> Result<Option<ToolChoice>, TranslateError> {
    let (kind, name) = match choice {
        None | Some(Value::Null) => {
            if !parallel_disabled {
                return Ok(None);
            }
            (ToolChoiceKind::Auto, None)
        }
        Some(Value::String(s)) => match s.as_str() {
            "auto" => (ToolChoiceKind::Auto, None),
            "required" => (ToolChoiceKind::Any, None),
            "none" => (ToolChoiceKind::None, None),
            other => return Err(invalid(format!("unknown tool_choice `{other}`"))),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => (ToolChoiceKind::Tool, Some(name.to_string())),
                _ => {
                    return Err(err(
                        "tool_choice must be \"auto\", \"required\", \"none\" or \
                         {\"type\": \"function\", \"function\": {\"name\": …}} for Anthropic models",
                    ));
                }
            }
        }
        Some(_) => return Err(invalid("tool_choice must be a string or an object")),
    };
    Ok(Some(ToolChoice {
        kind,
        name,
        disable_parallel_tool_use: (parallel_disabled && kind != ToolChoiceKind::None)
            .then_some(true),
        extra: Extra::new(),
    }))
}

/// Translates an Anthropic response into an OpenAI `chat.completion`.
///
/// Text blocks are concatenated into `content`, `tool_use` blocks become `tool_calls`, thinking
/// text goes to the message's `extra` as `reasoning_content`, and usage counts cache reads and
/// writes as prompt tokens (cache reads also as cached tokens).
pub fn response_to_openai(resp: MessagesResponse) -> ChatCompletion {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    let mut thinking_blocks = Vec::new();
    let order = block_order(&resp.content);
    for block in resp.content {
        if matches!(
            block,
            ContentBlock::Thinking { .. } | ContentBlock::RedactedThinking { .. }
        ) {
            thinking_blocks.push(stored_thinking(&block, tool_calls.len()));
        }
        match block {
            ContentBlock::Text { text: t, .. } => text.push_str(&t),
            ContentBlock::ToolUse {
                id, name, input, ..
            } => tool_calls.push(ToolCall {
                id,
                kind: "function".into(),
                function: FunctionCall {
                    name,
                    arguments: arguments_json(&input),
                },
                extra: Extra::new(),
            }),
            ContentBlock::Thinking { thinking, .. } => reasoning.push_str(&thinking),
            _ => {}
        }
    }
    let mut message_extra = Extra::new();
    if !reasoning.is_empty() {
        message_extra.insert("reasoning_content".into(), Value::String(reasoning));
    }
    if !thinking_blocks.is_empty() {
        message_extra.insert(THINKING_BLOCKS.into(), Value::Array(thinking_blocks));
    }
    if let Some(order) = order {
        message_extra.insert(BLOCK_ORDER.into(), order);
    }
    let usage = resp.usage.as_ref().map(|u| {
        openai_usage(
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens.unwrap_or(0),
            u.cache_creation_input_tokens.unwrap_or(0),
            one_hour_writes(&u.extra),
        )
    });
    ChatCompletion {
        id: resp.id,
        object: "chat.completion".into(),
        created: unix_now(),
        model: resp.model,
        choices: vec![Choice {
            index: 0,
            message: ResponseMessage {
                role: Role::Assistant,
                content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                refusal: None,
                extra: message_extra,
            },
            finish_reason: resp
                .stop_reason
                .as_deref()
                .map(|r| finish_reason_for(r).to_string()),
            logprobs: None,
            extra: stop_extra(resp.stop_reason.as_deref(), resp.stop_sequence),
        }],
        usage,
        system_fingerprint: None,
        extra: Extra::new(),
    }
}

/// The choice's extra fields that carry the stop sequence the message ended on, and Anthropic's
/// stop reason where OpenAI's `finish_reason` cannot say it ([`UPSTREAM_STOP_REASON`]).
fn stop_extra(stop_reason: Option<&str>, stop_sequence: Option<String>) -> Extra {
    let mut extra = Extra::new();
    if let Some(s) = stop_sequence {
        extra.insert(STOP_SEQUENCE_FIELD.into(), Value::String(s));
    }
    if let Some(r) = stop_reason.filter(|r| {
        !matches!(
            *r,
            "end_turn" | "stop_sequence" | "max_tokens" | "tool_use" | "refusal"
        )
    }) {
        extra.insert(UPSTREAM_STOP_REASON.into(), Value::String(r.to_string()));
    }
    extra
}

/// The choice field that keeps an Anthropic stop reason OpenAI's `finish_reason` has no word for
/// (`pause_turn`: a server tool's long turn paused, to be continued by sending the answer back;
/// `model_context_window_exceeded`), so that a `/v1/messages` client gets it as sent. OpenAI
/// clients see it beside the nearest `finish_reason` (`stop`, `length`).
pub const UPSTREAM_STOP_REASON: &str = "anthropic_stop_reason";

/// The Anthropic stop reason an OpenAI choice keeps ([`UPSTREAM_STOP_REASON`]).
fn upstream_stop_reason(extra: &Extra) -> Option<&str> {
    extra.get(UPSTREAM_STOP_REASON).and_then(Value::as_str)
}

/// Compact JSON of a tool input, `{}` when absent.
fn arguments_json(input: &Value) -> String {
    if input.is_null() {
        "{}".into()
    } else {
        input.to_string()
    }
}

/// Translates Anthropic stream events into OpenAI `chat.completion.chunk`s (egress streaming).
///
/// Every chunk carries the message id and model from `message_start` and one `created` taken when
/// the decoder is made. The last chunk (on `message_stop`) has no choices and carries the usage;
/// callers drop it when the client did not ask for stream usage.
#[derive(Debug)]
pub struct StreamDecoder {
    id: String,
    model: String,
    created: u64,
    input_tokens: u64,
    output_tokens: u64,
    cache_read: u64,
    cache_creation: u64,
    /// Of the cache writes, those kept an hour (when the stream gave the breakdown).
    cache_creation_1h: Option<u64>,
    /// Content-block index → OpenAI tool-call index, and whether any of its arguments were sent.
    tool_blocks: HashMap<u32, (u32, bool)>,
    /// Content-block index → the thinking block so far (its text and signature), sent whole as a
    /// [`THINKING_BLOCKS`] delta when it stops.
    thinking_blocks: HashMap<u32, (String, String)>,
    /// Thinking blocks sent so far: each one's `index` in the [`THINKING_BLOCKS`] list.
    thinking_sent: u32,
    /// Content blocks of kinds OpenAI's shape has no place for (Anthropic's server tools:
    /// `server_tool_use`, `mcp_tool_use`, their results): their deltas are passed over.
    other_blocks: std::collections::HashSet<u32>,
    stopped: bool,
    /// Whether the stream reported any usage (absent usage is not zero usage).
    saw_usage: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            id: String::new(),
            model: String::new(),
            created: unix_now(),
            input_tokens: 0,
            output_tokens: 0,
            cache_read: 0,
            cache_creation: 0,
            cache_creation_1h: None,
            tool_blocks: HashMap::new(),
            thinking_blocks: HashMap::new(),
            thinking_sent: 0,
            other_blocks: std::collections::HashSet::new(),
            stopped: false,
            saw_usage: false,
        }
    }

    /// The usage accumulated so far, in OpenAI's terms.
    pub fn usage(&self) -> Usage {
        openai_usage(
            self.input_tokens,
            self.output_tokens,
            self.cache_read,
            self.cache_creation,
            self.cache_creation_1h,
        )
    }

    /// Translates one event into zero or more chunks. An `error` event becomes an `Err` holding
    /// its type and message; a delta for a block that was never started is an error too.
    pub fn on_event(
        &mut self,
        ev: StreamEvent,
    ) -> Result<Vec<ChatCompletionChunk>, TranslateError> {
        let mut out = Vec::new();
        match ev {
            StreamEvent::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                let start_usage = message
                    .usage
                    .as_ref()
                    .and_then(|u| serde_json::to_value(u).ok());
                if let Some(u) = message.usage {
                    self.saw_usage = true;
                    self.input_tokens = u.input_tokens;
                    self.output_tokens = u.output_tokens;
                    self.cache_read = u.cache_read_input_tokens.unwrap_or(0);
                    self.cache_creation = u.cache_creation_input_tokens.unwrap_or(0);
                    self.cache_creation_1h = one_hour_writes(&u.extra);
                }
                let mut first = self.chunk(
                    Delta {
                        role: Some(Role::Assistant),
                        ..Delta::default()
                    },
                    None,
                );
                if let Some(u) = start_usage {
                    first.extra.insert(START_USAGE.into(), u);
                }
                out.push(first);
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                ContentBlock::Text { text, .. } if !text.is_empty() => {
                    out.push(self.text_chunk(text));
                }
                ContentBlock::Thinking {
                    thinking,
                    signature,
                    ..
                } => {
                    self.thinking_blocks
                        .insert(index, (thinking.clone(), signature));
                    if !thinking.is_empty() {
                        out.push(self.reasoning_chunk(thinking));
                    }
                }
                block @ ContentBlock::RedactedThinking { .. } => {
                    let stored = stored_thinking(&block, self.tool_blocks.len());
                    out.push(self.thinking_blocks_chunk(stored));
                }
                ContentBlock::ToolUse {
                    id, name, input, ..
                } => {
                    let tool_index = u32::try_from(self.tool_blocks.len()).unwrap_or(u32::MAX);
                    // Streams start tool inputs as `{}` and send the JSON in deltas.
                    let arguments = match &input {
                        Value::Object(o) if !o.is_empty() => input.to_string(),
                        _ => String::new(),
                    };
                    self.tool_blocks
                        .insert(index, (tool_index, !arguments.is_empty()));
                    out.push(self.tool_chunk(ToolCallDelta {
                        index: tool_index,
                        id: Some(id),
                        kind: Some("function".into()),
                        function: Some(FunctionCallDelta {
                            name: Some(name),
                            arguments: Some(arguments),
                        }),
                        extra: Extra::new(),
                    }));
                }
                ContentBlock::Text { .. } => {}
                _ => {
                    self.other_blocks.insert(index);
                }
            },
            // A server tool's input or result: nothing of it reaches the OpenAI shape.
            StreamEvent::ContentBlockDelta { index, .. } if self.other_blocks.contains(&index) => {}
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if !text.is_empty() => {
                    out.push(self.text_chunk(text));
                }
                BlockDelta::ThinkingDelta { thinking } if !thinking.is_empty() => {
                    if let Some((text, _)) = self.thinking_blocks.get_mut(&index) {
                        text.push_str(&thinking);
                    }
                    out.push(self.reasoning_chunk(thinking));
                }
                BlockDelta::SignatureDelta { signature } => {
                    if let Some((_, sig)) = self.thinking_blocks.get_mut(&index) {
                        sig.push_str(&signature);
                    }
                }
                BlockDelta::InputJsonDelta { partial_json } => {
                    let (tool_index, sent) = self.tool_blocks.get_mut(&index).ok_or_else(|| {
                        err(format!(
                            "input_json_delta for content block {index}, which is not a tool_use block"
                        ))
                    })?;
                    let tool_index = *tool_index;
                    if !partial_json.is_empty() {
                        *sent = true;
                        out.push(self.arguments_chunk(tool_index, partial_json));
                    }
                }
                _ => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.saw_usage = true;
                    self.output_tokens = usage.output_tokens;
                    if let Some(n) = usage.input_tokens {
                        self.input_tokens = n;
                    }
                    if let Some(n) = usage.cache_read_input_tokens {
                        self.cache_read = n;
                    }
                    if let Some(n) = usage.cache_creation_input_tokens {
                        self.cache_creation = n;
                    }
                    if let Some(n) = one_hour_writes(&usage.extra) {
                        self.cache_creation_1h = Some(n);
                    }
                }
                if let Some(reason) = delta.stop_reason {
                    let mut chunk = self.chunk(
                        Delta::default(),
                        Some(finish_reason_for(&reason).to_string()),
                    );
                    chunk.choices[0].extra = stop_extra(Some(&reason), delta.stop_sequence);
                    out.push(chunk);
                }
            }
            StreamEvent::MessageStop => {
                if !self.stopped {
                    self.stopped = true;
                    if self.saw_usage {
                        let mut chunk =
                            ChatCompletionChunk::new(&self.id, &self.model, self.created);
                        chunk.usage = Some(self.usage());
                        out.push(chunk);
                    }
                }
            }
            StreamEvent::Error { error } => {
                return Err(err(format!(
                    "{STREAM_ERROR_PREFIX}{}): {}",
                    error.kind, error.message
                )));
            }
            StreamEvent::ContentBlockStop { index } => {
                if let Some((thinking, signature)) = self.thinking_blocks.remove(&index) {
                    let block = ContentBlock::Thinking {
                        thinking,
                        signature,
                        extra: Extra::new(),
                    };
                    let stored = stored_thinking(&block, self.tool_blocks.len());
                    out.push(self.thinking_blocks_chunk(stored));
                }
                // A tool called without arguments streams none (an empty `partial_json` at
                // most); its arguments are then the empty object, as in a whole response.
                if let Some((tool_index, sent)) = self.tool_blocks.get_mut(&index)
                    && !*sent
                {
                    *sent = true;
                    let tool_index = *tool_index;
                    out.push(self.arguments_chunk(tool_index, "{}".into()));
                }
            }
            StreamEvent::Ping | StreamEvent::Other(_) => {}
        }
        Ok(out)
    }

    fn chunk(&self, delta: Delta, finish_reason: Option<String>) -> ChatCompletionChunk {
        let mut chunk = ChatCompletionChunk::new(&self.id, &self.model, self.created);
        chunk
            .choices
            .push(ChunkChoice::new(0, delta, finish_reason));
        chunk
    }

    fn text_chunk(&self, text: String) -> ChatCompletionChunk {
        self.chunk(
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
        )
    }

    fn reasoning_chunk(&self, thinking: String) -> ChatCompletionChunk {
        let mut delta = Delta::default();
        delta
            .extra
            .insert("reasoning_content".into(), Value::String(thinking));
        self.chunk(delta, None)
    }

    /// A chunk carrying one whole thinking block (in [`THINKING_BLOCKS`]), after its text was
    /// streamed as `reasoning_content`. Each entry has its `index` in the list, as the OpenAI
    /// SDKs' stream helpers merge list deltas by it (without, a second block broke them).
    fn thinking_blocks_chunk(&mut self, mut block: Value) -> ChatCompletionChunk {
        if let Some(o) = block.as_object_mut() {
            o.insert(LIST_INDEX.into(), self.thinking_sent.into());
        }
        self.thinking_sent += 1;
        let mut delta = Delta::default();
        delta
            .extra
            .insert(THINKING_BLOCKS.into(), Value::Array(vec![block]));
        self.chunk(delta, None)
    }

    /// A chunk carrying more of a tool call's arguments.
    fn arguments_chunk(&self, tool_index: u32, arguments: String) -> ChatCompletionChunk {
        self.tool_chunk(ToolCallDelta {
            index: tool_index,
            id: None,
            kind: None,
            function: Some(FunctionCallDelta {
                name: None,
                arguments: Some(arguments),
            }),
            extra: Extra::new(),
        })
    }

    fn tool_chunk(&self, call: ToolCallDelta) -> ChatCompletionChunk {
        self.chunk(
            Delta {
                tool_calls: Some(vec![call]),
                ..Delta::default()
            },
            None,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Ingress: Anthropic request → OpenAI, OpenAI response/stream → Anthropic
// ---------------------------------------------------------------------------------------------

/// Translates an Anthropic Messages request (from a client of Sluice's `/v1/messages`) into an
/// OpenAI chat request.
///
/// `system` becomes a system message; `tool_result` blocks become `tool` messages placed before
/// the rest of their user message (an `is_error` result's text is prefixed with `"Error: "`; only
/// the text of a result is kept); `tool_use` blocks become `tool_calls`; thinking blocks are
/// kept only as [`THINKING_BLOCKS`]. `top_k` goes to `extra`, `metadata.user_id` to `user`, and a
/// streamed request asks for the usage chunk. The request's other top-level fields (`thinking`,
/// `cache_control`, …) go to `extra` under [`ANTHROPIC_FIELDS`]; caching breakpoints on blocks and
/// tools become `cache_control` on the parts, tools, tool calls and tool messages that stand for
/// them (a system prompt or assistant text with one stays a list of parts). Fails on server tools,
/// on blocks that have no OpenAI equivalent, and on a `tool` choice without a name.
pub fn request_to_openai(req: &MessagesRequest) -> Result<ChatRequest, TranslateError> {
    let mut messages = Vec::new();
    match &req.system {
        // Blocks with a caching breakpoint stay parts, each with its mark.
        Some(SystemPrompt::Blocks(blocks))
            if blocks.iter().any(|b| block_cache_control(b).is_some()) =>
        {
            let parts: Vec<ContentPart> = blocks
                .iter()
                .filter_map(|b| match b {
                    ContentBlock::Text { text, extra } => {
                        Some(text_part(text, extra.get(CACHE_CONTROL)))
                    }
                    _ => None,
                })
                .collect();
            if !parts.is_empty() {
                let mut m = Message::text(Role::System, String::new());
                m.content = Some(Content::Parts(parts));
                messages.push(m);
            }
        }
        Some(system) => {
            let text = system.to_text();
            if !text.is_empty() {
                messages.push(Message::text(Role::System, text));
            }
        }
        None => {}
    }
    let last = req.messages.len().saturating_sub(1);
    for (i, m) in req.messages.iter().enumerate() {
        if matches!(&m.content, MessageContent::Blocks(b) if b.is_empty())
            && !(i == last && m.role == AnthropicRole::Assistant)
        {
            return Err(invalid(format!(
                "messages[{i}]: content must not be empty (every message needs content, but for an optional final assistant message)"
            )));
        }
        match (m.role, &m.content) {
            (role, MessageContent::Text(s)) => messages.push(Message::text(
                match role {
                    AnthropicRole::User => Role::User,
                    AnthropicRole::Assistant => Role::Assistant,
                },
                s.clone(),
            )),
            (AnthropicRole::User, MessageContent::Blocks(blocks)) => {
                user_to_openai(blocks, i, &mut messages)?;
            }
            (AnthropicRole::Assistant, MessageContent::Blocks(blocks)) => {
                messages.push(assistant_to_openai(blocks, i)?);
            }
        }
    }

    let mut extra = Extra::new();
    let tools = match req.tools.as_deref() {
        Some(tools) if !tools.is_empty() => Some(
            tools
                .iter()
                .map(tool_to_openai)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let mut tool_choice = None;
    if tools.is_some()
        && let Some(choice) = &req.tool_choice
    {
        tool_choice = Some(match choice.kind {
            ToolChoiceKind::Auto => json!("auto"),
            ToolChoiceKind::Any => json!("required"),
            ToolChoiceKind::None => json!("none"),
            ToolChoiceKind::Tool => {
                let name = choice
                    .name
                    .as_deref()
                    .ok_or_else(|| err("tool_choice of type `tool` needs a name"))?;
                json!({"type": "function", "function": {"name": name}})
            }
        });
        if choice.disable_parallel_tool_use == Some(true) {
            extra.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    if let Some(k) = req.top_k {
        extra.insert("top_k".into(), Value::from(k));
    }
    let mut fields = req.extra.clone();
    // Sluice's own per-request cache control is read by the gateway, not sent anywhere.
    if let Some(cache) = fields.shift_remove(SLUICE_CACHE_FIELD) {
        extra.insert(SLUICE_CACHE_FIELD.into(), cache);
    }
    if !fields.is_empty() {
        extra.insert(ANTHROPIC_FIELDS.into(), Value::Object(fields));
    }

    let stop = req
        .stop_sequences
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|s| Stop::Many(s.clone()));

    Ok(ChatRequest {
        model: req.model.clone(),
        messages,
        stream: req.stream,
        stream_options: req.is_stream().then(|| StreamOptions {
            include_usage: Some(true),
            extra: Extra::new(),
        }),
        max_tokens: Some(req.max_tokens),
        max_completion_tokens: None,
        temperature: req.temperature,
        top_p: req.top_p,
        n: None,
        stop,
        seed: None,
        tools,
        tool_choice,
        response_format: None,
        user: req.metadata.as_ref().and_then(|m| m.user_id.clone()),
        metadata: None,
        extra,
    })
}

fn user_to_openai(
    blocks: &[ContentBlock],
    i: usize,
    messages: &mut Vec<Message>,
) -> Result<(), TranslateError> {
    // Images and documents a tool returned: an OpenAI tool message holds only text, so they go
    // to the user message that follows the tool messages, each after a line naming its call.
    let mut tool_media = Vec::new();
    let mut parts = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::ToolResult {
                tool_use_id,
                content,
                is_error,
                ..
            } => {
                let text = content
                    .as_ref()
                    .map(ToolResultContent::to_text)
                    .unwrap_or_default();
                let text = if *is_error == Some(true) {
                    format!("{ERROR_PREFIX}{text}")
                } else {
                    text
                };
                if let Some(ToolResultContent::Blocks(inner)) = content {
                    let mut media = Vec::new();
                    for b in inner {
                        if !matches!(b, ContentBlock::Text { .. }) {
                            media.extend(media_part(b, i)?);
                        }
                    }
                    if !media.is_empty() {
                        tool_media.push(ContentPart::text(format!(
                            "{TOOL_MEDIA_LINE}{tool_use_id}]"
                        )));
                        tool_media.extend(media);
                    }
                }
                let mut msg = Message::text(Role::Tool, text);
                msg.tool_call_id = Some(tool_use_id.clone());
                // A breakpoint on one of the result's text blocks marks the result: its text
                // becomes one string here, and Anthropic takes the mark on the block. (Images and
                // documents keep theirs where they go, below.)
                let inner = match content {
                    Some(ToolResultContent::Blocks(inner)) => inner
                        .iter()
                        .rev()
                        .filter(|b| matches!(b, ContentBlock::Text { .. }))
                        .find_map(block_cache_control),
                    _ => None,
                };
                msg.extra = cache_control_extra(block_cache_control(block).or(inner));
                if *is_error == Some(true) {
                    msg.extra.insert(TOOL_IS_ERROR.into(), Value::Bool(true));
                }
                // Tool messages must directly follow the assistant message that called the tools.
                messages.push(msg);
            }
            ContentBlock::Text { text, extra } => {
                parts.push(text_part(text, extra.get(CACHE_CONTROL)));
            }
            ContentBlock::Thinking { .. } | ContentBlock::RedactedThinking { .. } => {}
            other => match media_part(other, i)? {
                Some(part) => parts.push(part),
                None => return Err(err(unsupported_block(other, i))),
            },
        }
    }
    tool_media.append(&mut parts);
    let parts = tool_media;
    if !parts.is_empty() {
        let content = match parts.as_slice() {
            [only] if only.kind == "text" && only.extra.is_empty() => {
                Content::Text(only.text.clone().unwrap_or_default())
            }
            _ => Content::Parts(parts),
        };
        messages.push(Message {
            role: Role::User,
            content: Some(content),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Extra::new(),
        });
    }
    Ok(())
}

/// The line before the images and documents a tool returned, in the user message that carries
/// them (an OpenAI tool message holds only text); the call's id and `]` follow.
pub const TOOL_MEDIA_LINE: &str = "[Attached by the result of tool call ";

/// Whether a user message only carries what tools returned (see [`TOOL_MEDIA_LINE`]): no words
/// of the user's own.
pub fn is_tool_media(m: &Message) -> bool {
    m.role == Role::User
        && matches!(&m.content, Some(Content::Parts(parts))
            if parts.iter().any(|p| p.text.as_deref().is_some_and(|t| t.starts_with(TOOL_MEDIA_LINE)))
                && parts.iter().all(|p| p.text.as_deref().is_none_or(|t| t.starts_with(TOOL_MEDIA_LINE))))
}

/// An image or base64 document block as an OpenAI content part, with its caching breakpoint;
/// `None` for any other block.
fn media_part(block: &ContentBlock, i: usize) -> Result<Option<ContentPart>, TranslateError> {
    let mut part = media_part_bare(block, i)?;
    if let (Some(p), Some(cc)) = (part.as_mut(), block_cache_control(block)) {
        p.extra.insert(CACHE_CONTROL.into(), cc.clone());
    }
    Ok(part)
}

fn media_part_bare(block: &ContentBlock, i: usize) -> Result<Option<ContentPart>, TranslateError> {
    match block {
        ContentBlock::Image { source, .. } => {
            let url = match source {
                ImageSource::Base64 { media_type, data } => {
                    format!("data:{media_type};base64,{data}")
                }
                ImageSource::Url { url } => url.clone(),
                ImageSource::Other(_) => {
                    return Err(err(format!(
                        "messages[{i}]: only base64 and url image sources are supported"
                    )));
                }
            };
            Ok(Some(ContentPart {
                kind: "image_url".into(),
                text: None,
                image_url: Some(ImageUrl {
                    url,
                    detail: None,
                    extra: Extra::new(),
                }),
                extra: Extra::new(),
            }))
        }
        ContentBlock::Other(v) if text_document(v).is_some() => {
            Ok(text_document(v).map(|text| ContentPart::text(&text)))
        }
        ContentBlock::Other(v) if is_base64_document(v) => {
            let source = &v["source"];
            let media_type = source["media_type"].as_str().unwrap_or("application/pdf");
            let data = source["data"].as_str().unwrap_or_default();
            let mut file = Map::new();
            file.insert(
                "file_data".into(),
                Value::String(format!("data:{media_type};base64,{data}")),
            );
            // OpenAI wants a file name beside inline data; Anthropic's `title` is optional.
            let filename = v
                .get("title")
                .and_then(Value::as_str)
                .filter(|t| !t.trim().is_empty())
                .unwrap_or(DEFAULT_DOCUMENT_NAME);
            file.insert("filename".into(), Value::String(filename.to_string()));
            let mut part_extra = Extra::new();
            part_extra.insert("file".into(), Value::Object(file));
            Ok(Some(ContentPart {
                kind: "file".into(),
                text: None,
                image_url: None,
                extra: part_extra,
            }))
        }
        _ => Ok(None),
    }
}

/// Why a user message's block cannot go through OpenAI's shape.
fn unsupported_block(block: &ContentBlock, i: usize) -> String {
    match block {
        ContentBlock::Other(v) if v.get("type").and_then(Value::as_str) == Some("document") => {
            let source = v
                .pointer("/source/type")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            format!(
                "messages[{i}]: `document` blocks with a `{source}` source are not supported (base64 PDFs and plain text are)"
            )
        }
        other => format!(
            "messages[{i}]: `{}` blocks in user messages are not supported",
            other.kind()
        ),
    }
}

/// A `document` block of plain text (`source.type: "text"`): its text, after its title.
fn text_document(v: &Value) -> Option<String> {
    if v.get("type").and_then(Value::as_str) != Some("document")
        || v.pointer("/source/type").and_then(Value::as_str) != Some("text")
    {
        return None;
    }
    let data = v.pointer("/source/data").and_then(Value::as_str)?;
    Some(
        match v
            .get("title")
            .and_then(Value::as_str)
            .filter(|t| !t.trim().is_empty())
        {
            Some(title) => format!("{title}\n\n{data}"),
            None => data.to_string(),
        },
    )
}

fn is_base64_document(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("document")
        && v.pointer("/source/type").and_then(Value::as_str) == Some("base64")
        && v.pointer("/source/data").is_some_and(Value::is_string)
}

fn assistant_to_openai(blocks: &[ContentBlock], i: usize) -> Result<Message, TranslateError> {
    let mut text = String::new();
    // The text blocks as parts, used when one of them is a caching breakpoint.
    let mut text_parts = Vec::new();
    let mut tool_calls = Vec::new();
    let mut thinking = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::Text { text: t, extra } => {
                text.push_str(t);
                text_parts.push(text_part(t, extra.get(CACHE_CONTROL)));
            }
            ContentBlock::ToolUse {
                id,
                name,
                input,
                extra,
            } => tool_calls.push(ToolCall {
                id: id.clone(),
                kind: "function".into(),
                function: FunctionCall {
                    name: name.clone(),
                    arguments: arguments_json(input),
                },
                extra: cache_control_extra(extra.get(CACHE_CONTROL)),
            }),
            // Kept for an Anthropic upstream, which wants them back (signed) in a tool-use turn.
            ContentBlock::Thinking { .. } | ContentBlock::RedactedThinking { .. } => {
                thinking.push(stored_thinking(block, tool_calls.len()));
            }
            other => {
                return Err(err(format!(
                    "messages[{i}]: `{}` blocks in assistant messages are not supported",
                    other.kind()
                )));
            }
        }
    }
    let mut extra = Extra::new();
    if !thinking.is_empty() {
        extra.insert(THINKING_BLOCKS.into(), Value::Array(thinking));
    }
    if let Some(order) = block_order(blocks) {
        extra.insert(BLOCK_ORDER.into(), order);
    }
    let content = if text_parts.iter().any(|p| !p.extra.is_empty()) {
        Some(Content::Parts(text_parts))
    } else {
        (!text.is_empty() || tool_calls.is_empty()).then_some(Content::Text(text))
    };
    Ok(Message {
        role: Role::Assistant,
        content,
        name: None,
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
        tool_call_id: None,
        extra,
    })
}

fn tool_to_openai(tool: &AnthropicTool) -> Result<Tool, TranslateError> {
    if let Some(kind) = tool.extra.get("type").and_then(Value::as_str)
        && kind != "custom"
    {
        return Err(err(format!(
            "Anthropic server tool `{}` (type `{kind}`) is not supported on this route",
            tool.name
        )));
    }
    let mut extra = cache_control_extra(tool.extra.get(CACHE_CONTROL));
    // Its other fields (`strict`, `input_examples`, `defer_loading`, `type: "custom"`, …) ride
    // along for an Anthropic upstream, as a request's own fields do.
    let fields: Map<String, Value> = tool
        .extra
        .iter()
        .filter(|(k, _)| k.as_str() != CACHE_CONTROL)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !fields.is_empty() {
        extra.insert(ANTHROPIC_FIELDS.into(), Value::Object(fields));
    }
    Ok(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: tool.name.clone(),
            description: tool.description.clone(),
            parameters: (!tool.input_schema.is_null()).then(|| tool.input_schema.clone()),
            extra: Extra::new(),
        },
        extra,
    })
}

/// Translates an OpenAI `chat.completion` into an Anthropic message for a `/v1/messages` client.
///
/// Uses the first choice: its text (and refusal) become text blocks, its tool calls `tool_use`
/// blocks (arguments that are not a JSON object become `{"_raw_arguments": "<raw>"}`). `model` is
/// the name the client asked for. Usage: `input_tokens` excludes the cached tokens, which are
/// reported as `cache_read_input_tokens`.
pub fn response_from_openai(resp: &ChatCompletion, model: &str) -> MessagesResponse {
    let choice = resp.choices.first();
    let mut content = Vec::new();
    if let Some(c) = choice {
        // Thinking first: the blocks an Anthropic upstream sent (signed), else the reasoning of
        // another model as an unsigned block.
        let mut thinking = kept_thinking(&c.message.extra, false);
        if thinking.is_empty()
            && let Some(reasoning) = reasoning_text(&c.message.extra)
        {
            thinking.push((
                0,
                ContentBlock::Thinking {
                    thinking: reasoning.to_string(),
                    signature: String::new(),
                    extra: Extra::new(),
                },
            ));
        }
        let mut text_blocks = Vec::new();
        // No text blocks of whitespace alone (a client that sends the message back to an
        // Anthropic model would be refused).
        if let Some(text) = c
            .message
            .content
            .as_deref()
            .filter(|t| !t.trim().is_empty())
        {
            text_blocks.push(ContentBlock::text(text));
        }
        if let Some(refusal) = c
            .message
            .refusal
            .as_deref()
            .filter(|t| !t.trim().is_empty())
        {
            text_blocks.push(ContentBlock::text(refusal));
        }
        let mut tool_uses = Vec::new();
        for tc in c.message.tool_calls.iter().flatten() {
            let id = if tc.id.is_empty() {
                fresh_id("toolu_")
            } else {
                tc.id.clone()
            };
            tool_uses.push(ContentBlock::tool_use(
                id,
                tc.function.name.clone(),
                tool_input(&tc.function.arguments),
            ));
        }
        content = match c
            .message
            .extra
            .get(BLOCK_ORDER)
            .filter(|_| c.message.refusal.is_none())
            .and_then(|order| {
                in_block_order(
                    order,
                    TextSource::Text(c.message.content.as_deref().unwrap_or_default()),
                    thinking_in_order(&c.message.extra, false),
                    tool_uses.clone(),
                )
            }) {
            Some(blocks) => blocks,
            None => in_turn_order(thinking, text_blocks, tool_uses),
        };
    }
    let has_tool_use = content
        .iter()
        .any(|b| matches!(b, ContentBlock::ToolUse { .. }));
    let finish_reason = choice.and_then(|c| c.finish_reason.as_deref());
    let stop_sequence = choice
        .and_then(|c| matched_stop_sequence(finish_reason, &c.extra))
        .filter(|_| !has_tool_use);
    let kept = choice.and_then(|c| upstream_stop_reason(&c.extra));
    let stop_reason = match (stop_sequence, kept) {
        (Some(_), _) => "stop_sequence",
        (None, Some(kept)) => kept,
        (None, None) => stop_reason_for(finish_reason, has_tool_use),
    };
    let usage = resp
        .usage
        .as_ref()
        .map_or_else(AnthropicUsage::default, |u| {
            let (input, cached, writes) = anthropic_input(u);
            AnthropicUsage {
                input_tokens: input,
                output_tokens: u.completion_tokens,
                // Both always, as Anthropic gives them (0 when nothing was cached).
                cache_creation_input_tokens: Some(writes),
                cache_read_input_tokens: Some(cached),
                extra: cache_creation_extra(u),
            }
        });
    MessagesResponse {
        id: message_id(&resp.id),
        kind: message_kind(),
        role: AnthropicRole::Assistant,
        content,
        model: model.to_string(),
        stop_reason: Some(stop_reason.to_string()),
        stop_sequence: stop_sequence.map(str::to_string),
        usage: Some(usage),
        extra: Extra::new(),
    }
}

/// OpenAI tool-call arguments as an Anthropic `input` object; anything that is not a JSON object
/// is kept as a string under `_raw_arguments`.
fn tool_input(raw: &str) -> Value {
    match parse_tool_arguments(raw) {
        Ok(v) => v,
        Err(_) => json!({ "_raw_arguments": raw }),
    }
}

/// A piece of a streamed answer on its way to a [`StreamEncoder`]'s blocks.
#[derive(Debug)]
enum Piece {
    Text(String),
    Thinking(String),
    /// A whole thinking block; `true`: it stands alone (the open block closes before it).
    ThinkingBlock(Value, bool),
    Tool(ToolCallDelta),
}

/// A tool block whose start is not sent yet: its call has not been named (some servers send the
/// name in a later piece than the id).
#[derive(Debug)]
struct Unnamed {
    index: u32,
    id: String,
    /// Arguments ready to send once the block has started.
    arguments: String,
}

/// Which kind of content block is open in a [`StreamEncoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    Text(u32),
    Tool(u32),
    Thinking(u32),
}

impl OpenBlock {
    fn index(self) -> u32 {
        match self {
            OpenBlock::Text(i) | OpenBlock::Tool(i) | OpenBlock::Thinking(i) => i,
        }
    }
}

/// Translates OpenAI `chat.completion.chunk`s into Anthropic stream events (ingress streaming),
/// in Anthropic's exact order: `message_start`; per block `content_block_start`, deltas,
/// `content_block_stop`; then `message_delta` and `message_stop` from [`StreamEncoder::finish`].
///
/// Only choice 0 is used. Text and refusal deltas go to text blocks, each OpenAI tool-call index
/// to its own `tool_use` block; block indices count up from 0.
///
/// A tool block stays open while its arguments are not yet a whole JSON value: OpenAI streams
/// may interleave the arguments of parallel calls, or send text between them, and a block once
/// stopped cannot take more (a client acting on `content_block_stop` would run the tool with the
/// arguments so far). What comes meanwhile for other blocks is queued, in order, and sent when
/// that block's arguments are whole (or at the end).
#[derive(Debug)]
pub struct StreamEncoder {
    id: String,
    model: String,
    input_tokens: u64,
    started: bool,
    finished: bool,
    next_index: u32,
    open: Option<OpenBlock>,
    /// OpenAI tool-call index → content-block index and the call's id.
    tools: HashMap<u32, (u32, Option<String>)>,
    /// The arguments so far of the open tool block, as they came, and how far they are a valid
    /// beginning of a JSON object: only that much is sent (see [`StreamEncoder::tool_call`]).
    live_arguments: String,
    live_json: JsonPrefix,
    /// The open tool block, when its call came without a name: its start (which carries the
    /// name) waits for a piece that names it, and its arguments meanwhile.
    unnamed: Option<Unnamed>,
    /// Content that came while a tool block with unfinished arguments was open.
    queued: Vec<Piece>,
    /// Sending the queue: nothing is queued again.
    draining: bool,
    /// Whether reasoning goes out as thinking blocks (the client turned thinking on).
    thinking: bool,
    /// The upstream's own `message_start` usage, when it is Anthropic ([`START_USAGE`]).
    start_usage: Option<AnthropicUsage>,
    /// Whitespace that came before any visible text of a text block: sent with the first visible
    /// text, dropped if none comes (a block of whitespace alone is refused when sent back).
    held_whitespace: String,
    finish_reason: Option<String>,
    /// The stop sequence the completion ended on, when its finishing chunk named one.
    stop_sequence: Option<String>,
    /// Anthropic's own stop reason, when its finishing chunk kept one ([`UPSTREAM_STOP_REASON`]).
    upstream_stop: Option<String>,
    usage: Option<Usage>,
}

impl StreamEncoder {
    /// An encoder for a message with this id (prefixed with `msg_` unless it has it) and this
    /// model name (the one the client asked for).
    pub fn new(id: &str, model: &str) -> Self {
        StreamEncoder {
            id: message_id(id),
            model: model.to_string(),
            input_tokens: 0,
            started: false,
            finished: false,
            next_index: 0,
            open: None,
            tools: HashMap::new(),
            live_arguments: String::new(),
            live_json: JsonPrefix::default(),
            unnamed: None,
            queued: Vec::new(),
            draining: false,
            thinking: true,
            start_usage: None,
            held_whitespace: String::new(),
            finish_reason: None,
            stop_sequence: None,
            upstream_stop: None,
            usage: None,
        }
    }

    /// Leaves reasoning out of the stream (a client that did not turn thinking on gets no
    /// thinking blocks, as from Anthropic).
    pub fn without_thinking(mut self) -> Self {
        self.thinking = false;
        self
    }

    /// Sets the `input_tokens` reported in `message_start` (for example a local count), used
    /// until the stream reports its own usage.
    pub fn with_input_tokens(mut self, input_tokens: u64) -> Self {
        self.input_tokens = input_tokens;
        self
    }

    /// Translates one chunk. Chunks after [`StreamEncoder::finish`] are ignored.
    pub fn on_chunk(&mut self, chunk: &ChatCompletionChunk) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if !self.started
            && let Some(u) = chunk.extra.get(START_USAGE)
        {
            self.start_usage = AnthropicUsage::deserialize(u).ok();
        }
        self.start(&mut out);
        if let Some(u) = &chunk.usage {
            self.usage = Some(u.clone());
        }
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            let delta = &choice.delta;
            match delta.extra.get(THINKING_BLOCKS).filter(|_| self.thinking) {
                // Whole blocks carry their own text (a replayed answer sends both at once).
                Some(Value::Array(blocks)) if reasoning_text(&delta.extra).is_some() => {
                    for b in blocks {
                        self.put(Piece::ThinkingBlock(b.clone(), true), &mut out);
                    }
                }
                Some(Value::Array(blocks)) => {
                    for b in blocks {
                        self.put(Piece::ThinkingBlock(b.clone(), false), &mut out);
                    }
                }
                _ if !self.thinking => {}
                _ => {
                    if let Some(text) = reasoning_text(&delta.extra) {
                        self.put(Piece::Thinking(text.to_string()), &mut out);
                    }
                }
            }
            for text in [delta.content.as_deref(), delta.refusal.as_deref()]
                .into_iter()
                .flatten()
                .filter(|t| !t.is_empty())
            {
                self.put(Piece::Text(text.to_string()), &mut out);
            }
            for call in delta.tool_calls.iter().flatten() {
                self.put(Piece::Tool(call.clone()), &mut out);
            }
            if let Some(reason) = &choice.finish_reason {
                self.finish_reason = Some(reason.clone());
                self.stop_sequence =
                    matched_stop_sequence(Some(reason), &choice.extra).map(str::to_string);
                self.upstream_stop = upstream_stop_reason(&choice.extra).map(str::to_string);
            }
        }
        out
    }

    /// Ends the message: closes the open block and emits `message_delta` (stop reason and usage)
    /// and `message_stop`, preceded by `message_start` if no chunk came. Later calls return
    /// nothing.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.start(&mut out);
        if !self.queued.is_empty() {
            // The tool block held open is as whole as it will get.
            self.close_open(&mut out);
            self.draining = true;
            for piece in std::mem::take(&mut self.queued) {
                self.emit(piece, &mut out);
            }
        }
        self.close_open(&mut out);
        self.finished = true;
        let stop_sequence = self.stop_sequence.take().filter(|_| self.tools.is_empty());
        let kept = self.upstream_stop.take();
        let stop_reason = match (&stop_sequence, kept.as_deref()) {
            (Some(_), _) => "stop_sequence",
            (None, Some(kept)) => kept,
            (None, None) => stop_reason_for(self.finish_reason.as_deref(), !self.tools.is_empty()),
        };
        let usage = match &self.usage {
            Some(u) => {
                let (input, cached, writes) = anthropic_input(u);
                DeltaUsage {
                    output_tokens: u.completion_tokens,
                    input_tokens: Some(input),
                    cache_creation_input_tokens: Some(writes),
                    cache_read_input_tokens: Some(cached),
                    extra: cache_creation_extra(u),
                }
            }
            None => DeltaUsage {
                input_tokens: (self.input_tokens > 0).then_some(self.input_tokens),
                ..DeltaUsage::default()
            },
        };
        out.push(StreamEvent::MessageDelta {
            delta: MessageDeltaBody {
                stop_reason: Some(stop_reason.to_string()),
                stop_sequence,
                extra: Extra::new(),
            },
            usage: Some(usage),
        });
        out.push(StreamEvent::MessageStop);
        out
    }

    fn start(&mut self, out: &mut Vec<StreamEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push(StreamEvent::MessageStart {
            message: MessagesResponse {
                id: self.id.clone(),
                kind: message_kind(),
                role: AnthropicRole::Assistant,
                content: Vec::new(),
                model: self.model.clone(),
                stop_reason: None,
                stop_sequence: None,
                // An Anthropic upstream's own counts; else Sluice's count of the input.
                usage: Some(self.start_usage.take().unwrap_or(AnthropicUsage {
                    input_tokens: self.input_tokens,
                    output_tokens: 0,
                    cache_creation_input_tokens: Some(0),
                    cache_read_input_tokens: Some(0),
                    ..AnthropicUsage::default()
                })),
                extra: Extra::new(),
            },
        });
    }

    /// Whether the open tool block's arguments are a whole JSON value (`None`: no tool block is
    /// open).
    fn open_tool_whole(&self) -> Option<bool> {
        matches!(self.open, Some(OpenBlock::Tool(_))).then(|| {
            // `null` is whole too: the empty object (see `arguments_completion`).
            self.live_json.is_whole() || self.live_arguments.trim() == "null"
        })
    }

    /// Sends `piece` now, or queues it behind the open tool block while that block's arguments
    /// are unfinished (see the type's documentation).
    fn put(&mut self, piece: Piece, out: &mut Vec<StreamEvent>) {
        let must_wait = !self.draining
            && match &piece {
                // Its own arguments go to the open block; a late delta of a closed one is
                // dropped there (only a broken upstream sends one after the arguments were whole).
                Piece::Tool(call) if self.known_tool(call).is_some() => false,
                _ => !self.queued.is_empty() || self.open_tool_whole() == Some(false),
            };
        if !must_wait {
            self.emit(piece, out);
            // The open tool's arguments are whole now: it closes, and what waited behind it
            // goes out (or waits again behind the next tool still unfinished).
            if !self.queued.is_empty() && !self.draining && self.open_tool_whole() == Some(true) {
                self.close_open(out);
                for piece in std::mem::take(&mut self.queued) {
                    self.put(piece, out);
                }
            }
            return;
        }
        // Pieces of one block are joined in the queue.
        match (self.queued.last_mut(), piece) {
            (Some(Piece::Text(have)), Piece::Text(more))
            | (Some(Piece::Thinking(have)), Piece::Thinking(more)) => have.push_str(&more),
            (_, Piece::Tool(call)) => {
                let id = call.id.as_deref().filter(|id| !id.is_empty());
                let same = self.queued.iter_mut().rev().find_map(|p| match p {
                    Piece::Tool(q)
                        if q.index == call.index && (id.is_none() || q.id.as_deref() == id) =>
                    {
                        Some(q)
                    }
                    _ => None,
                });
                match same {
                    Some(q) => {
                        let more = call.function.as_ref();
                        let have = q.function.get_or_insert_with(Default::default);
                        if let Some(n) = more.and_then(|f| f.name.as_deref())
                            && have.name.as_deref().is_none_or(str::is_empty)
                        {
                            have.name = Some(n.to_string());
                        }
                        if let Some(a) = more.and_then(|f| f.arguments.as_deref()) {
                            have.arguments.get_or_insert_with(String::new).push_str(a);
                        }
                    }
                    None => self.queued.push(Piece::Tool(call)),
                }
            }
            (_, piece) => self.queued.push(piece),
        }
    }

    fn emit(&mut self, piece: Piece, out: &mut Vec<StreamEvent>) {
        match piece {
            Piece::Text(text) => self.text(&text, out),
            Piece::Thinking(text) => self.thinking(&text, out),
            Piece::ThinkingBlock(block, fresh) => {
                if fresh {
                    self.close_open(out);
                }
                self.thinking_block(&block, out);
            }
            Piece::Tool(call) => self.tool_call(&call, out),
        }
    }

    /// The block of a tool call already started.
    fn known_tool(&self, call: &ToolCallDelta) -> Option<u32> {
        let id = call.id.as_deref().filter(|id| !id.is_empty());
        match self.tools.get(&call.index) {
            // A different id at a known index is another call: some servers (Ollama) send every
            // call at index 0.
            Some((index, seen)) if id.is_none() || seen.as_deref() == id => Some(*index),
            _ => None,
        }
    }

    fn close_open(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some(block) = self.open.take() {
            // Never named: it starts with no name now, as it came.
            self.start_unnamed(String::new(), out);
            if let OpenBlock::Tool(index) = block
                && let Some(rest) = self.arguments_completion()
            {
                out.push(StreamEvent::ContentBlockDelta {
                    index,
                    delta: BlockDelta::InputJsonDelta { partial_json: rest },
                });
            }
            out.push(StreamEvent::ContentBlockStop {
                index: block.index(),
            });
        }
    }

    fn next_block(&mut self) -> u32 {
        let index = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        index
    }

    fn text(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        let mut held = String::new();
        if !matches!(self.open, Some(OpenBlock::Text(_))) {
            if text.trim().is_empty() {
                self.held_whitespace.push_str(text);
                return;
            }
            held = std::mem::take(&mut self.held_whitespace);
        }
        let text = if held.is_empty() {
            text.to_string()
        } else {
            held + text
        };
        let index = match self.open {
            Some(OpenBlock::Text(index)) => index,
            _ => {
                self.close_open(out);
                let index = self.next_block();
                out.push(StreamEvent::ContentBlockStart {
                    index,
                    content_block: ContentBlock::text(""),
                });
                self.open = Some(OpenBlock::Text(index));
                index
            }
        };
        out.push(StreamEvent::ContentBlockDelta {
            index,
            delta: BlockDelta::TextDelta { text },
        });
    }

    /// More reasoning: a `thinking` block's text.
    fn thinking(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        let index = match self.open {
            Some(OpenBlock::Thinking(index)) => index,
            _ => self.open_thinking(out),
        };
        out.push(StreamEvent::ContentBlockDelta {
            index,
            delta: BlockDelta::ThinkingDelta {
                thinking: text.to_string(),
            },
        });
    }

    fn open_thinking(&mut self, out: &mut Vec<StreamEvent>) -> u32 {
        self.close_open(out);
        self.held_whitespace.clear();
        let index = self.next_block();
        out.push(StreamEvent::ContentBlockStart {
            index,
            content_block: ContentBlock::Thinking {
                thinking: String::new(),
                signature: String::new(),
                extra: Extra::new(),
            },
        });
        self.open = Some(OpenBlock::Thinking(index));
        index
    }

    /// A whole thinking block from an Anthropic upstream (its text came as reasoning before): the
    /// open thinking block gets its signature and closes; a redacted one is a block of its own.
    fn thinking_block(&mut self, block: &Value, out: &mut Vec<StreamEvent>) {
        match parse_stored_thinking(block).map(|(_, b)| b) {
            Some(ContentBlock::Thinking {
                thinking,
                signature,
                ..
            }) => {
                let index = match self.open {
                    Some(OpenBlock::Thinking(index)) => index,
                    _ => {
                        let index = self.open_thinking(out);
                        if !thinking.is_empty() {
                            out.push(StreamEvent::ContentBlockDelta {
                                index,
                                delta: BlockDelta::ThinkingDelta { thinking },
                            });
                        }
                        index
                    }
                };
                if !signature.is_empty() {
                    out.push(StreamEvent::ContentBlockDelta {
                        index,
                        delta: BlockDelta::SignatureDelta { signature },
                    });
                }
                self.close_open(out);
            }
            Some(redacted @ ContentBlock::RedactedThinking { .. }) => {
                self.close_open(out);
                self.held_whitespace.clear();
                let index = self.next_block();
                out.push(StreamEvent::ContentBlockStart {
                    index,
                    content_block: redacted,
                });
                out.push(StreamEvent::ContentBlockStop { index });
            }
            _ => {}
        }
    }

    fn tool_call(&mut self, call: &ToolCallDelta, out: &mut Vec<StreamEvent>) {
        let function = call.function.as_ref();
        let id = call.id.as_deref().filter(|id| !id.is_empty());
        let index = match self.known_tool(call) {
            Some(index) => index,
            None => {
                self.close_open(out);
                self.held_whitespace.clear();
                let index = self.next_block();
                let block_id = id.map_or_else(|| fresh_id("toolu_"), str::to_string);
                match function
                    .and_then(|f| f.name.clone())
                    .filter(|n| !n.is_empty())
                {
                    Some(name) => out.push(StreamEvent::ContentBlockStart {
                        index,
                        content_block: ContentBlock::tool_use(
                            block_id,
                            name,
                            Value::Object(Map::new()),
                        ),
                    }),
                    None => {
                        self.unnamed = Some(Unnamed {
                            index,
                            id: block_id,
                            arguments: String::new(),
                        })
                    }
                }
                self.tools
                    .insert(call.index, (index, id.map(str::to_string)));
                self.open = Some(OpenBlock::Tool(index));
                self.live_arguments.clear();
                self.live_json = JsonPrefix::default();
                index
            }
        };
        if let Some(name) = function
            .and_then(|f| f.name.as_deref())
            .filter(|n| !n.is_empty())
            && self.unnamed.as_ref().is_some_and(|u| u.index == index)
        {
            self.start_unnamed(name.to_string(), out);
        }
        let Some(arguments) = function
            .and_then(|f| f.arguments.as_deref())
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        // A late piece of a block already stopped (only a broken upstream sends one) is dropped:
        // the block's arguments were whole, and nothing can follow a whole object.
        if self.open != Some(OpenBlock::Tool(index)) {
            return;
        }
        // Clients parse the arguments as they arrive (the SDKs' stream helpers throw on text
        // that cannot become JSON): only as much goes out as keeps them a valid beginning of an
        // object. What a model got wrong is sent, whole, when the block stops
        // (`arguments_completion`).
        self.live_arguments.push_str(arguments);
        let valid = self.live_json.push(arguments);
        if let Some(u) = self.unnamed.as_mut() {
            u.arguments.push_str(&valid);
        } else if !valid.is_empty() {
            out.push(StreamEvent::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta {
                    partial_json: valid,
                },
            });
        }
    }

    /// Starts the tool block that waited for its name, with what came of its arguments meanwhile.
    fn start_unnamed(&mut self, name: String, out: &mut Vec<StreamEvent>) {
        let Some(u) = self.unnamed.take() else {
            return;
        };
        out.push(StreamEvent::ContentBlockStart {
            index: u.index,
            content_block: ContentBlock::tool_use(u.id, name, Value::Object(Map::new())),
        });
        if !u.arguments.is_empty() {
            out.push(StreamEvent::ContentBlockDelta {
                index: u.index,
                delta: BlockDelta::InputJsonDelta {
                    partial_json: u.arguments,
                },
            });
        }
    }

    /// What the open tool block's arguments still need when it stops: the closing brace of a
    /// whole object (held back until then, so that text after it can still be reported); for
    /// arguments that are not a whole object, the end of the object sent so far with the
    /// arguments as they came under `_raw_arguments` (as a whole answer gets them, see
    /// [`tool_input`]). Nothing for no arguments (clients take them for `{}`); `null` is the
    /// empty object, as in a whole answer.
    fn arguments_completion(&mut self) -> Option<String> {
        let raw = std::mem::take(&mut self.live_arguments);
        let json = std::mem::take(&mut self.live_json);
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return None;
        }
        if trimmed == "null" {
            return Some("{}".to_string());
        }
        Some(json.completion("_raw_arguments", &Value::String(raw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChunkAccumulator;

    fn chat_request(body: Value) -> ChatRequest {
        serde_json::from_value(body).expect("valid chat request")
    }

    #[test]
    fn egress_request_maps_system_tools_tool_results_and_images() {
        let req = chat_request(json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
                ]},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\":\"cat\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [
                {"type": "function", "function": {"name": "lookup", "description": "Look up", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "now"}}
            ],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "max_completion_tokens": 300,
            "stop": "END",
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "user": "u-1",
            "stream": true,
            "logprobs": true,
            "response_format": {"type": "text"}
        }));
        let out = request_from_openai(&req).expect("translates");
        let expected = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 300,
            "system": "Be terse.\n\nUse tools.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "cat"}},
                    {"type": "tool_use", "id": "call_2", "name": "now", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
                    {"type": "text", "text": "Thanks"}
                ]}
            ],
            "stop_sequences": ["END"],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "stream": true,
            "tools": [
                {"name": "lookup", "description": "Look up", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
                {"name": "now", "input_schema": {"type": "object"}}
            ],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "metadata": {"user_id": "u-1"}
        });
        assert_eq!(serde_json::to_value(&out).expect("serializes"), expected);
    }

    #[test]
    fn egress_request_errors_and_defaults() {
        let bad_args = chat_request(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}
            ]
        }));
        let e = request_from_openai(&bad_args).expect_err("invalid arguments");
        assert_eq!(
            e.1,
            crate::TranslateKind::Invalid,
            "a malformed request: 400"
        );
        assert!(e.0.contains("call_9") && e.0.contains("messages[1]"), "{e}");

        let n2 = chat_request(
            json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(
            request_from_openai(&n2).expect_err("n > 1"),
            TranslateError::unsupported("n > 1 is not supported by Anthropic models")
        );

        let no_id =
            chat_request(json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}));
        assert_eq!(
            request_from_openai(&no_id).expect_err("no tool_call_id").1,
            crate::TranslateKind::Invalid
        );

        let plain = chat_request(json!({
            "model": "m",
            "max_tokens": 77,
            "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}
        }));
        let out = request_from_openai(&plain).expect("translates");
        assert_eq!(out.max_tokens, 77);
        assert_eq!(out.messages.len(), 1, "same-role messages are merged");
        assert_eq!(
            out.messages[0].content,
            MessageContent::Blocks(vec![ContentBlock::text("a"), ContentBlock::text("b")])
        );
        let choice = out.tool_choice.expect("tool choice");
        assert_eq!(choice.kind, ToolChoiceKind::Tool);
        assert_eq!(choice.name.as_deref(), Some("f"));
        assert_eq!(choice.disable_parallel_tool_use, None);
        let tools = out.tools.expect("tools");
        assert_eq!(tools[0].input_schema, json!({"type": "object"}));

        let default_cap =
            chat_request(json!({"model": "m", "messages": [{"role": "user", "content": "a"}]}));
        let out = request_from_openai(&default_cap).expect("translates");
        assert_eq!(out.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(out.tool_choice.is_none() && out.metadata.is_none() && out.system.is_none());
    }

    #[test]
    fn egress_response_maps_text_tool_use_thinking_and_usage() {
        let resp: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_01abc",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [
                {"type": "thinking", "thinking": "Need weather.", "signature": "sig"},
                {"type": "text", "text": "Checking "},
                {"type": "text", "text": "now."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 2}},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
            ],
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {"input_tokens": 100, "output_tokens": 40, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30, "service_tier": "standard"}
        }))
        .expect("parses");
        assert!(matches!(resp.content[4], ContentBlock::Other(_)));
        assert_eq!(
            resp.usage.as_ref().unwrap().extra["service_tier"],
            "standard"
        );

        let out = response_to_openai(resp);
        assert_eq!(out.id, "msg_01abc");
        assert_eq!(out.model, "claude-sonnet-4-5-20250929");
        assert!(out.created > 0);
        let choice = &out.choices[0];
        assert_eq!(choice.message.content.as_deref(), Some("Checking now."));
        assert_eq!(choice.message.extra["reasoning_content"], "Need weather.");
        assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
        let calls = choice.message.tool_calls.as_ref().expect("tool calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "toolu_1");
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris","days":2}"#);
        let usage = out.usage.clone().expect("usage");
        assert_eq!(usage.prompt_tokens, 150);
        assert_eq!(usage.completion_tokens, 40);
        assert_eq!(usage.total_tokens, 190);
        assert_eq!(usage.cached_tokens(), 30);
        assert_eq!(usage.cache_write_tokens(), 20, "priced as cache writes");
        // Back to an Anthropic client: the three parts as they were.
        let back = response_from_openai(&out, "claude").usage.expect("usage");
        assert_eq!(
            (
                back.input_tokens,
                back.cache_read_input_tokens,
                back.cache_creation_input_tokens
            ),
            (100, Some(30), Some(20))
        );
        assert!(
            back.extra.get("cache_creation").is_none(),
            "no breakdown was reported, none is made up"
        );

        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            assert_eq!(finish_reason_for(stop), finish, "{stop}");
        }
    }

    /// Stream events from their `data:` payloads.
    fn parse_events(payloads: Vec<Value>) -> Vec<StreamEvent> {
        payloads
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("event parses"))
            .collect()
    }

    /// A stream as Anthropic sends it: the `data:` payloads of each SSE event, in order.
    fn recorded_stream() -> Vec<StreamEvent> {
        parse_events(vec![
            json!({"type": "message_start", "message": {"id": "msg_stream", "type": "message", "role": "assistant", "content": [], "model": "claude-haiku-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 42}}),
            json!({"type": "message_stop"}),
        ])
    }

    /// From an Anthropic upstream to a `/v1/messages` client, `message_start` carries the
    /// upstream's own input and cache counts (it carried Sluice's count, without the cache);
    /// the note that brings them goes nowhere else (not into the folded answer).
    #[test]
    fn message_start_keeps_the_upstreams_usage() {
        let upstream = parse_events(vec![
            json!({"type": "message_start", "message": {"id": "msg_u", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 50, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}}),
            json!({"type": "message_stop"}),
        ]);
        let mut decoder = StreamDecoder::new();
        let mut encoder = StreamEncoder::new("c", "claude").with_input_tokens(7);
        let mut acc = ChunkAccumulator::default();
        let mut events = Vec::new();
        for ev in upstream {
            for c in decoder.on_event(ev).unwrap() {
                acc.push(&c);
                events.extend(encoder.on_chunk(&c));
            }
        }
        let StreamEvent::MessageStart { message } = &events[0] else {
            panic!("{events:?}");
        };
        let u = message.usage.as_ref().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cache_creation_input_tokens,
                u.cache_read_input_tokens,
                u.output_tokens
            ),
            (50, Some(200), Some(1000), 1)
        );
        let folded = serde_json::to_value(acc.finish()).unwrap();
        assert!(!folded.to_string().contains(START_USAGE), "{folded}");

        // Without the upstream's counts (an OpenAI-type upstream), Sluice's.
        let mut encoder = StreamEncoder::new("c", "m").with_input_tokens(7);
        let first = encoder.on_chunk(&ChatCompletionChunk::role("x", "m", 1));
        let StreamEvent::MessageStart { message } = &first[0] else {
            panic!("{first:?}");
        };
        assert_eq!(message.usage.as_ref().unwrap().input_tokens, 7);
    }

    /// Extended thinking with tools, through Sluice from an Anthropic client to an Anthropic
    /// upstream: the signed thinking block reaches the client whole (streamed or not), and the
    /// client's next turn gives it back to the upstream unchanged, as Anthropic requires.
    #[test]
    fn signed_thinking_blocks_go_through_both_ways() {
        let upstream = parse_events(vec![
            json!({"type": "message_start", "message": {"id": "msg_t", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Need the "}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "weather."}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig-123"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 20}}),
            json!({"type": "message_stop"}),
        ]);
        let mut decoder = StreamDecoder::new();
        let mut encoder = StreamEncoder::new("c", "claude");
        let mut acc = ChunkAccumulator::default();
        let mut events = Vec::new();
        let mut listed = Vec::new();
        for ev in upstream {
            for c in decoder.on_event(ev).unwrap() {
                acc.push(&c);
                events.extend(encoder.on_chunk(&c));
                for choice in &c.choices {
                    if let Some(Value::Array(blocks)) = choice.delta.extra.get(THINKING_BLOCKS) {
                        listed.extend(blocks.iter().map(|b| b["index"].clone()));
                    }
                }
            }
        }
        events.extend(encoder.finish());
        // Each streamed entry of the OpenAI-shaped list has its index (the OpenAI SDKs' stream
        // helpers merge list deltas by it).
        assert_eq!(listed, [json!(0), json!(1)]);
        // The client's stream: thinking (text, then signature), redacted thinking, the tool.
        let blocks: Vec<Value> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ContentBlockStart { content_block, .. } => {
                    Some(json!({"start": content_block.kind()}))
                }
                StreamEvent::ContentBlockDelta { delta, .. } => {
                    Some(serde_json::to_value(delta).unwrap())
                }
                StreamEvent::ContentBlockStop { .. } => Some(json!("stop")),
                _ => None,
            })
            .collect();
        assert_eq!(
            blocks,
            [
                json!({"start": "thinking"}),
                json!({"type": "thinking_delta", "thinking": "Need the "}),
                json!({"type": "thinking_delta", "thinking": "weather."}),
                json!({"type": "signature_delta", "signature": "sig-123"}),
                json!("stop"),
                json!({"start": "redacted_thinking"}),
                json!("stop"),
                json!({"start": "tool_use"}),
                json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\""}),
                json!({"type": "input_json_delta", "partial_json": "}"}),
                json!("stop"),
            ]
        );
        // Whole (not streamed), the same blocks come first.
        let completion = acc.finish();
        let whole = response_from_openai(&completion, "claude");
        let whole = serde_json::to_value(&whole.content).unwrap();
        assert_eq!(
            whole[0],
            json!({"type": "thinking", "thinking": "Need the weather.", "signature": "sig-123"})
        );
        assert_eq!(
            whole[1],
            json!({"type": "redacted_thinking", "data": "opaque"})
        );
        assert_eq!(whole[2]["type"], "tool_use");

        // The client's next turn carries them back; the upstream gets them before the tool use.
        let next: MessagesRequest = serde_json::from_value(json!({
            "model": "claude", "max_tokens": 100,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": whole},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}
            ]
        }))
        .unwrap();
        let chat = request_to_openai(&next).unwrap();
        let upstream_body = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        let assistant = &upstream_body["messages"][1]["content"];
        assert_eq!(assistant[0], whole[0], "{upstream_body:#}");
        assert_eq!(assistant[1], whole[1], "{upstream_body:#}");
        assert_eq!(assistant[2]["type"], "tool_use", "{upstream_body:#}");
    }

    /// Interleaved arguments of parallel tool calls, and text between a call's argument pieces:
    /// every delta goes to the block that is open, and a tool block stops only once its
    /// arguments are whole (they used to follow its `content_block_stop`).
    #[test]
    fn a_tool_block_stays_open_until_its_arguments_are_whole() {
        let chunk = |delta: Value, finish: Option<&str>| -> ChatCompletionChunk {
            serde_json::from_value(json!({
                "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            }))
            .unwrap()
        };
        let call = |i: u32, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut c = json!({"index": i, "function": {"arguments": args}});
            if let Some(id) = id {
                c["id"] = json!(id);
                c["type"] = json!("function");
            }
            if let Some(n) = name {
                c["function"]["name"] = json!(n);
            }
            c
        };
        let trace = |chunks: Vec<ChatCompletionChunk>| -> Vec<Value> {
            let mut encoder = StreamEncoder::new("c", "m");
            let mut events = Vec::new();
            for c in &chunks {
                events.extend(encoder.on_chunk(c));
            }
            events.extend(encoder.finish());
            let mut open: Option<u32> = None;
            let mut out = Vec::new();
            for e in &events {
                match e {
                    StreamEvent::ContentBlockStart {
                        index,
                        content_block,
                    } => {
                        assert!(open.is_none(), "block {index} starts inside another");
                        open = Some(*index);
                        let v = serde_json::to_value(content_block).unwrap();
                        out.push(json!({"start": index, "type": v["type"], "id": v["id"]}));
                    }
                    StreamEvent::ContentBlockDelta { index, delta } => {
                        assert_eq!(open, Some(*index), "a delta for a block not open");
                        let v = serde_json::to_value(delta).unwrap();
                        out.push(v.get("partial_json").or(v.get("text")).cloned().unwrap());
                    }
                    StreamEvent::ContentBlockStop { index } => {
                        assert_eq!(open.take(), Some(*index));
                        out.push(json!({"stop": index}));
                    }
                    StreamEvent::MessageDelta { delta, .. } => {
                        out.push(json!({"stop_reason": delta.stop_reason}));
                    }
                    _ => {}
                }
            }
            out
        };
        // The first call closes as soon as its arguments are whole, not at the end.
        let mut encoder = StreamEncoder::new("c", "m");
        encoder.on_chunk(&chunk(
            json!({"tool_calls": [call(0, Some("a"), Some("f"), ""), call(1, Some("b"), Some("g"), "")]}),
            None,
        ));
        let now = encoder.on_chunk(&chunk(
            json!({"tool_calls": [call(0, None, None, "{\"x\":1}")]}),
            None,
        ));
        assert!(
            now.iter()
                .any(|e| matches!(e, StreamEvent::ContentBlockStop { index: 0 }))
                && now
                    .iter()
                    .any(|e| matches!(e, StreamEvent::ContentBlockStart { index: 1, .. })),
            "{now:?}"
        );
        // Two calls started at once, their arguments after.
        let got = trace(vec![
            chunk(
                json!({"tool_calls": [call(0, Some("a"), Some("f"), ""), call(1, Some("b"), Some("g"), "")]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [call(0, None, None, "{\"x\":1}")]}),
                None,
            ),
            chunk(json!({"tool_calls": [call(1, None, None, "{}")]}), None),
            chunk(json!({}), Some("tool_calls")),
        ]);
        assert_eq!(
            got,
            [
                json!({"start": 0, "type": "tool_use", "id": "a"}),
                json!("{\"x\":1"),
                // An object's closing brace is sent when its block stops.
                json!("}"),
                json!({"stop": 0}),
                json!({"start": 1, "type": "tool_use", "id": "b"}),
                json!("{"),
                json!("}"),
                json!({"stop": 1}),
                json!({"stop_reason": "tool_use"}),
            ]
        );
        // Text between two pieces of a call's arguments comes after the call; a call streamed
        // whole before the next one starts is sent as it comes.
        let got = trace(vec![
            chunk(
                json!({"tool_calls": [call(0, Some("a"), Some("f"), "{\"x\"")]}),
                None,
            ),
            chunk(json!({"content": "Hi"}), None),
            chunk(json!({"tool_calls": [call(0, None, None, ":1}")]}), None),
            chunk(
                json!({"tool_calls": [call(1, Some("b"), Some("g"), "{}")]}),
                None,
            ),
            chunk(json!({}), Some("tool_calls")),
        ]);
        assert_eq!(
            got,
            [
                json!({"start": 0, "type": "tool_use", "id": "a"}),
                json!("{\"x\""),
                json!(":1"),
                json!("}"),
                json!({"stop": 0}),
                json!({"start": 1, "type": "text", "id": null}),
                json!("Hi"),
                json!({"stop": 1}),
                json!({"start": 2, "type": "tool_use", "id": "b"}),
                json!("{"),
                json!("}"),
                json!({"stop": 2}),
                json!({"stop_reason": "tool_use"}),
            ]
        );
        let got = trace(vec![
            chunk(
                json!({"tool_calls": [call(0, Some("a"), Some("f"), "{}")]}),
                None,
            ),
            chunk(
                json!({"tool_calls": [call(1, Some("b"), Some("g"), "{\"y\"")]}),
                None,
            ),
            chunk(json!({"tool_calls": [call(1, None, None, ":2}")]}), None),
        ]);
        assert_eq!(
            got[..7],
            [
                json!({"start": 0, "type": "tool_use", "id": "a"}),
                json!("{"),
                json!("}"),
                json!({"stop": 0}),
                json!({"start": 1, "type": "tool_use", "id": "b"}),
                json!("{\"y\""),
                json!(":2"),
            ]
        );
    }

    /// A turn whose blocks the default order would move (text before thinking, text after a
    /// tool call, two text blocks) keeps its own order both ways: an Anthropic answer reaches a
    /// `/v1/messages` client as it was made, and a client's turn reaches an Anthropic upstream
    /// as it was sent (Anthropic wants a turn with thinking back exactly as it made it).
    #[test]
    fn a_turns_block_order_survives_both_ways() {
        let turns = [
            json!([
                {"type": "text", "text": "Let me look."},
                {"type": "thinking", "thinking": "T1", "signature": "s1"},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {"q": 1}}
            ]),
            json!([
                {"type": "thinking", "thinking": "T1", "signature": "s1"},
                {"type": "text", "text": "First."},
                {"type": "thinking", "thinking": "T2", "signature": "s2"},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {}}
            ]),
            json!([
                {"type": "text", "text": "A é."},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                {"type": "text", "text": "B."}
            ]),
            json!([
                {"type": "text", "text": "Part one."},
                {"type": "text", "text": " Part two."}
            ]),
        ];
        for blocks in turns {
            // An answer: Anthropic → OpenAI shape → a /v1/messages client.
            let upstream: MessagesResponse = serde_json::from_value(json!({
                "id": "msg_o", "type": "message", "role": "assistant", "model": "claude",
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 9}, "content": blocks
            }))
            .unwrap();
            let completion = response_to_openai(upstream);
            let back = response_from_openai(&completion, "claude");
            assert_eq!(serde_json::to_value(&back.content).unwrap(), blocks);
            // A client's turn: /v1/messages → OpenAI shape → an Anthropic upstream.
            let req: MessagesRequest = serde_json::from_value(json!({
                "model": "claude", "max_tokens": 100,
                "messages": [
                    {"role": "user", "content": "Go"},
                    {"role": "assistant", "content": blocks},
                    {"role": "user", "content": "More"}
                ]
            }))
            .unwrap();
            let chat = request_to_openai(&req).unwrap();
            let up = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
            assert_eq!(up["messages"][1]["content"], blocks, "{up:#}");
        }
        // A block of whitespace alone goes with the text after it (Anthropic refuses one).
        let spaced: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_o", "type": "message", "role": "assistant", "model": "claude",
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 5, "output_tokens": 9},
            "content": [
                {"type": "text", "text": "Para 1"}, {"type": "text", "text": "\n\n"},
                {"type": "text", "text": "Para 2"}, {"type": "text", "text": " "}
            ]
        }))
        .unwrap();
        let back = response_from_openai(&response_to_openai(spaced), "claude");
        assert_eq!(
            serde_json::to_value(&back.content).unwrap(),
            json!([{"type": "text", "text": "Para 1"}, {"type": "text", "text": "\n\nPara 2"}])
        );
        // A turn in the default order carries no order of its own.
        let plain: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_o", "type": "message", "role": "assistant", "model": "claude",
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 5, "output_tokens": 9},
            "content": [
                {"type": "thinking", "thinking": "T1", "signature": "s1"},
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {}}
            ]
        }))
        .unwrap();
        let completion = response_to_openai(plain);
        assert!(
            !completion.choices[0]
                .message
                .extra
                .contains_key(BLOCK_ORDER)
        );
        // An order that does not fit the message (a client changed the text) is not used.
        let mut changed = response_to_openai(
            serde_json::from_value(json!({
                "id": "msg_o", "type": "message", "role": "assistant", "model": "claude",
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 9},
                "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]
            }))
            .unwrap(),
        );
        changed.choices[0].message.content = Some("One. Two. Three.".into());
        let back = response_from_openai(&changed, "claude");
        assert_eq!(
            serde_json::to_value(&back.content).unwrap(),
            json!([{"type": "text", "text": "One. Two. Three."}])
        );
    }

    /// A breakpoint on a block inside a tool result marks the result (it was lost: the result's
    /// text becomes one string in the OpenAI shape).
    #[test]
    fn a_breakpoint_inside_a_tool_result_marks_the_result() {
        let cc = json!({"type": "ephemeral"});
        // A turn that calls tool `t1`, and its result of these blocks.
        let with_result = |content: Value| -> MessagesRequest {
            serde_json::from_value(json!({
                "model": "claude", "max_tokens": 100,
                "messages": [
                    {"role": "user", "content": "Go"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "a", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": content}]}
                ]
            }))
            .unwrap()
        };
        let req = with_result(json!([
            {"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": cc}
        ]));
        let chat = request_to_openai(&req).unwrap();
        assert_eq!(chat.messages[2].extra.get(CACHE_CONTROL), Some(&cc));
        let up = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        assert_eq!(
            up["messages"][2]["content"][0]["cache_control"], cc,
            "{up:#}"
        );
        // An image's mark stays on the image (which goes to the user message after the result):
        // lifted too, it would be sent twice.
        let req = with_result(json!([
            {"type": "text", "text": "a"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}, "cache_control": cc}
        ]));
        let chat = request_to_openai(&req).unwrap();
        assert_eq!(chat.messages[2].extra.get(CACHE_CONTROL), None);
        let up = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        let marks = up.to_string().matches("ephemeral").count();
        assert_eq!(marks, 1, "{up:#}");
    }

    /// A Messages tool's own fields reach an Anthropic upstream as the client sent them.
    #[test]
    fn a_tools_own_fields_go_through() {
        let tool = json!({
            "type": "custom", "name": "get_weather", "description": "Weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": true, "input_examples": [{"city": "Oslo"}], "defer_loading": true,
            "cache_control": {"type": "ephemeral"}
        });
        let req: MessagesRequest = serde_json::from_value(json!({
            "model": "claude", "max_tokens": 100, "tools": [tool],
            "messages": [{"role": "user", "content": "Go"}]
        }))
        .unwrap();
        let chat = request_to_openai(&req).unwrap();
        let up = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        assert_eq!(up["tools"][0], tool, "{up:#}");
    }

    /// Interleaved thinking (a thinking block before each tool call) keeps its order both ways.
    #[test]
    fn interleaved_thinking_keeps_its_place() {
        let upstream: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_i", "type": "message", "role": "assistant", "model": "claude",
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 5, "output_tokens": 9},
            "content": [
                {"type": "thinking", "thinking": "First.", "signature": "s1"},
                {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                {"type": "thinking", "thinking": "Then.", "signature": "s2"},
                {"type": "tool_use", "id": "t2", "name": "b", "input": {}}
            ]
        }))
        .unwrap();
        let want = serde_json::to_value(&upstream.content).unwrap();
        let completion = response_to_openai(upstream);
        let client =
            serde_json::to_value(response_from_openai(&completion, "claude").content).unwrap();
        assert_eq!(client, want);
        let next: MessagesRequest = serde_json::from_value(json!({
            "model": "claude", "max_tokens": 100,
            "messages": [
                {"role": "user", "content": "Go"},
                {"role": "assistant", "content": client},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "1"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "2"}
                ]}
            ]
        }))
        .unwrap();
        let body =
            serde_json::to_value(request_from_openai(&request_to_openai(&next).unwrap()).unwrap())
                .unwrap();
        assert_eq!(body["messages"][1]["content"], want, "{body:#}");
    }

    /// A client that did not turn thinking on gets no thinking blocks, whole or streamed, even
    /// from a model that reasons anyway (as from Anthropic, which sends them only when asked).
    #[test]
    fn thinking_blocks_only_for_a_client_that_asked_for_thinking() {
        let req = |thinking: Value| -> MessagesRequest {
            let mut body = json!({"model": "m", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]});
            if !thinking.is_null() {
                body["thinking"] = thinking;
            }
            serde_json::from_value(body).unwrap()
        };
        assert!(!req(Value::Null).wants_thinking());
        assert!(!req(json!({"type": "disabled"})).wants_thinking());
        assert!(req(json!({"type": "enabled", "budget_tokens": 1024})).wants_thinking());

        let completion: ChatCompletion = serde_json::from_value(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "deepseek-r1",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "42", "reasoning_content": "Think."}}]
        }))
        .unwrap();
        let mut out = response_from_openai(&completion, "m");
        without_thinking(&mut out);
        let content = serde_json::to_value(&out.content).unwrap();
        assert_eq!(content, json!([{"type": "text", "text": "42"}]));

        let mut encoder = StreamEncoder::new("c", "m").without_thinking();
        let chunk: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"reasoning_content": "Hmm.", "content": "Yes"}}]
        }))
        .unwrap();
        let mut events = encoder.on_chunk(&chunk);
        events.extend(encoder.finish());
        let starts: Vec<&ContentBlock> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ContentBlockStart { content_block, .. } => Some(content_block),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 1, "{events:?}");
        assert!(matches!(starts[0], ContentBlock::Text { .. }), "{events:?}");
    }

    /// Another model's reasoning reaches an Anthropic client as an unsigned thinking block; given
    /// back, it is not sent to an Anthropic upstream (which would refuse it).
    #[test]
    fn unsigned_reasoning_is_shown_but_never_sent_to_anthropic() {
        let completion: ChatCompletion = serde_json::from_value(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "deepseek-r1",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "42", "reasoning_content": "Think."}}]
        }))
        .unwrap();
        let out = serde_json::to_value(response_from_openai(&completion, "m").content).unwrap();
        assert_eq!(
            out[0],
            json!({"type": "thinking", "thinking": "Think.", "signature": ""})
        );
        assert_eq!(out[1], json!({"type": "text", "text": "42"}));
        let mut encoder = StreamEncoder::new("c", "m");
        let chunk: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"reasoning": "Hmm."}}]
        }))
        .unwrap();
        let events = encoder.on_chunk(&chunk);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, StreamEvent::ContentBlockDelta {
                delta: BlockDelta::ThinkingDelta { thinking }, ..
            } if thinking == "Hmm.")),
            "{events:?}"
        );

        let next: MessagesRequest = serde_json::from_value(json!({
            "model": "claude", "max_tokens": 100,
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": out},
                {"role": "user", "content": "More"}
            ]
        }))
        .unwrap();
        let body =
            serde_json::to_value(request_from_openai(&request_to_openai(&next).unwrap()).unwrap())
                .unwrap();
        assert_eq!(
            body["messages"][1]["content"],
            json!([{"type": "text", "text": "42"}])
        );
    }

    #[test]
    fn an_error_event_keeps_its_type() {
        let mut decoder = StreamDecoder::new();
        let ev: StreamEvent = serde_json::from_value(
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
        .expect("event parses");
        let e = decoder.on_event(ev).expect_err("an error");
        assert_eq!(stream_error_kind(&e.0), Some("overloaded_error"));
        assert!(e.0.ends_with("Overloaded"), "{e}");
        assert_eq!(stream_error_kind("something else"), None);
    }

    #[test]
    fn a_streamed_tool_call_without_arguments_gets_the_empty_object() {
        let events = parse_events(vec![
            json!({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": [], "model": "claude-haiku-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "now", "input": {}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":\"Oslo\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ]);
        let mut decoder = StreamDecoder::new();
        let mut acc = ChunkAccumulator::default();
        for ev in events {
            for c in decoder.on_event(ev).expect("no error") {
                acc.push(&c);
            }
        }
        let done = acc.finish();
        let calls = done.choices[0]
            .message
            .tool_calls
            .as_ref()
            .expect("tool calls");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, "{}");
        assert_eq!(calls[1].function.arguments, "{\"city\":\"Oslo\"}");
    }

    /// A plain-text `document` goes as text after its title; a document of a source OpenAI's
    /// shape cannot carry is refused naming the source (every document but a base64 PDF was
    /// refused as if documents were not supported at all).
    #[test]
    fn text_documents_go_as_text_and_others_name_their_source() {
        let req: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."}, "title": "Facts"},
                {"type": "text", "text": "What colour is the grass?"}
            ]}]
        }))
        .unwrap();
        let chat = request_to_openai(&req).unwrap();
        let body = serde_json::to_value(&chat.messages[0]).unwrap();
        assert_eq!(
            body["content"][0],
            json!({"type": "text", "text": "Facts\n\nThe grass is green."})
        );
        let req: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
            ]}]
        }))
        .unwrap();
        let e = request_to_openai(&req).expect_err("a URL source");
        assert!(e.0.contains("with a `url` source"), "{}", e.0);
    }

    /// A `/v1/messages` request with a message of no blocks is told which (it was told the
    /// request had no message at all).
    #[test]
    fn an_empty_message_on_v1_messages_is_named() {
        let req: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}, {"role": "user", "content": []}]
        }))
        .unwrap();
        let e = request_to_openai(&req).expect_err("empty content");
        assert_eq!(e.1, crate::TranslateKind::Invalid);
        assert!(
            e.0.starts_with("messages[1]: content must not be empty"),
            "{}",
            e.0
        );
        // A final assistant message may be empty (a prefill of nothing).
        let req: MessagesRequest = serde_json::from_value(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]
        }))
        .unwrap();
        assert!(request_to_openai(&req).is_ok());
    }

    /// A conversation with no message Anthropic can take (only empty text, or only a system
    /// prompt) is refused by Sluice with the reason (it went as `messages: []`).
    #[test]
    fn a_conversation_with_nothing_for_anthropic_is_refused() {
        for messages in [
            json!([{"role": "user", "content": ""}]),
            json!([{"role": "user", "content": "   "}]),
            json!([{"role": "system", "content": "be brief"}]),
        ] {
            let req: ChatRequest =
                serde_json::from_value(json!({"model": "claude", "messages": messages})).unwrap();
            let e = request_from_openai(&req).expect_err("nothing to send");
            assert!(e.0.contains("has none"), "{messages}: {}", e.0);
        }
    }

    /// OpenAI fields Anthropic has nothing for are refused, not dropped (a forced legacy
    /// function was never called).
    #[test]
    fn openai_fields_anthropic_cannot_do_are_refused() {
        for (extra, says) in [
            (
                json!({"functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"}}),
                "functions",
            ),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"modalities": ["text", "audio"]}), "audio"),
            (
                json!({"audio": {"voice": "alloy", "format": "wav"}}),
                "audio",
            ),
            (json!({"web_search_options": {}}), "web_search_options"),
        ] {
            let mut body =
                json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let req: ChatRequest = serde_json::from_value(body).unwrap();
            let e = request_from_openai(&req).expect_err(says);
            assert_eq!(e.1, crate::TranslateKind::Unsupported, "{says}");
            assert!(e.0.contains(says), "{says}: {}", e.0);
        }
        // Text-only modalities are fine.
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "claude", "modalities": ["text"], "messages": [{"role": "user", "content": "hi"}]
        }))
        .unwrap();
        assert!(request_from_openai(&req).is_ok());
    }

    /// Tool-call ids Anthropic refuses (`functions.get_weather:0` from a Kimi-style server, in a
    /// conversation that moves to Claude) are made valid, the call's and its result's alike
    /// (they went as they were, and Anthropic answered 400).
    #[test]
    fn tool_call_ids_are_made_valid_for_anthropic() {
        let req: ChatRequest = serde_json::from_value(json!({
            "model": "claude",
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                    {"id": "call_ok-1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_ok-1", "content": "rainy"}
            ]
        }))
        .unwrap();
        let out = serde_json::to_value(request_from_openai(&req).unwrap()).unwrap();
        let ids = |message: usize, field: &str| -> Vec<String> {
            out["messages"][message]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[field].as_str().unwrap().to_string())
                .collect()
        };
        let (uses, results) = (ids(1, "id"), ids(2, "tool_use_id"));
        assert_eq!(uses, results);
        assert_eq!(uses[1], "call_ok-1", "a valid id is kept");
        assert!(
            uses[0].starts_with("functions_get_weather_0_"),
            "{}",
            uses[0]
        );
        assert!(
            uses[0]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{}",
            uses[0]
        );
        assert_ne!(
            anthropic_tool_id("a.b"),
            anthropic_tool_id("a:b"),
            "ids that differ stay apart"
        );
    }

    /// Decodes an Anthropic stream to OpenAI chunks and encodes those for a `/v1/messages`
    /// client: the chunks folded, and the client's events.
    fn through(
        upstream: Vec<StreamEvent>,
        mut encoder: StreamEncoder,
    ) -> (crate::openai::ChatCompletion, Vec<StreamEvent>) {
        let mut decoder = StreamDecoder::new();
        let mut acc = ChunkAccumulator::default();
        let mut events = Vec::new();
        for ev in upstream {
            for c in decoder.on_event(ev).expect("no error") {
                acc.push(&c);
                events.extend(encoder.on_chunk(&c));
            }
        }
        events.extend(encoder.finish());
        (acc.finish(), events)
    }

    /// A Claude stream with a server tool's blocks (`server_tool_use` with its input deltas, its
    /// result) decodes to the text around them, and `pause_turn` reaches a `/v1/messages` client
    /// as sent, streamed and whole (the input deltas failed the stream with 502, and the turn
    /// ended as `end_turn`, so the client never continued it).
    #[test]
    fn server_tool_blocks_pass_over_and_pause_turn_survives() {
        let upstream = parse_events(vec![
            json!({"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Searching."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"query\": \"x\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}}),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "message_delta", "delta": {"stop_reason": "pause_turn", "stop_sequence": null}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ]);
        let (done, events) = through(upstream, StreamEncoder::new("c", "claude"));
        assert_eq!(
            done.choices[0].message.content.as_deref(),
            Some("Searching.")
        );
        assert!(done.choices[0].message.tool_calls.is_none());
        assert_eq!(done.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            done.choices[0].extra.get(UPSTREAM_STOP_REASON),
            Some(&json!("pause_turn"))
        );
        let streamed = events.iter().find_map(|e| match e {
            StreamEvent::MessageDelta { delta, .. } => delta.stop_reason.clone(),
            _ => None,
        });
        assert_eq!(streamed.as_deref(), Some("pause_turn"));
        let whole = response_from_openai(&done, "claude");
        assert_eq!(whole.stop_reason.as_deref(), Some("pause_turn"));
        // A stop reason OpenAI can say is not repeated.
        assert!(stop_extra(Some("end_turn"), None).is_empty());
        assert!(stop_extra(Some("max_tokens"), None).is_empty());
    }

    #[test]
    fn stream_decoder_folds_to_the_expected_completion() {
        let events = recorded_stream();
        assert_eq!(events[1], StreamEvent::Ping);
        let mut decoder = StreamDecoder::new();
        let mut chunks = Vec::new();
        for ev in events {
            let name = ev.name();
            let out = decoder.on_event(ev).expect("no error");
            if name == "ping" || name == "content_block_stop" {
                assert!(out.is_empty(), "{name} yields no chunk");
            }
            chunks.extend(out);
        }
        // role, 2 text, tool start, 2 argument deltas, finish, usage.
        assert_eq!(chunks.len(), 8);
        assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
        assert!(
            chunks
                .iter()
                .all(|c| c.id == "msg_stream" && c.model == "claude-haiku-4-5")
        );
        assert!(chunks.iter().all(|c| c.created == chunks[0].created));
        let last = chunks.last().expect("usage chunk");
        assert!(last.choices.is_empty());

        let tool_start = &chunks[3].choices[0]
            .delta
            .tool_calls
            .as_ref()
            .expect("tool delta")[0];
        assert_eq!(
            tool_start.index, 0,
            "tool index counts tool blocks, not content blocks"
        );
        assert_eq!(tool_start.kind.as_deref(), Some("function"));

        let mut acc = ChunkAccumulator::default();
        for c in &chunks {
            acc.push(c);
        }
        let done = acc.finish();
        assert_eq!(done.id, "msg_stream");
        let choice = &done.choices[0];
        assert_eq!(choice.message.content.as_deref(), Some("Let me check."));
        assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
        let calls = choice.message.tool_calls.as_ref().expect("tool calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id, "toolu_01");
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, "{\"city\": \"Paris\"}");
        let usage = done.usage.expect("usage");
        assert_eq!(usage.prompt_tokens, 30);
        assert_eq!(usage.completion_tokens, 42);
        assert_eq!(usage.cached_tokens(), 5);
    }

    #[test]
    fn stream_decoder_reports_error_events_and_ignores_unknown_ones() {
        let mut decoder = StreamDecoder::new();
        let unknown: StreamEvent =
            serde_json::from_value(json!({"type": "future_event", "x": 1})).expect("parses");
        assert_eq!(unknown.name(), "unknown");
        assert!(decoder.on_event(unknown).expect("ignored").is_empty());

        let ev: StreamEvent = serde_json::from_value(json!({
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}
        }))
        .expect("parses");
        assert_eq!(ev.name(), "error");
        let e = decoder.on_event(ev).expect_err("error event");
        assert!(
            e.0.contains("overloaded_error") && e.0.contains("Overloaded"),
            "{e}"
        );

        let stray = StreamEvent::ContentBlockDelta {
            index: 7,
            delta: BlockDelta::InputJsonDelta {
                partial_json: "{}".into(),
            },
        };
        assert!(decoder.on_event(stray).is_err());
    }

    fn messages_request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).expect("valid messages request")
    }

    /// A document without a title still has the file name OpenAI wants, and a file's name comes
    /// back as the document's title; the user id stays whole (the OpenAI provider cuts it).
    #[test]
    fn user_ids_and_untitled_documents_fit_openai() {
        let long = format!("user_{}_account_x_session_y", "a".repeat(64));
        let pdf = json!({"type": "document", "source": {"type": "base64",
            "media_type": "application/pdf", "data": "JVBERi0x"}});
        let req = messages_request(json!({
            "model": "m", "max_tokens": 5,
            "metadata": {"user_id": long},
            "messages": [{"role": "user", "content": [pdf, {"type": "text", "text": "Sum it up."}]}]
        }));
        let chat = request_to_openai(&req).expect("translates");
        assert_eq!(chat.user.as_deref(), Some(long.as_str()));
        let v = serde_json::to_value(&chat).unwrap();
        let file = &v["messages"][0]["content"][0]["file"];
        assert_eq!(file["filename"], "document.pdf", "{v:#}");
        // Back to Anthropic: the placeholder is no title; a real name is.
        let back = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        let doc = &back["messages"][0]["content"][0];
        assert_eq!(doc["type"], "document", "{back:#}");
        assert!(doc.get("title").is_none(), "{back:#}");
        let mut named = chat.clone();
        if let Some(Content::Parts(parts)) = &mut named.messages[0].content {
            parts[0].extra["file"]["filename"] = json!("q3-report.pdf");
        }
        let back = serde_json::to_value(request_from_openai(&named).unwrap()).unwrap();
        assert_eq!(back["messages"][0]["content"][0]["title"], "q3-report.pdf");
    }

    #[test]
    fn ingress_request_translates_and_round_trips() {
        let original = messages_request(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are helpful.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe and check the weather."},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3C"},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ],
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "stop_sequences": ["###"],
            "temperature": 0.5,
            "top_p": 0.8,
            "top_k": 40,
            "stream": true,
            "metadata": {"user_id": "user-7"}
        }));
        let chat = request_to_openai(&original).expect("translates");
        let expected = json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe and check the weather."},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "-3C"},
                {"role": "user", "content": "And tomorrow?"}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 1024,
            "temperature": 0.5,
            "top_p": 0.8,
            "stop": ["###"],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "user": "user-7",
            "parallel_tool_calls": false,
            "top_k": 40
        });
        assert_eq!(serde_json::to_value(&chat).expect("serializes"), expected);

        let back = request_from_openai(&chat).expect("translates back");
        assert_eq!(back, original);
    }

    #[test]
    fn ingress_request_error_results_and_unsupported_tools() {
        let req = messages_request(json!({
            "model": "m",
            "max_tokens": 10,
            "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "is_error": true, "content": [{"type": "text", "text": "boom"}]}
                ]}
            ],
            "tool_choice": {"type": "any"}
        }));
        let chat = request_to_openai(&req).expect("translates");
        assert_eq!(chat.messages[0].text_content(), "A\nB");
        assert_eq!(chat.messages[1].role, Role::Tool);
        assert_eq!(chat.messages[1].tool_call_id.as_deref(), Some("t1"));
        assert_eq!(chat.messages[1].text_content(), "Error: boom");
        // An Anthropic upstream gets the flag back, and the text as it was.
        let back = serde_json::to_value(request_from_openai(&chat).unwrap()).unwrap();
        assert_eq!(
            back["messages"][0]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "t1", "content": "boom", "is_error": true}),
            "{back:#}"
        );
        assert_eq!(chat.tool_choice, None, "no tools, no tool_choice");
        assert_eq!(chat.stream_options, None);

        let server_tool = messages_request(json!({
            "model": "m", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]
        }));
        let e = request_to_openai(&server_tool).expect_err("server tool");
        assert!(e.0.contains("web_search"), "{e}");

        let missing_cap: Result<MessagesRequest, _> =
            serde_json::from_value(json!({"model": "m", "messages": []}));
        assert!(missing_cap.is_err(), "max_tokens is required");
    }

    #[test]
    fn images_a_tool_returned_reach_the_model_after_the_tool_messages() {
        let req = messages_request(json!({
            "model": "m", "max_tokens": 10,
            "messages": [
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [
                        {"type": "text", "text": "the screenshot"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
                    ]},
                    {"type": "tool_result", "tool_use_id": "t2", "content": "plain"},
                    {"type": "text", "text": "What do you see?"}
                ]}
            ]
        }));
        let chat = request_to_openai(&req).expect("translates");
        assert_eq!(chat.messages.len(), 3, "{:?}", chat.messages);
        assert_eq!(chat.messages[0].role, Role::Tool);
        assert_eq!(chat.messages[0].text_content(), "the screenshot");
        assert_eq!(chat.messages[1].tool_call_id.as_deref(), Some("t2"));
        let user = &chat.messages[2];
        assert_eq!(user.role, Role::User);
        let Some(Content::Parts(parts)) = &user.content else {
            panic!("parts: {user:?}")
        };
        assert_eq!(parts.len(), 3, "{parts:?}");
        assert!(parts[0].text.as_deref().unwrap().contains("t1"));
        assert_eq!(
            parts[1].image_url.as_ref().unwrap().url,
            "data:image/png;base64,iVBORw0KGgo="
        );
        assert_eq!(parts[2].text.as_deref(), Some("What do you see?"));
    }

    #[test]
    fn the_stop_sequence_a_message_ended_on_survives_both_translations() {
        let upstream: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Counting: 1 2 3 "}],
            "stop_reason": "stop_sequence", "stop_sequence": "END",
            "usage": {"input_tokens": 5, "output_tokens": 7}
        }))
        .expect("parses");
        let openai = response_to_openai(upstream);
        assert_eq!(openai.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(openai.choices[0].extra["stop_reason"], "END");
        let back = response_from_openai(&openai, "claude");
        assert_eq!(back.stop_reason.as_deref(), Some("stop_sequence"));
        assert_eq!(back.stop_sequence.as_deref(), Some("END"));

        // Streamed: the decoder's finishing chunk names it, and the encoder passes it on.
        let events = parse_events(vec![
            json!({"type": "message_start", "message": {"id": "m2", "type": "message", "role": "assistant", "content": [], "model": "claude-haiku-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "1 2 3 "}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"}, "usage": {"output_tokens": 6}}),
            json!({"type": "message_stop"}),
        ]);
        let (folded, out) = through(events, StreamEncoder::new("m2", "claude"));
        let delta = out
            .iter()
            .find_map(|e| match e {
                StreamEvent::MessageDelta { delta, .. } => Some(delta.clone()),
                _ => None,
            })
            .expect("message_delta");
        assert_eq!(delta.stop_reason.as_deref(), Some("stop_sequence"));
        assert_eq!(delta.stop_sequence.as_deref(), Some("END"));
        // And a cached copy of the stream keeps it too.
        let whole = response_from_openai(&folded, "claude");
        assert_eq!(whole.stop_sequence.as_deref(), Some("END"));

        // A plain end names none.
        let mut plain = openai.clone();
        plain.choices[0].extra.clear();
        let back = response_from_openai(&plain, "claude");
        assert_eq!(back.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(back.stop_sequence, None);
    }

    #[test]
    fn ingress_response_maps_tool_calls_stop_reason_and_usage() {
        let resp: ChatCompletion = serde_json::from_value(json!({
            "id": "chatcmpl-123",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant",
                "content": "Calling.",
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{broken"}}
                ]
            }}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "prompt_tokens_details": {"cached_tokens": 60}}
        }))
        .expect("parses");
        let out = response_from_openai(&resp, "claude-alias");
        assert_eq!(out.id, "msg_chatcmpl-123");
        assert_eq!(out.model, "claude-alias");
        assert_eq!(out.kind, "message");
        assert_eq!(out.stop_reason.as_deref(), Some("tool_use"));
        assert_eq!(
            out.content,
            vec![
                ContentBlock::text("Calling."),
                ContentBlock::tool_use("call_a", "f", json!({"x": 1})),
                ContentBlock::tool_use("call_b", "g", json!({"_raw_arguments": "{broken"})),
            ]
        );
        assert_eq!(out.usage.as_ref().unwrap().input_tokens, 40);
        assert_eq!(out.usage.as_ref().unwrap().output_tokens, 20);
        assert_eq!(
            out.usage.as_ref().unwrap().cache_read_input_tokens,
            Some(60)
        );

        let json = serde_json::to_value(&out).expect("serializes");
        assert_eq!(json["type"], "message");
        assert_eq!(json["role"], "assistant");
        assert_eq!(json["stop_sequence"], Value::Null);

        let mut short = resp.clone();
        short.id = "msg_keep".into();
        short.choices[0].finish_reason = Some("length".into());
        short.choices[0].message.tool_calls = None;
        short.choices[0].message.content = Some(String::new());
        let out = response_from_openai(&short, "m");
        assert_eq!(out.id, "msg_keep");
        assert_eq!(out.stop_reason.as_deref(), Some("max_tokens"));
        assert!(out.content.is_empty(), "empty text is omitted");
        short.choices[0].finish_reason = Some("content_filter".into());
        assert_eq!(
            response_from_openai(&short, "m").stop_reason.as_deref(),
            Some("refusal")
        );
    }

    fn chunk(body: Value) -> ChatCompletionChunk {
        serde_json::from_value(body).expect("valid chunk")
    }

    fn text_then_tools_chunks() -> Vec<ChatCompletionChunk> {
        vec![
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            ),
            chunk(
                json!({"id": "c", "model": "gpt", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21, "prompt_tokens_details": {"cached_tokens": 2}}}),
            ),
        ]
    }

    #[test]
    fn stream_encoder_emits_anthropic_event_order() {
        let mut encoder = StreamEncoder::new("chatcmpl-1", "claude-alias");
        let mut events = Vec::new();
        for c in text_then_tools_chunks() {
            events.extend(encoder.on_chunk(&c));
        }
        events.extend(encoder.finish());
        let names: Vec<&str> = events.iter().map(StreamEvent::name).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                // A tool's closing brace, when its block stops.
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let indices: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ContentBlockStart { index, .. }
                | StreamEvent::ContentBlockDelta { index, .. }
                | StreamEvent::ContentBlockStop { index } => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(indices, [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]);

        let start = serde_json::to_value(&events[0]).expect("serializes");
        assert_eq!(
            start,
            json!({"type": "message_start", "message": {
                "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "content": [],
                "model": "claude-alias", "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
            }})
        );
        assert_eq!(
            serde_json::to_value(&events[1]).expect("serializes"),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        );
        assert_eq!(
            serde_json::to_value(&events[5]).expect("serializes"),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}})
        );
        assert_eq!(
            serde_json::to_value(&events[6]).expect("serializes"),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}})
        );
        assert_eq!(
            serde_json::to_value(&events[14]).expect("serializes"),
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                   "usage": {"output_tokens": 9, "input_tokens": 10,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2}})
        );
        assert_eq!(
            serde_json::to_value(&events[15]).expect("serializes"),
            json!({"type": "message_stop"})
        );

        assert!(encoder.finish().is_empty(), "finish is idempotent");
        assert!(encoder.on_chunk(&text_then_tools_chunks()[1]).is_empty());
    }

    /// The blocks an encoder emits for `chunks`: (`text` or the tool's id, its text or arguments).
    fn encoded_blocks(chunks: &[Value]) -> Vec<(String, String)> {
        let mut encoder = StreamEncoder::new("c", "m");
        let mut blocks: Vec<(String, String)> = Vec::new();
        let mut events = Vec::new();
        for c in chunks {
            events.extend(encoder.on_chunk(&chunk(c.clone())));
        }
        events.extend(encoder.finish());
        for ev in events {
            match ev {
                StreamEvent::ContentBlockStart {
                    index,
                    content_block,
                } => {
                    assert_eq!(index as usize, blocks.len());
                    let kind = match content_block {
                        ContentBlock::Text { .. } => "text".to_string(),
                        ContentBlock::ToolUse { id, .. } => id,
                        other => panic!("unexpected {other:?}"),
                    };
                    blocks.push((kind, String::new()));
                }
                StreamEvent::ContentBlockDelta { index, delta } => {
                    let (BlockDelta::TextDelta { text: piece }
                    | BlockDelta::InputJsonDelta {
                        partial_json: piece,
                    }) = delta
                    else {
                        panic!("unexpected delta");
                    };
                    blocks[index as usize].1.push_str(&piece);
                }
                _ => {}
            }
        }
        blocks
    }

    #[test]
    fn stream_encoder_opens_no_block_of_whitespace_alone() {
        let delta =
            |d: Value| json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": d}]});
        // Whitespace before a tool call: no text block (it would be refused when sent back).
        let blocks = encoded_blocks(&[
            delta(json!({"content": "\n\n"})),
            delta(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}),
            ),
        ]);
        assert_eq!(blocks, [("call_1".to_string(), "{}".to_string())]);
        // Whitespace before text goes with the text.
        let blocks = encoded_blocks(&[
            delta(json!({"content": "\n"})),
            delta(json!({"content": " "})),
            delta(json!({"content": "Hi"})),
            delta(json!({"content": "\n"})),
        ]);
        assert_eq!(blocks, [("text".to_string(), "\n Hi\n".to_string())]);
    }

    /// A chunk with a piece of tool call `f` at index 0 (Ollama's way); `id` starts a new call.
    fn tool_call_chunk(id: Option<&str>, args: &str) -> Value {
        let mut c = json!({"index": 0, "function": {"arguments": args}});
        if let Some(id) = id {
            c["id"] = json!(id);
            c["function"]["name"] = json!("f");
        }
        json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [c]}}]})
    }

    #[test]
    fn stream_encoder_separates_calls_that_share_an_index() {
        // Ollama sends every call at index 0: a new id is a new call.
        let call = tool_call_chunk;
        let blocks = encoded_blocks(&[
            call(Some("a"), "{\"p\":"),
            call(None, "\"x\"}"),
            call(Some("b"), "{\"p\":\"y\"}"),
        ]);
        assert_eq!(
            blocks,
            [
                ("a".to_string(), "{\"p\":\"x\"}".to_string()),
                ("b".to_string(), "{\"p\":\"y\"}".to_string())
            ]
        );
    }

    /// A call whose name comes in a later piece than its id starts its block with the name (the
    /// start carries it, and cannot be sent again); arguments that came before wait for it.
    #[test]
    fn stream_encoder_waits_for_a_tool_name_that_comes_later() {
        let call = |index: u32, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut c = json!({"index": index, "function": {"arguments": args}});
            if let Some(id) = id {
                c["id"] = json!(id);
            }
            if let Some(name) = name {
                c["function"]["name"] = json!(name);
            }
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [c]}}]})
        };
        let mut encoder = StreamEncoder::new("c", "m");
        let mut events = Vec::new();
        for c in [
            call(0, Some("call_1"), None, ""),
            call(0, None, None, "{\"city\""),
            call(0, None, Some("weather"), ": \"Oslo\"}"),
        ] {
            events.extend(encoder.on_chunk(&chunk(c)));
        }
        events.extend(encoder.finish());
        let blocks: Vec<Value> = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    StreamEvent::ContentBlockStart { .. } | StreamEvent::ContentBlockDelta { .. }
                )
            })
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        assert_eq!(
            blocks,
            [
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ": \"Oslo\""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "}"}}),
            ]
        );
        // Queued behind an unfinished call, a call whose first piece has an empty name takes the
        // name a later piece brings.
        let mut encoder = StreamEncoder::new("c", "m");
        let mut events = Vec::new();
        for c in [
            call(0, Some("a"), Some("f"), "{\"x\":"),
            call(1, Some("b"), Some(""), "{"),
            call(1, None, Some("g"), "}"),
            call(0, None, None, "1}"),
        ] {
            events.extend(encoder.on_chunk(&chunk(c)));
        }
        events.extend(encoder.finish());
        let names: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ContentBlockStart {
                    content_block: ContentBlock::ToolUse { name, .. },
                    ..
                } => Some(name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["f", "g"]);
        // Never named: the block still starts (before its stop), with the arguments.
        let blocks = encoded_blocks(&[call(0, Some("call_2"), None, "{}")]);
        assert_eq!(blocks, [("call_2".to_string(), "{}".to_string())]);
    }

    /// A model's malformed arguments never reach the client as text that cannot become JSON (the
    /// SDKs' stream helpers parse each piece and throw): what is valid goes out as it comes, and
    /// when the block stops, the object is closed with the arguments as they came under
    /// `_raw_arguments`, as in a whole answer. Text after a broken call still follows it.
    #[test]
    fn stream_encoder_sends_malformed_arguments_as_valid_json() {
        let call = tool_call_chunk;
        let text = |t: &str| json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": t}}]});
        let parse =
            |s: &str| -> Value { serde_json::from_str(s).unwrap_or_else(|e| panic!("{s}: {e}")) };
        // Python's dict syntax from the first character.
        let blocks = encoded_blocks(&[call(Some("a"), "{'city'"), call(None, ": 'Oslo'}")]);
        assert_eq!(blocks[0].0, "a");
        assert_eq!(
            parse(&blocks[0].1),
            json!({"_raw_arguments": "{'city': 'Oslo'}"})
        );
        // Valid at first, then not; a text after it waits for the call and follows it.
        let blocks = encoded_blocks(&[
            call(Some("a"), "{\"city\": \"Oslo\", "),
            call(None, "'unit': 'C'}"),
            text("Done."),
        ]);
        assert_eq!(
            parse(&blocks[0].1),
            json!({"city": "Oslo", "_raw_arguments": "{\"city\": \"Oslo\", 'unit': 'C'}"})
        );
        assert_eq!(blocks[1], ("text".to_string(), "Done.".to_string()));
        // Cut off in the middle (max_tokens): the object is closed, with what came.
        let blocks = encoded_blocks(&[call(Some("a"), "{\"q\": [1, {\"x\": \"ab")]);
        assert_eq!(
            parse(&blocks[0].1),
            json!({"q": [1, {"x": "ab"}], "_raw_arguments": "{\"q\": [1, {\"x\": \"ab"})
        );
        // `null` is the empty object, as in a whole answer; no arguments (or whitespace) stay
        // none, which clients take for `{}`.
        let blocks = encoded_blocks(&[
            call(Some("a"), "null"),
            call(Some("b"), ""),
            call(Some("c"), " \n"),
        ]);
        assert_eq!(parse(&blocks[0].1), json!({}));
        assert_eq!(blocks[1].1, "");
        assert_eq!(blocks[2].1, "");
        // `null` is whole: what comes after it is not held back to the end.
        let mut encoder = StreamEncoder::new("c", "m");
        encoder.on_chunk(&chunk(call(Some("a"), "null")));
        let now = encoder.on_chunk(&chunk(text("Done.")));
        assert!(
            now.iter()
                .any(|e| matches!(e, StreamEvent::ContentBlockStop { index: 0 })),
            "{now:?}"
        );
        // Text after a whole object, while its block is open, is reported in it (two objects
        // run together, as small models write parallel calls).
        let blocks = encoded_blocks(&[
            call(Some("a"), "{\"city\": \"Oslo\"}"),
            call(None, "{\"city\": \"Rome\"}"),
        ]);
        assert_eq!(
            parse(&blocks[0].1),
            json!({"city": "Oslo", "_raw_arguments": "{\"city\": \"Oslo\"}{\"city\": \"Rome\"}"})
        );
        // What comes after a block stopped (it was whole, and a text waited behind it) is
        // dropped, not sent to the stopped block.
        let blocks = encoded_blocks(&[
            call(Some("a"), "{\"p\": 1"),
            text("ok"),
            call(None, "}"),
            call(None, "}"),
        ]);
        assert_eq!(
            blocks,
            [
                ("a".to_string(), "{\"p\": 1}".to_string()),
                ("text".to_string(), "ok".to_string())
            ]
        );
    }

    #[test]
    fn egress_leaves_out_what_anthropic_refuses_and_refuses_what_it_cannot_do() {
        let req = chat_request(json!({
            "model": "claude", "stop": ["\n", " ", "END"],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "\n"},
                {"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "Go"}]}
            ]
        }));
        let body = serde_json::to_value(request_from_openai(&req).unwrap()).unwrap();
        assert_eq!(body["stop_sequences"], json!(["END"]));
        // The assistant's whitespace is gone; the user turns around it merge.
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1, "{body:#}");
        let texts: Vec<&str> = messages[0]["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect();
        assert_eq!(texts, ["Hi", "Go"]);

        for (field, value) in [
            ("response_format", json!({"type": "json_object"})),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            ),
        ] {
            let mut body =
                json!({"model": "claude", "messages": [{"role": "user", "content": "Hi"}]});
            body[field] = value;
            let e = request_from_openai(&chat_request(body)).unwrap_err();
            assert!(e.0.contains("not supported by Anthropic"), "{field}: {e}");
        }
        let text = json!({"model": "claude", "response_format": {"type": "text"},
                          "messages": [{"role": "user", "content": "Hi"}]});
        assert!(request_from_openai(&chat_request(text)).is_ok());
    }

    #[test]
    fn stream_encoder_finish_without_chunks() {
        let mut encoder = StreamEncoder::new("msg_x", "m").with_input_tokens(7);
        let events = encoder.finish();
        let names: Vec<&str> = events.iter().map(StreamEvent::name).collect();
        assert_eq!(names, ["message_start", "message_delta", "message_stop"]);
        match &events[0] {
            StreamEvent::MessageStart { message } => {
                assert_eq!(message.id, "msg_x");
                assert_eq!(message.usage.as_ref().unwrap().input_tokens, 7);
            }
            other => panic!("unexpected {other:?}"),
        }
        match &events[1] {
            StreamEvent::MessageDelta { delta, usage } => {
                assert_eq!(delta.stop_reason.as_deref(), Some("end_turn"));
                let usage = usage.as_ref().unwrap();
                assert_eq!(usage.output_tokens, 0);
                assert_eq!(usage.input_tokens, Some(7));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn encoder_output_decodes_back_to_the_same_completion() {
        let mut encoder = StreamEncoder::new("c", "claude-alias");
        let mut events = Vec::new();
        for c in text_then_tools_chunks() {
            events.extend(encoder.on_chunk(&c));
        }
        events.extend(encoder.finish());

        let mut decoder = StreamDecoder::new();
        let mut acc = ChunkAccumulator::default();
        for ev in events {
            // Through the wire format, as a client would see it.
            let wire = serde_json::to_string(&ev).expect("serializes");
            let parsed: StreamEvent = serde_json::from_str(&wire).expect("parses");
            assert_eq!(parsed, ev);
            for c in decoder.on_event(parsed).expect("no error") {
                acc.push(&c);
            }
        }
        let done = acc.finish();
        let msg = &done.choices[0].message;
        assert_eq!(msg.content.as_deref(), Some("Hello"));
        let calls = msg.tool_calls.as_ref().expect("tool calls");
        assert_eq!(
            calls
                .iter()
                .map(|c| (
                    c.id.as_str(),
                    c.function.name.as_str(),
                    c.function.arguments.as_str()
                ))
                .collect::<Vec<_>>(),
            [("call_1", "f", "{\"a\":1}"), ("call_2", "g", "{}")]
        );
        assert_eq!(done.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        let usage = done.usage.expect("usage");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 9));
        assert_eq!(usage.cached_tokens(), 2);
    }

    #[test]
    fn error_types_and_bodies() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (409, "conflict_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "api_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type_for_status(status), kind, "{status}");
        }
        let body = ErrorResponse::for_status(429, "slow down");
        assert_eq!(
            serde_json::to_value(&body).expect("serializes"),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
        );
        let parsed: ErrorResponse = serde_json::from_value(json!({
            "type": "error",
            "error": {"type": "not_found_error", "message": "no such model"},
            "request_id": "req_1"
        }))
        .expect("parses");
        assert_eq!(parsed.error.kind, "not_found_error");
        assert_eq!(parsed.extra["request_id"], "req_1");
    }

    /// Prompt caching and extended thinking through `/v1/messages`: every breakpoint (system,
    /// tools, text, images, tool calls, tool results) and the request's own top-level fields come
    /// back out of the OpenAI shape as the client sent them.
    #[test]
    fn cache_breakpoints_and_top_level_fields_survive_the_round_trip() {
        let cc = json!({"type": "ephemeral"});
        let body = json!({
            "model": "claude",
            "max_tokens": 2048,
            "system": [
                {"type": "text", "text": "You are a coding agent."},
                {"type": "text", "text": "Notes.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
            ],
            "messages": [
                {"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}, "cache_control": cc},
                    {"type": "text", "text": "Open main.rs", "cache_control": cc}
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Reading."},
                    {"type": "text", "text": " Now.", "cache_control": cc},
                    {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "main.rs"}, "cache_control": cc}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "fn main() {}", "cache_control": cc},
                    {"type": "text", "text": "Explain."}
                ]}
            ],
            "tools": [
                {"name": "read", "input_schema": {"type": "object"}},
                {"name": "grep", "input_schema": {"type": "object"}, "cache_control": cc}
            ],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "cache_control": cc,
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}
        });
        let chat = request_to_openai(&messages_request(body.clone())).expect("translates");

        // The OpenAI shape: breakpoints on parts, tools, tool calls and the tool message.
        let v = serde_json::to_value(&chat).unwrap();
        assert_eq!(
            v["messages"][0]["content"][1]["cache_control"]["ttl"], "1h",
            "{v:#}"
        );
        assert_eq!(v["messages"][1]["content"][0]["cache_control"], cc, "{v:#}");
        assert_eq!(v["messages"][1]["content"][1]["cache_control"], cc, "{v:#}");
        assert_eq!(v["messages"][2]["content"][1]["cache_control"], cc, "{v:#}");
        assert_eq!(
            v["messages"][2]["tool_calls"][0]["cache_control"], cc,
            "{v:#}"
        );
        assert_eq!(v["messages"][3]["role"], "tool", "{v:#}");
        assert_eq!(v["messages"][3]["cache_control"], cc, "{v:#}");
        assert_eq!(v["messages"][4]["content"], "Explain.", "{v:#}");
        assert_eq!(v["tools"][1]["cache_control"], cc, "{v:#}");
        assert!(v["tools"][0].get("cache_control").is_none(), "{v:#}");
        assert_eq!(v[ANTHROPIC_FIELDS]["thinking"], body["thinking"], "{v:#}");
        assert!(
            v.get("thinking").is_none(),
            "only under `{ANTHROPIC_FIELDS}`: {v:#}"
        );

        let back = serde_json::to_value(request_from_openai(&chat).expect("back")).unwrap();
        assert_eq!(back, body);
    }

    /// `reasoning_effort` becomes a thinking budget under the client's cap.
    #[test]
    fn reasoning_effort_becomes_a_thinking_budget() {
        let out = |body: Value| {
            request_from_openai(&chat_request(body))
                .map(|r| serde_json::to_value(r).expect("serializes"))
        };
        let msgs = json!([{"role": "user", "content": "Prove it."}]);
        // No cap: the budget, with Anthropic's default output on top of it.
        let o = out(json!({"model": "m", "messages": msgs, "reasoning_effort": "high"})).unwrap();
        assert_eq!(
            o["thinking"],
            json!({"type": "enabled", "budget_tokens": 24576})
        );
        assert_eq!(o["max_tokens"], 24576 + DEFAULT_MAX_TOKENS, "{o:#}");
        assert!(o.get("reasoning_effort").is_none(), "{o:#}");
        // A cap: the reasoning fits under it, as OpenAI counts it.
        let o = out(
            json!({"model": "m", "messages": msgs, "reasoning_effort": "medium",
            "max_completion_tokens": 2000}),
        )
        .unwrap();
        assert_eq!(o["thinking"]["budget_tokens"], 1999, "{o:#}");
        assert_eq!(o["max_tokens"], 2000, "{o:#}");
        // No room for the least budget, or `none`: no thinking.
        for body in [
            json!({"model": "m", "messages": msgs, "reasoning_effort": "low", "max_tokens": 1024}),
            json!({"model": "m", "messages": msgs, "reasoning_effort": "none"}),
            json!({"model": "m", "messages": msgs, "reasoning_effort": null}),
        ] {
            let o = out(body).unwrap();
            assert!(o.get("thinking").is_none(), "{o:#}");
        }
        // Where Anthropic would refuse thinking, the effort turns none on.
        for extra in [
            json!({"temperature": 0.2}),
            json!({"top_p": 0.9}),
            json!({"top_k": 5}),
            json!({"tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ] {
            let mut body = json!({"model": "m", "messages": msgs, "reasoning_effort": "high"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let o = out(body).unwrap();
            assert!(o.get("thinking").is_none(), "{extra}: {o:#}");
        }
        let loop_history = json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
        ]);
        let o = out(
            json!({"model": "m", "messages": loop_history, "reasoning_effort": "high",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        )
        .unwrap();
        assert!(o.get("thinking").is_none(), "{o:#}");
        // The client's own `thinking` wins.
        let o = out(
            json!({"model": "m", "messages": msgs, "reasoning_effort": "high",
            "thinking": {"type": "enabled", "budget_tokens": 2048}}),
        )
        .unwrap();
        assert_eq!(o["thinking"]["budget_tokens"], 2048, "{o:#}");
        // The worst case counts the budget.
        let req = chat_request(json!({"model": "m", "messages": msgs, "reasoning_effort": "low"}));
        assert_eq!(thinking_cap(&req), Some(1024 + DEFAULT_MAX_TOKENS));
        // An effort with no budget is the client's mistake.
        let e = out(json!({"model": "m", "messages": msgs, "reasoning_effort": "extreme"}))
            .unwrap_err();
        assert_eq!(e.1, crate::TranslateKind::Invalid);
        assert!(
            e.0.contains("`medium`") && e.0.contains("extreme"),
            "{}",
            e.0
        );
    }

    /// An OpenAI-shaped client marks breakpoints the way OpenAI-compatible gateways take them:
    /// on a message (its last block), on a system message (the system prompt becomes blocks), on
    /// a tool message's parts (Anthropic takes it on the `tool_result`, never inside); top-level
    /// `thinking` and `cache_control` go through, and `anthropic` adds fields but never replaces
    /// what Sluice writes.
    #[test]
    fn openai_shaped_breakpoints_land_where_anthropic_takes_them() {
        let cc = json!({"type": "ephemeral"});
        let req = chat_request(json!({
            "model": "m",
            "max_tokens": 100,
            "messages": [
                {"role": "system", "content": "Be brief.", "cache_control": cc},
                {"role": "user", "content": "Look it up.", "cache_control": cc},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ], "cache_control": cc},
                {"role": "tool", "tool_call_id": "c1", "content": [
                    {"type": "text", "text": "result", "cache_control": cc}
                ]}
            ],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "anthropic": {"max_tokens": 5, "service_tier": "standard_only", "betas": ["b1"]}
        }));
        let out = serde_json::to_value(request_from_openai(&req).expect("translates")).unwrap();
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "Be brief.", "cache_control": cc}])
        );
        assert_eq!(
            out["messages"][0]["content"],
            json!([{"type": "text", "text": "Look it up.", "cache_control": cc}])
        );
        assert_eq!(
            out["messages"][1]["content"][0]["cache_control"], cc,
            "{out:#}"
        );
        let result = &out["messages"][2]["content"][0];
        assert_eq!(result["type"], "tool_result", "{out:#}");
        assert_eq!(result["cache_control"], cc, "{out:#}");
        assert!(
            result["content"][0].get("cache_control").is_none(),
            "{out:#}"
        );
        assert_eq!(out["thinking"]["budget_tokens"], 1024, "{out:#}");
        assert_eq!(out["service_tier"], "standard_only", "{out:#}");
        assert_eq!(out["max_tokens"], 100, "Sluice's own field stays: {out:#}");
        assert_eq!(
            out[BETAS],
            json!(["b1"]),
            "for the provider's header: {out:#}"
        );

        // Without a breakpoint the system prompt stays one string.
        let plain = chat_request(json!({"model": "m", "messages": [
            {"role": "system", "content": "A"}, {"role": "system", "content": "B"},
            {"role": "user", "content": "hi"}
        ]}));
        let out = serde_json::to_value(request_from_openai(&plain).unwrap()).unwrap();
        assert_eq!(out["system"], "A\n\nB");

        let bad = chat_request(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "anthropic": 5}),
        );
        let e = request_from_openai(&bad).expect_err("not an object");
        assert_eq!(e.1, crate::TranslateKind::Invalid, "{e}");
    }

    /// Without a cap from the client, thinking gets the default cap on top of its budget
    /// (Anthropic refuses `max_tokens` at or under `budget_tokens`); Sluice's own `cache` object
    /// stays Sluice's on `/v1/messages` too, never in what Anthropic gets.
    #[test]
    fn thinking_budget_raises_the_default_cap_and_cache_stays_sluices() {
        let req = chat_request(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 8000}
        }));
        let out = request_from_openai(&req).unwrap();
        assert_eq!(out.max_tokens, 8000 + DEFAULT_MAX_TOKENS);
        assert_eq!(thinking_cap(&req), Some(8000 + DEFAULT_MAX_TOKENS));
        let plain = chat_request(json!({"model": "m", "messages": []}));
        assert_eq!(thinking_cap(&plain), None);
        let capped = chat_request(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000,
            "thinking": {"type": "enabled", "budget_tokens": 8000}
        }));
        assert_eq!(request_from_openai(&capped).unwrap().max_tokens, 9000);

        let msg = messages_request(json!({
            "model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
            "cache": {"no_store": true}, "service_tier": "auto"
        }));
        let chat = request_to_openai(&msg).unwrap();
        assert_eq!(chat.extra["cache"], json!({"no_store": true}));
        assert_eq!(
            chat.extra[ANTHROPIC_FIELDS],
            json!({"service_tier": "auto"})
        );
        let mut sneaky = chat.clone();
        sneaky.extra[ANTHROPIC_FIELDS]["cache"] = json!({"ttl": 5});
        let back = serde_json::to_value(request_from_openai(&sneaky).unwrap()).unwrap();
        assert!(back.get("cache").is_none(), "{back:#}");
    }

    /// Writes to the one-hour cache (`ttl: "1h"`) are counted apart, whole or streamed, so they
    /// are priced at their own rate, and an Anthropic client gets the breakdown back.
    #[test]
    fn one_hour_cache_writes_are_counted_apart() {
        let usage = json!({"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 40,
                           "cache_read_input_tokens": 0,
                           "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 30}});
        let resp: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
            "usage": usage
        }))
        .unwrap();
        let out = response_to_openai(resp).usage.unwrap();
        assert_eq!(
            (out.cache_write_tokens(), out.cache_write_1h_tokens()),
            (40, 30)
        );
        let back = response_from_openai(
            &ChatCompletion {
                usage: Some(out),
                ..chat_completion_fixture()
            },
            "claude",
        )
        .usage
        .unwrap();
        assert_eq!(back.extra["cache_creation"], usage["cache_creation"]);

        let mut dec = StreamDecoder::new();
        dec.on_event(
            serde_json::from_value(json!({"type": "message_start", "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
                "content": [], "usage": usage}}))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(dec.usage().cache_write_1h_tokens(), 30);
    }

    /// A minimal completion to build on.
    fn chat_completion_fixture() -> ChatCompletion {
        serde_json::from_value(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]
        }))
        .unwrap()
    }

    #[test]
    fn betas_from_headers_join_the_anthropic_fields() {
        let mut req = chat_request(json!({"model": "m", "messages": []}));
        set_betas(&mut req, ["a, b", "", "c"]);
        assert_eq!(req.extra[ANTHROPIC_FIELDS][BETAS], json!(["a", "b", "c"]));
        let mut none = chat_request(json!({"model": "m", "messages": []}));
        set_betas(&mut none, [" "]);
        assert!(none.extra.is_empty());
    }

    #[test]
    fn unknown_blocks_and_fields_survive_round_trips() {
        let body = json!({
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                {"type": "search_result", "source": "s", "title": "t", "content": []},
                {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
            ]}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "service_tier": "auto"
        });
        let req = messages_request(body.clone());
        assert_eq!(serde_json::to_value(&req).expect("serializes"), body);
        let MessageContent::Blocks(blocks) = &req.messages[0].content else {
            panic!("blocks expected");
        };
        assert_eq!(blocks[1].kind(), "search_result");
        assert!(matches!(
            &blocks[2],
            ContentBlock::Image {
                source: ImageSource::Other(_),
                ..
            }
        ));
        // Anthropic-only fields are not forwarded to OpenAI upstreams; unsupported blocks fail.
        let e = request_to_openai(&req).expect_err("search_result has no OpenAI equivalent");
        assert!(
            e.0.contains("search_result") || e.0.contains("image"),
            "{e}"
        );
    }
}
