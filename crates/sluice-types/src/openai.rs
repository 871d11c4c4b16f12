//! OpenAI chat completions, embeddings and models: the request and response shapes Sluice speaks on
//! `/v1` and uses internally.
//!
//! Every struct keeps the fields it does not name in `extra` (`#[serde(flatten)]`), so a request
//! forwarded to an OpenAI-compatible upstream carries tools, `response_format`, `logprobs`,
//! vendor extensions and fields that do not exist yet, untouched.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object holding the fields a struct does not name.
pub type Extra = Map<String, Value>;

/// A map key, borrowed from the input when it can be.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Implements `Deserialize` for a struct whose fields it does not name go to `extra`, in one pass
/// over the object. (`#[serde(flatten)]` would first buffer the whole object, every string
/// copied, which made parsing the largest cost of a request.) Each field says how it behaves
/// when absent: `required`, `default` (its `Default`), or `default_with(function)`.
macro_rules! deserialize_with_extra {
    ($ty:ident { $($field:ident : $fty:ty = $name:literal => $kind:ident $(($func:path))?),* $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str(concat!("struct ", stringify!($ty)))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<$ty, A::Error> {
                        $(let mut $field: Option<$fty> = None;)*
                        let mut extra = Extra::new();
                        while let Some(key) = map.next_key::<Key<'de>>()? {
                            match key.0.as_ref() {
                                $($name => {
                                    if $field.is_some() {
                                        return Err(serde::de::Error::duplicate_field($name));
                                    }
                                    $field = Some(map.next_value()?);
                                })*
                                _ => {
                                    let v: Value = map.next_value()?;
                                    extra.insert(key.0.into_owned(), v);
                                }
                            }
                        }
                        Ok($ty {
                            $($field: deserialize_with_extra!(@absent $field $name $kind $(($func))?),)*
                            extra,
                        })
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
    (@absent $field:ident $name:literal required) => {
        match $field {
            Some(v) => v,
            None => return Err(serde::de::Error::missing_field($name)),
        }
    };
    (@absent $field:ident $name:literal default) => {
        $field.unwrap_or_default()
    };
    (@absent $field:ident $name:literal default_with($func:path)) => {
        $field.unwrap_or_else($func)
    };
}

/// The request field naming how hard a reasoning model thinks.
pub const REASONING_EFFORT: &str = "reasoning_effort";

/// The thinking budget each `reasoning_effort` stands for with upstreams that take a budget:
/// `low`, `medium` and `high` as Google documents them for Gemini's OpenAI-compatible API (1,024,
/// 8,192 and 24,576 tokens); `minimal` the least Anthropic takes; `xhigh` 32,768; `none` no
/// thinking.
pub const REASONING_BUDGETS: [(&str, u32); 6] = [
    ("none", 0),
    ("minimal", 1024),
    ("low", 1024),
    ("medium", 8192),
    ("high", 24576),
    ("xhigh", 32768),
];

/// `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(ChatRequest {
    model: String = "model" => required,
    messages: Vec<Message> = "messages" => required,
    stream: Option<bool> = "stream" => default,
    stream_options: Option<StreamOptions> = "stream_options" => default,
    max_tokens: Option<u32> = "max_tokens" => default,
    max_completion_tokens: Option<u32> = "max_completion_tokens" => default,
    temperature: Option<f64> = "temperature" => default,
    top_p: Option<f64> = "top_p" => default,
    n: Option<u32> = "n" => default,
    stop: Option<Stop> = "stop" => default,
    seed: Option<i64> = "seed" => default,
    tools: Option<Vec<Tool>> = "tools" => default,
    tool_choice: Option<Value> = "tool_choice" => default,
    response_format: Option<Value> = "response_format" => default,
    user: Option<String> = "user" => default,
    metadata: Option<Map<String, Value>> = "metadata" => default,
});

impl ChatRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for the final usage chunk of a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The completion-token cap the client set, under either name.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// `reasoning_effort` as a thinking budget in tokens, for upstreams that take a budget
    /// rather than a level (Anthropic, Gemini): `Ok(None)` when the request names none (or
    /// `null`), `Ok(Some(0))` for `none` (no thinking). See [`REASONING_BUDGETS`].
    pub fn reasoning_budget(&self) -> Result<Option<u32>, String> {
        match self.extra.get(REASONING_EFFORT) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(effort)) => REASONING_BUDGETS
                .iter()
                .find(|(name, _)| name == effort)
                .map(|&(_, budget)| Some(budget))
                .ok_or_else(|| {
                    format!(
                        "`{REASONING_EFFORT}` must be one of {}; got {effort:?}",
                        REASONING_BUDGETS
                            .iter()
                            .map(|(n, _)| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
            Some(other) => Err(format!(
                "`{REASONING_EFFORT}` must be a string such as \"medium\"; got {other}"
            )),
        }
    }

    /// The stop sequences as a list.
    pub fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StreamOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(StreamOptions {
    include_usage: Option<bool> = "include_usage" => default,
});

/// `stop`: one string or a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(Message {
    role: Role = "role" => required,
    content: Option<Content> = "content" => default,
    name: Option<String> = "name" => default,
    tool_calls: Option<Vec<ToolCall>> = "tool_calls" => default,
    tool_call_id: Option<String> = "tool_call_id" => default,
});

impl Message {
    /// A message with plain-text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            extra: Extra::new(),
        }
    }

    /// The length in bytes of the message's text, without building it.
    pub fn text_len(&self) -> usize {
        match &self.content {
            None => 0,
            Some(Content::Text(s)) => s.len(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .map(str::len)
                .sum(),
        }
    }

    /// The text of the message: the string content, or its text parts joined by newlines.
    pub fn text_content(&self) -> String {
        self.content
            .as_ref()
            .map(Content::to_text)
            .unwrap_or_default()
    }
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text of the content; text parts are joined with newlines, other parts are skipped.
    pub fn to_text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts.iter().filter_map(|p| p.text.as_deref()) {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(p);
                }
                out
            }
        }
    }
}

/// One content part (`text`, `image_url`, `input_audio`, `file`, …). Fields of part types this
/// struct does not name are kept in `extra`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<ImageUrl>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(ContentPart {
    kind: String = "type" => required,
    text: Option<String> = "text" => default,
    image_url: Option<ImageUrl> = "image_url" => default,
});

impl ContentPart {
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart {
            kind: "text".into(),
            text: Some(text.into()),
            image_url: None,
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Other fields (`format`, vendor fields), kept.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tool the model may call: a `function` tool, or another type (`custom`, …) kept as sent in
/// `extra` (its `function` is then absent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tool {
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "FunctionDef::is_absent")]
    pub function: FunctionDef,
    #[serde(flatten)]
    pub extra: Extra,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl FunctionDef {
    /// A tool of another type than `function` has none.
    pub fn is_absent(&self) -> bool {
        self.name.is_empty()
            && self.description.is_none()
            && self.parameters.is_none()
            && self.extra.is_empty()
    }
}

/// A complete tool call in a message: a `function` call, or another type (`custom`, with its
/// `custom` object in `extra`). Other fields (Gemini's `extra_content` with its thought
/// signature) are kept in `extra` too.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "FunctionCall::is_absent")]
    pub function: FunctionCall,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// JSON-encoded arguments, as the model produced them (a server that sends them as a JSON
    /// object, as TGI before 3.1 did, has them encoded here).
    #[serde(deserialize_with = "arguments_text")]
    pub arguments: String,
}

/// Tool-call arguments as JSON text: a string as it is, any other JSON value (an object some
/// servers send) encoded.
fn arguments_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(arguments_text_opt(d)?.unwrap_or_default())
}

fn arguments_text_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

impl FunctionCall {
    /// A call of another type than `function` has none.
    pub fn is_absent(&self) -> bool {
        self.name.is_empty() && self.arguments.is_empty()
    }
}

/// `chat.completion` response body.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletion {
    pub id: String,
    #[serde(default = "completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(ChatCompletion {
    id: String = "id" => required,
    object: String = "object" => default_with(completion_object),
    created: u64 = "created" => default,
    model: String = "model" => required,
    choices: Vec<Choice> = "choices" => required,
    usage: Option<Usage> = "usage" => default,
    system_fingerprint: Option<String> = "system_fingerprint" => default,
});

fn completion_object() -> String {
    "chat.completion".into()
}

impl ChatCompletion {
    /// The text of all choices' contents and reasoning, concatenated (for token counting and
    /// logs; reasoning is billed as completion tokens).
    pub fn output_text(&self) -> String {
        let mut out = String::new();
        for c in &self.choices {
            if let Some(t) = &c.message.content {
                out.push_str(t);
            }
            if let Some(reasoning) = reasoning_text(&c.message.extra) {
                out.push_str(reasoning);
            }
            for tc in c.message.tool_calls.iter().flatten() {
                out.push_str(&tc.function.name);
                out.push_str(&tc.function.arguments);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Choice {
    pub index: u32,
    pub message: ResponseMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(Choice {
    index: u32 = "index" => required,
    message: ResponseMessage = "message" => required,
    finish_reason: Option<String> = "finish_reason" => default,
    logprobs: Option<Value> = "logprobs" => default,
});

/// The assistant message in a response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResponseMessage {
    #[serde(default = "assistant_role")]
    pub role: Role,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// [`ResponseMessage`] as parsed, before its content chunks (if any) are folded.
struct RawResponseMessage {
    role: Role,
    content: Option<ResponseText>,
    tool_calls: Option<Vec<ToolCall>>,
    refusal: Option<String>,
    extra: Extra,
}

deserialize_with_extra!(RawResponseMessage {
    role: Role = "role" => default_with(assistant_role),
    content: Option<ResponseText> = "content" => default,
    tool_calls: Option<Vec<ToolCall>> = "tool_calls" => default,
    refusal: Option<String> = "refusal" => default,
});

impl<'de> Deserialize<'de> for ResponseMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawResponseMessage::deserialize(d)?;
        let mut extra = raw.extra;
        Ok(ResponseMessage {
            role: raw.role,
            content: raw.content.and_then(|c| c.fold_into(&mut extra)),
            tool_calls: raw.tool_calls,
            refusal: raw.refusal,
            extra,
        })
    }
}

/// A response's (or delta's) `content`: a string, or — from Mistral's reasoning models — a list of
/// chunks: `text` chunks are the content, `thinking` chunks (`{"type": "thinking", "thinking":
/// [{"type": "text", "text": …}]}`) the reasoning; other chunks (references) carry no text.
#[derive(Debug, Default)]
struct ResponseText {
    /// The text; `None` for a list without text chunks.
    text: Option<String>,
    thinking: Option<String>,
}

impl ResponseText {
    /// The content, with the thinking added to `extra`'s `reasoning_content`.
    fn fold_into(self, extra: &mut Extra) -> Option<String> {
        if let Some(thinking) = self.thinking {
            match extra.get_mut("reasoning_content") {
                Some(Value::String(have)) => have.push_str(&thinking),
                _ => {
                    extra.insert("reasoning_content".into(), Value::String(thinking));
                }
            }
        }
        self.text
    }

    fn from_chunks(chunks: Vec<Value>) -> Self {
        let mut out = ResponseText::default();
        for chunk in &chunks {
            match chunk.get("type").and_then(Value::as_str) {
                Some("text") => {
                    if let Some(t) = chunk.get("text").and_then(Value::as_str) {
                        out.text.get_or_insert_with(String::new).push_str(t);
                    }
                }
                Some("thinking") => {
                    let thinking = out.thinking.get_or_insert_with(String::new);
                    match chunk.get("thinking") {
                        Some(Value::String(t)) => thinking.push_str(t),
                        Some(Value::Array(inner)) => {
                            for t in inner.iter().filter_map(|i| i.get("text")) {
                                thinking.push_str(t.as_str().unwrap_or_default());
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        out
    }
}

impl<'de> Deserialize<'de> for ResponseText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ResponseText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of content chunks")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ResponseText, E> {
                Ok(ResponseText {
                    text: Some(v.to_string()),
                    thinking: None,
                })
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<ResponseText, E> {
                Ok(ResponseText {
                    text: Some(v),
                    thinking: None,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ResponseText, A::Error> {
                let mut chunks = Vec::new();
                while let Some(v) = seq.next_element::<Value>()? {
                    chunks.push(v);
                }
                Ok(ResponseText::from_chunks(chunks))
            }
        }
        d.deserialize_any(V)
    }
}

fn assistant_role() -> Role {
    Role::Assistant
}

/// Token usage.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// [`Usage`] as it comes: some servers leave `total_tokens` out (or send it `null`), and then
/// it is the sum of the two counts, not 0.
struct UsageWire {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptTokensDetails>,
    extra: Extra,
}

deserialize_with_extra!(UsageWire {
    prompt_tokens: u64 = "prompt_tokens" => default,
    completion_tokens: u64 = "completion_tokens" => default,
    total_tokens: Option<u64> = "total_tokens" => default,
    prompt_tokens_details: Option<PromptTokensDetails> = "prompt_tokens_details" => default,
});

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = UsageWire::deserialize(d)?;
        Ok(Usage {
            total_tokens: w
                .total_tokens
                .unwrap_or(w.prompt_tokens.saturating_add(w.completion_tokens)),
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            prompt_tokens_details: w.prompt_tokens_details,
            extra: w.extra,
        })
    }
}

/// The `prompt_tokens_details` field for prompt tokens written to a provider's cache.
const CACHE_WRITE_TOKENS: &str = "cache_write_tokens";

/// The `prompt_tokens_details` field for the part of the cache writes kept an hour (Anthropic's
/// `ttl: "1h"`, priced apart).
const CACHE_WRITE_1H_TOKENS: &str = "cache_write_1h_tokens";

impl Usage {
    pub fn new(prompt: u64, completion: u64, cached: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            prompt_tokens_details: (cached > 0).then_some(PromptTokensDetails {
                cached_tokens: Some(cached),
                extra: Extra::new(),
            }),
            extra: Extra::new(),
        }
    }

    /// Prompt tokens served from the provider's prompt cache.
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }

    /// Prompt tokens written to the provider's prompt cache
    /// (`prompt_tokens_details.cache_write_tokens`), part of `prompt_tokens`.
    pub fn cache_write_tokens(&self) -> u64 {
        self.detail(CACHE_WRITE_TOKENS).unwrap_or(0)
    }

    /// Of the cache writes, those kept an hour (`prompt_tokens_details.cache_write_1h_tokens`).
    pub fn cache_write_1h_tokens(&self) -> u64 {
        self.detail(CACHE_WRITE_1H_TOKENS).unwrap_or(0)
    }

    /// Whether the upstream said how its cache writes split by lifetime (Anthropic's
    /// `cache_creation`), even if none were kept an hour.
    pub fn cache_write_1h_reported(&self) -> bool {
        self.detail(CACHE_WRITE_1H_TOKENS).is_some()
    }

    /// A count Sluice keeps in `prompt_tokens_details` beside OpenAI's.
    fn detail(&self, key: &str) -> Option<u64> {
        self.prompt_tokens_details
            .as_ref()?
            .extra
            .get(key)
            .and_then(Value::as_u64)
    }

    /// Notes `n` of the cache writes as kept an hour (recorded only beside some cache writes).
    pub fn set_cache_write_1h_tokens(&mut self, n: u64) {
        if let Some(details) = self.prompt_tokens_details.as_mut()
            && details.extra.contains_key(CACHE_WRITE_TOKENS)
        {
            details
                .extra
                .insert(CACHE_WRITE_1H_TOKENS.into(), Value::from(n));
        }
    }

    /// Notes `n` prompt tokens as written to the provider's prompt cache.
    pub fn set_cache_write_tokens(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        let details = self
            .prompt_tokens_details
            .get_or_insert_with(|| PromptTokensDetails {
                cached_tokens: Some(0),
                extra: Extra::new(),
            });
        details
            .extra
            .insert(CACHE_WRITE_TOKENS.into(), Value::from(n));
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(PromptTokensDetails {
    cached_tokens: Option<u64> = "cached_tokens" => default,
});

/// `chat.completion.chunk`: one event of a streamed response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(ChatCompletionChunk {
    id: String = "id" => required,
    object: String = "object" => default_with(chunk_object),
    created: u64 = "created" => default,
    model: String = "model" => default,
    choices: Vec<ChunkChoice> = "choices" => default,
    usage: Option<Usage> = "usage" => default,
    system_fingerprint: Option<String> = "system_fingerprint" => default,
});

fn chunk_object() -> String {
    "chat.completion.chunk".into()
}

impl ChatCompletionChunk {
    /// An empty chunk with the given identity; callers push choices or set usage.
    pub fn new(id: &str, model: &str, created: u64) -> Self {
        ChatCompletionChunk {
            id: id.to_string(),
            object: chunk_object(),
            created,
            model: model.to_string(),
            choices: Vec::new(),
            usage: None,
            system_fingerprint: None,
            extra: Extra::new(),
        }
    }

    /// The opening chunk of a stream: `delta: {role: assistant, content: ""}`.
    pub fn role(id: &str, model: &str, created: u64) -> Self {
        Self::with_choice(
            id,
            model,
            created,
            Delta {
                role: Some(Role::Assistant),
                content: Some(String::new()),
                ..Delta::default()
            },
            None,
        )
    }

    /// A chunk carrying a piece of text.
    pub fn text(id: &str, model: &str, created: u64, text: String) -> Self {
        Self::with_choice(
            id,
            model,
            created,
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
        )
    }

    /// The chunk that ends choice 0 with a finish reason.
    pub fn finish(id: &str, model: &str, created: u64, reason: &str) -> Self {
        Self::with_choice(
            id,
            model,
            created,
            Delta::default(),
            Some(reason.to_string()),
        )
    }

    /// The final usage chunk (`choices: []`).
    pub fn usage_only(id: &str, model: &str, created: u64, usage: Usage) -> Self {
        ChatCompletionChunk {
            usage: Some(usage),
            ..Self::new(id, model, created)
        }
    }

    fn with_choice(
        id: &str,
        model: &str,
        created: u64,
        delta: Delta,
        finish_reason: Option<String>,
    ) -> Self {
        ChatCompletionChunk {
            choices: vec![ChunkChoice::new(0, delta, finish_reason)],
            ..Self::new(id, model, created)
        }
    }

    /// Whether the chunk carries any generated content (text, tool call, refusal, or reasoning:
    /// `reasoning_content` / `reasoning`, which a reasoning model may stream for a long time
    /// before its answer).
    pub fn has_content(&self) -> bool {
        self.choices.iter().any(|c| {
            c.delta.content.as_deref().is_some_and(|s| !s.is_empty())
                || c.delta.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
                || c.delta.refusal.as_deref().is_some_and(|s| !s.is_empty())
                || reasoning_text(&c.delta.extra).is_some()
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

deserialize_with_extra!(ChunkChoice {
    index: u32 = "index" => default,
    delta: Delta = "delta" => default,
    finish_reason: Option<String> = "finish_reason" => default,
    logprobs: Option<Value> = "logprobs" => default,
});

impl ChunkChoice {
    pub fn new(index: u32, delta: Delta, finish_reason: Option<String>) -> Self {
        ChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs: None,
            extra: Extra::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// [`Delta`] as parsed, before its content chunks (if any) are folded.
struct RawDelta {
    role: Option<Role>,
    content: Option<ResponseText>,
    tool_calls: Option<Vec<ToolCallDelta>>,
    refusal: Option<String>,
    extra: Extra,
}

deserialize_with_extra!(RawDelta {
    role: Option<Role> = "role" => default,
    content: Option<ResponseText> = "content" => default,
    tool_calls: Option<Vec<ToolCallDelta>> = "tool_calls" => default,
    refusal: Option<String> = "refusal" => default,
});

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawDelta::deserialize(d)?;
        let mut extra = raw.extra;
        Ok(Delta {
            role: raw.role,
            content: raw.content.and_then(|c| c.fold_into(&mut extra)),
            tool_calls: raw.tool_calls,
            refusal: raw.refusal,
            extra,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ToolCallDelta {
    /// The call's position among the choice's tool calls. Some servers leave it out; it is then
    /// [`ToolCallDelta::UNKNOWN_INDEX`] until the provider places the call.
    #[serde(default = "ToolCallDelta::unknown_index")]
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
    /// Other fields (a `custom` call's object, Gemini's `extra_content`), kept.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ToolCallDelta {
    /// The index of a delta that came without one.
    pub const UNKNOWN_INDEX: u32 = u32::MAX;

    fn unknown_index() -> u32 {
        Self::UNKNOWN_INDEX
    }
}

/// Places a stream's tool-call deltas, per choice: a delta without an index (some servers leave
/// it out) is the next call when it brings a new id, a name for a call that has one, or is the
/// second in its chunk, and otherwise goes on with the call before it; a delta with an index
/// already used by a call of another id (Ollama sends every call at index 0) is a new call too.
/// Other indices are kept as they are.
#[derive(Debug, Default)]
pub struct ToolCallPlacer {
    choices: std::collections::HashMap<u32, Placed>,
}

#[derive(Debug, Default)]
struct Placed {
    /// The server's index → the index given, and that call's id.
    given: std::collections::HashMap<u32, (u32, Option<String>)>,
    /// The index given to the last call, and whether it has a name.
    last: Option<(u32, bool)>,
    /// The lowest index not given yet.
    next: u32,
}

impl Placed {
    fn fresh(&mut self, wanted: Option<u32>) -> u32 {
        let taken = |i: u32| self.given.values().any(|(g, _)| *g == i);
        let i = match wanted {
            Some(w) if !taken(w) => w,
            _ => self.next,
        };
        self.next = self.next.max(i.saturating_add(1));
        i
    }
}

impl ToolCallPlacer {
    pub fn place(&mut self, chunk: &mut ChatCompletionChunk) {
        for c in &mut chunk.choices {
            let placed = self.choices.entry(c.index).or_default();
            let mut unindexed_in_chunk = 0;
            for tc in c.delta.tool_calls.iter_mut().flatten() {
                let id = tc.id.clone().filter(|id| !id.is_empty());
                let named = tc
                    .function
                    .as_ref()
                    .and_then(|f| f.name.as_deref())
                    .is_some_and(|n| !n.is_empty());
                let server = tc.index;
                let index = if server == ToolCallDelta::UNKNOWN_INDEX {
                    unindexed_in_chunk += 1;
                    let last_id = placed.given.get(&server).and_then(|(_, id)| id.clone());
                    let new_call = match placed.last {
                        None => true,
                        Some((_, had_name)) => {
                            unindexed_in_chunk > 1
                                || (id.is_some() && id != last_id)
                                || (id.is_none() && named && had_name)
                        }
                    };
                    match placed.last {
                        Some((i, _)) if !new_call => i,
                        _ => placed.fresh(None),
                    }
                } else {
                    match placed.given.get(&server) {
                        Some((i, seen)) if id.is_none() || id == *seen => *i,
                        _ => placed.fresh(Some(server)),
                    }
                };
                let continues = placed.given.get(&server).is_some_and(|(i, _)| *i == index);
                let id = match id {
                    Some(id) => Some(id),
                    None if continues => placed.given.get(&server).and_then(|(_, s)| s.clone()),
                    None => None,
                };
                placed.given.insert(server, (index, id));
                let had_name = named || placed.last.is_some_and(|(i, had)| i == index && had);
                placed.last = Some((index, had_name));
                tc.index = index;
            }
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "arguments_text_opt"
    )]
    pub arguments: Option<String>,
}

/// The reasoning text of a message or delta: `reasoning_content` (DeepSeek, vLLM, Sluice's own
/// translations) or `reasoning` (OpenRouter, newer vLLM); `None` when empty.
pub fn reasoning_text(extra: &Extra) -> Option<&str> {
    ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|k| extra.get(*k).and_then(Value::as_str))
        .filter(|t| !t.is_empty())
}

/// Adds a chunk's log probabilities to those of the chunks before: the token lists (`content`,
/// `refusal`) are joined, other fields take the latest value.
fn join_logprobs(have: &mut Option<Value>, more: &Value) {
    match (have.as_mut(), more) {
        (Some(Value::Object(h)), Value::Object(m)) => {
            for (k, v) in m {
                match (h.get_mut(k), v) {
                    (Some(Value::Array(list)), Value::Array(more)) => {
                        list.extend(more.iter().cloned());
                    }
                    (_, Value::Null) => {}
                    _ => {
                        h.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *have = Some(more.clone()),
    }
}

/// Adds a later delta's value of a field to what came before: strings are joined (streamed in
/// pieces, like a custom tool call's `input`), objects merged key by key, anything else replaced.
fn merge_streamed(have: &mut Value, more: &Value) {
    match (have, more) {
        (Value::String(h), Value::String(m)) => h.push_str(m),
        (Value::Object(h), Value::Object(m)) => {
            for (k, v) in m {
                match h.get_mut(k) {
                    Some(existing) => merge_streamed(existing, v),
                    None => {
                        h.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (_, Value::Null) => {}
        (h, m) => *h = m.clone(),
    }
}

/// Folds a stream of chunks back into one [`ChatCompletion`]: used when a provider only streams
/// but the client asked for a whole response, and to gather the text of a stream for the log.
#[derive(Debug, Default)]
pub struct ChunkAccumulator {
    id: String,
    model: String,
    created: u64,
    system_fingerprint: Option<String>,
    choices: Vec<AccChoice>,
    usage: Option<Usage>,
    /// Fields of the chunks beyond OpenAI's (`service_tier`, Azure's `prompt_filter_results`):
    /// the latest value of each, but for `obfuscation` (padding that only streams carry) and
    /// Sluice's own [`START_USAGE`](crate::anthropic::START_USAGE).
    extra: Extra,
}

/// The most choices a stream is folded into (OpenAI's largest `n`), and the most tool calls per
/// choice: a delta with a larger index, which only a broken upstream sends, is left out rather
/// than making room for it.
pub const MAX_STREAM_CHOICES: usize = 128;
pub const MAX_STREAM_TOOL_CALLS: usize = 1024;

#[derive(Debug, Default)]
struct AccChoice {
    content: String,
    has_content: bool,
    refusal: Option<String>,
    tool_calls: Vec<ToolCall>,
    finish_reason: Option<String>,
    /// The choice's log probabilities: the chunks' `content` and `refusal` lists, joined.
    logprobs: Option<Value>,
    /// Fields of the deltas beyond OpenAI's (such as `reasoning_content`): strings are joined,
    /// arrays extended, anything else replaced.
    extra: Extra,
    /// Fields of the choices beyond OpenAI's (such as vLLM's `stop_reason`): the latest kept.
    choice_extra: Extra,
}

impl ChunkAccumulator {
    pub fn push(&mut self, chunk: &ChatCompletionChunk) {
        if self.id.is_empty() {
            self.id.clone_from(&chunk.id);
            self.model.clone_from(&chunk.model);
            self.created = chunk.created;
        }
        if chunk.system_fingerprint.is_some() {
            self.system_fingerprint
                .clone_from(&chunk.system_fingerprint);
        }
        if let Some(u) = &chunk.usage {
            self.usage = Some(u.clone());
        }
        for (k, v) in &chunk.extra {
            if k != "obfuscation" && k != crate::anthropic::START_USAGE && !v.is_null() {
                self.extra.insert(k.clone(), v.clone());
            }
        }
        for c in &chunk.choices {
            let i = c.index as usize;
            if i >= MAX_STREAM_CHOICES {
                continue;
            }
            if self.choices.len() <= i {
                self.choices.resize_with(i + 1, AccChoice::default);
            }
            let acc = &mut self.choices[i];
            if let Some(t) = &c.delta.content {
                acc.content.push_str(t);
                acc.has_content = true;
            }
            if let Some(r) = &c.delta.refusal {
                acc.refusal.get_or_insert_with(String::new).push_str(r);
            }
            for (k, v) in &c.delta.extra {
                match (acc.extra.get_mut(k), v) {
                    (Some(Value::String(have)), Value::String(more)) => have.push_str(more),
                    (Some(Value::Array(have)), Value::Array(more)) => {
                        have.extend(more.iter().cloned());
                    }
                    (_, Value::Null) => {}
                    _ => {
                        acc.extra.insert(k.clone(), v.clone());
                    }
                }
            }
            for tc in c.delta.tool_calls.iter().flatten() {
                let ti = tc.index as usize;
                if ti >= MAX_STREAM_TOOL_CALLS {
                    continue;
                }
                if acc.tool_calls.len() <= ti {
                    acc.tool_calls.resize_with(ti + 1, || ToolCall {
                        id: String::new(),
                        kind: "function".into(),
                        function: FunctionCall::default(),
                        extra: Extra::new(),
                    });
                }
                let slot = &mut acc.tool_calls[ti];
                if let Some(id) = &tc.id {
                    slot.id.clone_from(id);
                }
                if let Some(kind) = &tc.kind {
                    slot.kind.clone_from(kind);
                }
                // Other fields (a custom call's object, a thought signature), gathered as the
                // arguments are: strings streamed in pieces are joined.
                for (k, v) in &tc.extra {
                    match slot.extra.get_mut(k) {
                        Some(have) => merge_streamed(have, v),
                        None => {
                            slot.extra.insert(k.clone(), v.clone());
                        }
                    }
                }
                if let Some(f) = &tc.function {
                    if let Some(n) = &f.name {
                        slot.function.name.push_str(n);
                    }
                    if let Some(a) = &f.arguments {
                        slot.function.arguments.push_str(a);
                    }
                }
            }
            if let Some(lp) = c.logprobs.as_ref().filter(|v| !v.is_null()) {
                join_logprobs(&mut acc.logprobs, lp);
            }
            if c.finish_reason.is_some() {
                acc.finish_reason.clone_from(&c.finish_reason);
            }
            for (k, v) in &c.extra {
                if !v.is_null() {
                    acc.choice_extra.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// A chunk without choices carrying the stream's id, model and creation time (`None`
    /// before the first chunk).
    pub fn empty_chunk(&self) -> Option<ChatCompletionChunk> {
        (!self.id.is_empty()).then(|| ChatCompletionChunk::new(&self.id, &self.model, self.created))
    }

    /// The usage the stream reported, if any.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    /// The generated text so far across all choices: content, reasoning, refusal, tool-call names
    /// and arguments.
    pub fn output_text(&self) -> String {
        let mut out = String::new();
        for c in &self.choices {
            out.push_str(&c.content);
            if let Some(reasoning) = reasoning_text(&c.extra) {
                out.push_str(reasoning);
            }
            if let Some(refusal) = &c.refusal {
                out.push_str(refusal);
            }
            for tc in &c.tool_calls {
                out.push_str(&tc.function.name);
                out.push_str(&tc.function.arguments);
            }
        }
        out
    }

    /// The finish reason of the first choice.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.finish_reason.as_deref())
    }

    pub fn finish(self) -> ChatCompletion {
        ChatCompletion {
            id: self.id,
            object: completion_object(),
            created: self.created,
            model: self.model,
            choices: self
                .choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| Choice {
                    index: i as u32,
                    message: ResponseMessage {
                        role: Role::Assistant,
                        content: (c.has_content || c.tool_calls.is_empty()).then_some(c.content),
                        tool_calls: (!c.tool_calls.is_empty()).then_some(c.tool_calls),
                        refusal: c.refusal,
                        extra: c.extra,
                    },
                    finish_reason: c.finish_reason,
                    logprobs: c.logprobs,
                    extra: c.choice_extra,
                })
                .collect(),
            usage: self.usage,
            system_fingerprint: self.system_fingerprint,
            extra: self.extra,
        }
    }
}

/// `POST /v1/embeddings` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Embedding input: a string, a list of strings, a token list, or a list of token lists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl EmbeddingInput {
    /// The text inputs (token inputs yield none).
    pub fn texts(&self) -> Vec<&str> {
        match self {
            EmbeddingInput::One(s) => vec![s.as_str()],
            EmbeddingInput::Many(v) => v.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// How many token ids the token inputs hold (text inputs hold none).
    pub fn token_ids(&self) -> u64 {
        match self {
            EmbeddingInput::Tokens(v) => v.len() as u64,
            EmbeddingInput::TokenLists(v) => v.iter().map(|l| l.len() as u64).sum(),
            _ => 0,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::One(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Many(v) => v.len(),
            EmbeddingInput::TokenLists(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    #[serde(default = "list_object")]
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    /// Absent or `null` reads as zero (counted by Sluice then).
    #[serde(default, deserialize_with = "null_as_default")]
    pub usage: EmbeddingUsage,
    #[serde(flatten)]
    pub extra: Extra,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn list_object() -> String {
    "list".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Embedding {
    #[serde(default = "embedding_object")]
    pub object: String,
    pub index: u32,
    /// A float array, or a base64 string when `encoding_format = "base64"`.
    pub embedding: Value,
}

fn embedding_object() -> String {
    "embedding".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    /// A usage without `total_tokens` (or with `null`) totals its two counts; one that has it
    /// keeps the upstream's word.
    #[test]
    fn usage_without_a_total_is_totalled() {
        use super::Usage;
        let u: Usage =
            serde_json::from_str(r#"{"prompt_tokens": 11, "completion_tokens": 7}"#).unwrap();
        assert_eq!(u.total_tokens, 18);
        let u: Usage = serde_json::from_str(
            r#"{"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": null, "x": 1}"#,
        )
        .unwrap();
        assert_eq!(
            (u.total_tokens, u.extra["x"].clone()),
            (18, serde_json::json!(1))
        );
        let u: Usage = serde_json::from_str(
            r#"{"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 20}"#,
        )
        .unwrap();
        assert_eq!(u.total_tokens, 20);
    }

    /// The one-pass deserializer behaves as the derived one with `flatten` did: unknown fields
    /// kept (also under escaped names), missing required fields and duplicates refused, `null`
    /// options absent, defaults applied.
    #[test]
    fn one_pass_deserialization_keeps_unknown_fields() {
        let text = r#"{"mod\u0065l":"m","messages":[{"role":"user","content":"hi","x_msg":1}],
            "temperature":null,"vendor_flag":{"a":[1,2]},"logit_bias":{"50256":-100},"stream":true}"#;
        let r: ChatRequest = serde_json::from_str(text).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.temperature, None);
        assert_eq!(r.stream, Some(true));
        assert_eq!(r.extra["vendor_flag"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(r.extra["logit_bias"], serde_json::json!({"50256": -100}));
        assert_eq!(r.messages[0].extra["x_msg"], 1);
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["vendor_flag"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(back["messages"][0]["x_msg"], 1);
        // From a `Value` too (owned keys).
        let again: ChatRequest = serde_json::from_value(back).unwrap();
        assert_eq!(again, r);

        let e = serde_json::from_str::<ChatRequest>(r#"{"messages":[]}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `model`"), "{e}");
        let e = serde_json::from_str::<ChatRequest>(r#"{"model":"a","model":"b","messages":[]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("duplicate field `model`"), "{e}");
        let e = serde_json::from_str::<ChatRequest>(r#"["model"]"#).unwrap_err();
        assert!(e.to_string().contains("struct ChatRequest"), "{e}");

        let c: ChatCompletion = serde_json::from_str(
            r#"{"id":"x","model":"m","choices":[{"index":0,"message":{"content":"ok"}}],"service_tier":"default"}"#,
        )
        .unwrap();
        assert_eq!(c.object, "chat.completion", "default_with applies");
        assert_eq!(c.choices[0].message.role, Role::Assistant);
        assert_eq!(c.extra["service_tier"], "default");
        let p: ContentPart =
            serde_json::from_str(r#"{"type":"input_audio","input_audio":{"data":"..."}}"#).unwrap();
        assert_eq!(p.kind, "input_audio");
        assert!(p.extra.contains_key("input_audio"));
    }

    use super::*;

    /// Tool-call arguments sent as a JSON object (TGI before 3.1, some llama.cpp builds) are
    /// taken as their JSON text (the whole answer failed as a broken upstream).
    #[test]
    fn tool_arguments_sent_as_an_object_are_encoded() {
        let c: ChatCompletion = serde_json::from_value(serde_json::json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": {"city": "Paris"}}}]
            }}]
        }))
        .unwrap();
        let call = &c.choices[0].message.tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.function.arguments, r#"{"city":"Paris"}"#);
        let chunk: ChatCompletionChunk = serde_json::from_value(serde_json::json!({
            "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": {"a": 1}}}]}}]
        }))
        .unwrap();
        let delta = &chunk.choices[0].delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(
            delta.function.as_ref().unwrap().arguments.as_deref(),
            Some(r#"{"a":1}"#)
        );
    }

    /// What an upstream or client sends comes out as it was: custom tools and tool calls, fields
    /// on tool calls and image URLs, and the order of keys (Structured Outputs generate in schema
    /// order).
    #[test]
    fn tools_tool_calls_and_key_order_round_trip() {
        let req = serde_json::json!({
            "model": "gpt-5",
            "messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "format": "image/png"}}
                ]},
                {"role": "assistant", "tool_calls": [
                    {"id": "c1", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}},
                    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"},
                     "extra_content": {"google": {"thought_signature": "sig"}}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "1"}
            ],
            "tools": [
                {"type": "custom", "custom": {"name": "sql", "description": "Run SQL"}},
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
                "type": "object",
                "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}
            }}}
        });
        let parsed: ChatRequest = serde_json::from_value(req.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), req);
        let out = serde_json::to_string(&parsed).unwrap();
        assert!(
            out.contains(
                r#""properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}}"#
            ),
            "{out}"
        );

        // A response with a custom call, and a streamed call's extra fields, gathered.
        let resp = serde_json::json!({
            "id": "r", "object": "chat.completion", "created": 1, "model": "gpt-5",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}]
            }}]
        });
        let parsed: ChatCompletion = serde_json::from_value(resp.clone()).unwrap();
        let back = serde_json::to_value(&parsed).unwrap();
        assert_eq!(
            back["choices"][0]["message"]["tool_calls"],
            resp["choices"][0]["message"]["tool_calls"]
        );
        let mut acc = ChunkAccumulator::default();
        for delta in [
            serde_json::json!({"tool_calls": [{"index": 0, "id": "c2", "type": "function",
                "function": {"name": "f", "arguments": ""},
                "extra_content": {"google": {"thought_signature": "sig"}}}]}),
            serde_json::json!({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        ] {
            let chunk: ChatCompletionChunk = serde_json::from_value(serde_json::json!({
                "id": "r", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta}]
            }))
            .unwrap();
            acc.push(&chunk);
        }
        let done = serde_json::to_value(acc.finish()).unwrap();
        let mut custom = ChunkAccumulator::default();
        for delta in [
            serde_json::json!({"tool_calls": [{"index": 0, "id": "c3", "type": "custom",
                "custom": {"name": "sql", "input": ""}}]}),
            serde_json::json!({"tool_calls": [{"index": 0, "custom": {"input": "SELECT"}}]}),
            serde_json::json!({"tool_calls": [{"index": 0, "custom": {"input": " 1"}}]}),
        ] {
            let chunk: ChatCompletionChunk = serde_json::from_value(serde_json::json!({
                "id": "r", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta}]
            }))
            .unwrap();
            custom.push(&chunk);
        }
        let custom = serde_json::to_value(custom.finish()).unwrap();
        assert_eq!(
            custom["choices"][0]["message"]["tool_calls"][0],
            serde_json::json!({"id": "c3", "type": "custom",
                "custom": {"name": "sql", "input": "SELECT 1"}})
        );
        assert_eq!(
            done["choices"][0]["message"]["tool_calls"][0],
            serde_json::json!({"id": "c2", "type": "function",
                "function": {"name": "f", "arguments": "{}"},
                "extra_content": {"google": {"thought_signature": "sig"}}})
        );
    }

    #[test]
    fn reasoning_is_generated_content() {
        let chunk = |delta: Value| -> ChatCompletionChunk {
            serde_json::from_value(serde_json::json!({
                "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta}]
            }))
            .unwrap()
        };
        assert!(chunk(serde_json::json!({"reasoning_content": "Let me think"})).has_content());
        assert!(chunk(serde_json::json!({"reasoning": "Hmm"})).has_content());
        assert!(
            !chunk(serde_json::json!({"role": "assistant", "reasoning_content": ""})).has_content()
        );
        assert!(chunk(serde_json::json!({"content": "Hi"})).has_content());
    }
    use serde_json::json;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi", "x_vendor": 1}],
            "logprobs": true,
            "top_logprobs": 3,
            "response_format": {"type": "json_object"},
            "n": 2,
            "parallel_tool_calls": false
        });
        let req: ChatRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(req.n, Some(2));
        assert_eq!(serde_json::to_value(&req).unwrap(), body);
    }

    #[test]
    fn content_parts_and_tool_calls_parse() {
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ]
        });
        let req: ChatRequest = serde_json::from_value(body).unwrap();
        assert_eq!(req.messages[0].text_content(), "a");
        assert_eq!(
            req.messages[1].tool_calls.as_ref().unwrap()[0]
                .function
                .name,
            "f"
        );
    }

    #[test]
    fn accumulator_rebuilds_text_and_tool_calls() {
        let mut acc = ChunkAccumulator::default();
        let c1: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]
        }))
        .unwrap();
        let c2: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{\"a\""}}]}, "finish_reason": null}]
        }))
        .unwrap();
        let c3: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        }))
        .unwrap();
        for c in [&c1, &c2, &c3] {
            acc.push(c);
        }
        assert_eq!(acc.usage().unwrap().total_tokens, 5);
        let done = acc.finish();
        assert_eq!(done.choices[0].message.content.as_deref(), Some("Hello"));
        let tc = &done.choices[0].message.tool_calls.as_ref().unwrap()[0];
        assert_eq!(tc.function.arguments, "{\"a\":1}");
        assert_eq!(done.choices[0].finish_reason.as_deref(), Some("tool_calls"));
    }

    /// A streamed answer folded whole (for the cache and the record) keeps its log
    /// probabilities, and its reasoning (under either name) and refusal count as output.
    #[test]
    fn accumulator_joins_logprobs_and_counts_reasoning_and_refusals() {
        let chunk =
            |v: serde_json::Value| -> ChatCompletionChunk { serde_json::from_value(v).unwrap() };
        let mut acc = ChunkAccumulator::default();
        for (text, token) in [("a", "a"), ("b", "b")] {
            acc.push(&chunk(json!({
                "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text},
                    "logprobs": {"content": [{"token": token, "logprob": -0.5, "bytes": [97], "top_logprobs": []}], "refusal": null}}]
            })));
        }
        acc.push(&chunk(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]
        })));
        let done = acc.finish();
        let lp = done.choices[0].logprobs.as_ref().expect("logprobs kept");
        let tokens: Vec<_> = lp["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(tokens, ["a", "b"]);
        assert!(lp["refusal"].is_null());

        let mut acc = ChunkAccumulator::default();
        acc.push(&chunk(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"reasoning": "think ", "refusal": "no"}}]
        })));
        assert_eq!(acc.output_text(), "think no");
    }

    #[test]
    fn accumulator_keeps_delta_extras_and_ignores_absurd_indexes() {
        let chunk =
            |v: serde_json::Value| -> ChatCompletionChunk { serde_json::from_value(v).unwrap() };
        let mut acc = ChunkAccumulator::default();
        acc.push(&chunk(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"reasoning_content": "Let me ", "annotations": [1]}}]
        })));
        acc.push(&chunk(json!({
            "id": "x", "created": 1, "model": "m", "service_tier": "default", "obfuscation": "pad",
            "choices": [{"index": 0, "delta": {"reasoning_content": "think.", "annotations": [2], "content": "42"}}]
        })));
        // A broken upstream's indexes: nothing is allocated for them, nothing else changes.
        acc.push(&chunk(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [
                {"index": 4294967295u32, "delta": {"content": "junk"}},
                {"index": 0, "delta": {"tool_calls": [{"index": 4000000000u32, "id": "t"}]}, "finish_reason": "stop"}
            ]
        })));
        assert!(acc.output_text().contains("Let me think."));
        let done = acc.finish();
        assert_eq!(done.choices.len(), 1);
        let msg = &done.choices[0].message;
        assert_eq!(msg.content.as_deref(), Some("42"));
        assert!(msg.tool_calls.is_none());
        assert_eq!(msg.extra["reasoning_content"], "Let me think.");
        assert_eq!(msg.extra["annotations"], json!([1, 2]));
        // Chunk-level fields are kept on the whole answer, stream padding is not.
        assert_eq!(done.extra["service_tier"], "default");
        assert!(!done.extra.contains_key("obfuscation"));
    }

    #[test]
    fn tool_call_deltas_without_an_index_are_placed_in_order() {
        let mut c: ChatCompletionChunk = serde_json::from_value(json!({
            "id": "x", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
            ]}, "finish_reason": "tool_calls"}]
        }))
        .expect("a chunk whose tool calls have no index still parses");
        ToolCallPlacer::default().place(&mut c);
        let calls = c.choices[0].delta.tool_calls.as_ref().unwrap();
        assert_eq!((calls[0].index, calls[1].index), (0, 1));
        let mut acc = ChunkAccumulator::default();
        acc.push(&c);
        let done = acc.finish();
        let calls = done.choices[0].message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "g");

        // Across chunks: a new id is the next call, a delta without one goes on with the last.
        let mut placer = ToolCallPlacer::default();
        let mut acc = ChunkAccumulator::default();
        for call in [
            json!({"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":"}}),
            json!({"function": {"arguments": "1}"}}),
            json!({"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}),
        ] {
            let mut c: ChatCompletionChunk = serde_json::from_value(json!({
                "id": "x", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]
            }))
            .unwrap();
            placer.place(&mut c);
            acc.push(&c);
        }
        let done = acc.finish();
        let calls = done.choices[0].message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(
            (
                calls[0].function.arguments.as_str(),
                calls[1].function.name.as_str()
            ),
            ("{\"x\":1}", "g")
        );
        // Every call at index 0, each with its id (Ollama); and two whole calls in one chunk with
        // neither index nor id.
        let gathered = |deltas: Vec<Value>| {
            let mut placer = ToolCallPlacer::default();
            let mut acc = ChunkAccumulator::default();
            for calls in deltas {
                let mut c: ChatCompletionChunk = serde_json::from_value(json!({
                    "id": "x", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"tool_calls": calls}}]
                }))
                .unwrap();
                placer.place(&mut c);
                acc.push(&c);
            }
            let done = acc.finish();
            done.choices[0]
                .message
                .tool_calls
                .clone()
                .unwrap()
                .into_iter()
                .map(|c| (c.id, c.function.name, c.function.arguments))
                .collect::<Vec<_>>()
        };
        let s = |v: &str| v.to_string();
        assert_eq!(
            gathered(vec![
                json!([{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"p\":"}}]),
                json!([{"index": 0, "function": {"arguments": "1}"}}]),
                json!([{"index": 0, "id": "b", "function": {"name": "g", "arguments": "{}"}}]),
            ]),
            [(s("a"), s("f"), s("{\"p\":1}")), (s("b"), s("g"), s("{}"))]
        );
        assert_eq!(
            gathered(vec![json!([
                {"function": {"name": "f", "arguments": "{}"}},
                {"function": {"name": "g", "arguments": "{}"}}
            ])]),
            [(s(""), s("f"), s("{}")), (s(""), s("g"), s("{}"))]
        );
        // Well-indexed calls keep their indices.
        assert_eq!(
            gathered(vec![
                json!([{"index": 0, "id": "a", "function": {"name": "f", "arguments": ""}},
                       {"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]),
                json!([{"index": 1, "function": {"arguments": "{}"}}]),
                json!([{"index": 0, "function": {"arguments": "{}"}}]),
            ]),
            [(s("a"), s("f"), s("{}")), (s("b"), s("g"), s("{}"))]
        );
    }

    /// Mistral's reasoning models answer with `content` as a list of chunks: the text chunks are
    /// the content and the thinking chunks the reasoning, whole or streamed (before, the answer
    /// failed to parse and the client got a 502).
    #[test]
    fn content_chunks_fold_into_content_and_reasoning() {
        let resp: ChatCompletion = serde_json::from_value(serde_json::json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "magistral-medium",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": [
                {"type": "thinking", "thinking": [{"type": "text", "text": "Two and "}, {"type": "text", "text": "two."}]},
                {"type": "text", "text": "Four"},
                {"type": "reference", "reference_ids": [1]},
                {"type": "text", "text": "."}
            ]}}]
        }))
        .expect("parses");
        let m = &resp.choices[0].message;
        assert_eq!(m.content.as_deref(), Some("Four."));
        assert_eq!(reasoning_text(&m.extra), Some("Two and two."));

        let thinking_only: ChatCompletionChunk = serde_json::from_value(serde_json::json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "Hm"}]}]}}]
        }))
        .expect("parses");
        let d = &thinking_only.choices[0].delta;
        assert_eq!(d.content, None);
        assert_eq!(reasoning_text(&d.extra), Some("Hm"));

        let plain: ChatCompletionChunk = serde_json::from_str(
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"a\"b"}}]}"#,
        )
        .expect("parses");
        assert_eq!(plain.choices[0].delta.content.as_deref(), Some("a\"b"));
        let null: ResponseMessage =
            serde_json::from_str(r#"{"role":"assistant","content":null}"#).unwrap();
        assert_eq!(null.content, None);
        assert!(serde_json::from_str::<ResponseMessage>(r#"{"content":5}"#).is_err());
    }
}
