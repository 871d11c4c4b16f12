//! Recorded provider responses, byte for byte in each provider's wire format.
//!
//! The files live in `crates/sluice-testkit/fixtures/` and are compiled in with
//! `include_str!`. The SSE fixtures are the exact body text a client receives
//! (OpenAI and Anthropic separate events with `\n\n`, Gemini with `\r\n\r\n`).

/// OpenAI `chat.completion` (plain text answer, `finish_reason: "stop"`).
pub const OPENAI_CHAT: &str = include_str!("../fixtures/openai/chat.json");
/// OpenAI `chat.completion` with one `get_weather` tool call (`finish_reason: "tool_calls"`).
pub const OPENAI_CHAT_TOOLS: &str = include_str!("../fixtures/openai/chat_tools.json");
/// OpenAI chat stream as sent with `stream_options.include_usage: true`:
/// role chunk, content chunks, finish chunk, usage chunk (`"choices":[]`), `data: [DONE]`.
pub const OPENAI_CHAT_STREAM: &str = include_str!("../fixtures/openai/chat_stream.sse");
/// OpenAI chat stream with a tool call whose arguments are split across chunks.
pub const OPENAI_CHAT_STREAM_TOOLS: &str = include_str!("../fixtures/openai/chat_stream_tools.sse");
/// OpenAI embeddings list with two 8-dimensional embeddings.
pub const OPENAI_EMBEDDINGS: &str = include_str!("../fixtures/openai/embeddings.json");

/// Anthropic Messages API response (one text block, `stop_reason: "end_turn"`).
pub const ANTHROPIC_MESSAGES: &str = include_str!("../fixtures/anthropic/messages.json");
/// Anthropic Messages API response with a text block and a `tool_use` block.
pub const ANTHROPIC_MESSAGES_TOOLS: &str =
    include_str!("../fixtures/anthropic/messages_tools.json");
/// Anthropic stream: message_start, content_block_start, ping, text deltas,
/// content_block_stop, message_delta, message_stop.
pub const ANTHROPIC_MESSAGES_STREAM: &str =
    include_str!("../fixtures/anthropic/messages_stream.sse");
/// Anthropic stream with a text block followed by a `tool_use` block streamed
/// as `input_json_delta` pieces.
pub const ANTHROPIC_MESSAGES_STREAM_TOOLS: &str =
    include_str!("../fixtures/anthropic/messages_stream_tools.sse");

/// Gemini `GenerateContentResponse` (text part, `finishReason: "STOP"`).
pub const GEMINI_GENERATE: &str = include_str!("../fixtures/gemini/generate.json");
/// Gemini `GenerateContentResponse` with a `functionCall` part.
pub const GEMINI_GENERATE_TOOLS: &str = include_str!("../fixtures/gemini/generate_tools.json");
/// Gemini `streamGenerateContent?alt=sse` body: three events, the last with
/// `finishReason` and `usageMetadata`; events end with `\r\n\r\n`.
pub const GEMINI_STREAM: &str = include_str!("../fixtures/gemini/stream.sse");

/// Every fixture with its path relative to `fixtures/`, for table-driven tests.
pub const ALL: &[(&str, &str)] = &[
    ("openai/chat.json", OPENAI_CHAT),
    ("openai/chat_tools.json", OPENAI_CHAT_TOOLS),
    ("openai/chat_stream.sse", OPENAI_CHAT_STREAM),
    ("openai/chat_stream_tools.sse", OPENAI_CHAT_STREAM_TOOLS),
    ("openai/embeddings.json", OPENAI_EMBEDDINGS),
    ("anthropic/messages.json", ANTHROPIC_MESSAGES),
    ("anthropic/messages_tools.json", ANTHROPIC_MESSAGES_TOOLS),
    ("anthropic/messages_stream.sse", ANTHROPIC_MESSAGES_STREAM),
    (
        "anthropic/messages_stream_tools.sse",
        ANTHROPIC_MESSAGES_STREAM_TOOLS,
    ),
    ("gemini/generate.json", GEMINI_GENERATE),
    ("gemini/generate_tools.json", GEMINI_GENERATE_TOOLS),
    ("gemini/stream.sse", GEMINI_STREAM),
];
