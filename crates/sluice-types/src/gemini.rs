//! Google Gemini `generateContent` and `streamGenerateContent` shapes, and the pure functions that
//! translate them to and from the OpenAI shapes in [`crate::openai`].
//!
//! The wire format is camelCase JSON. Every main struct keeps the fields it does not name in
//! `extra` (`#[serde(flatten)]`), so new Gemini fields (`thinkingConfig`, `groundingMetadata`,
//! `citationMetadata`, …) survive a round trip. Request-side fields also accept the snake_case
//! spelling that the Gemini API itself accepts.
//!
//! * [`request_from_openai`] turns an OpenAI [`ChatRequest`] into a [`GenerateContentRequest`]
//!   (send it to `POST /v1beta/{model_path}:generateContent`, or `:streamGenerateContent?alt=sse`).
//! * [`response_to_openai`] turns a [`GenerateContentResponse`] into a [`ChatCompletion`].
//! * [`StreamDecoder`] turns the `alt=sse` events of `streamGenerateContent` (each a whole
//!   [`GenerateContentResponse`] carrying only the new parts) into [`ChatCompletionChunk`]s.
//!
//! Nothing here does I/O.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::TranslateError;
use crate::ids::unix_now;
use crate::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, ChunkChoice, Content, ContentPart,
    Delta, Extra, FunctionCall, FunctionCallDelta, PromptTokensDetails, ResponseMessage, Role,
    ToolCall, ToolCallDelta, Usage,
};

/// A function call's `thoughtSignature`, kept on the OpenAI tool call as Google's own
/// OpenAI-compatible API does (`extra_content.google.thought_signature`), so that a client that
/// sends the call back gives Gemini its own signature.
fn signature_extra(part: &Part) -> Extra {
    let mut extra = Extra::new();
    if let Some(sig) = part
        .thought_signature
        .as_deref()
        .filter(|s| !s.is_empty() && *s != SKIP_THOUGHT_SIGNATURE)
    {
        extra.insert(
            "extra_content".into(),
            serde_json::json!({"google": {"thought_signature": sig}}),
        );
    }
    extra
}

/// The signature an OpenAI tool call carries back (see [`signature_extra`]).
fn call_signature(tc: &ToolCall) -> Option<&str> {
    tc.extra
        .get("extra_content")?
        .get("google")?
        .get("thought_signature")?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// The `thoughtSignature` Gemini documents for function calls it did not generate itself (history
/// from another model, or replayed through an API that cannot carry the real signature). Gemini 3
/// models reject a model turn whose first function call has no signature; OpenAI tool calls have
/// nowhere to keep the real one, so [`request_from_openai`] puts this value on the first function
/// call of each model turn.
pub const SKIP_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";

// ---------------------------------------------------------------------------------------------
// Wire types: request
// ---------------------------------------------------------------------------------------------

/// `POST /v1beta/{model}:generateContent` (and `:streamGenerateContent`) request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentRequest {
    /// The conversation, alternating `user` and `model` turns.
    #[serde(default)]
    pub contents: Vec<GeminiContent>,
    /// System prompt (text parts; the role is ignored by Gemini).
    #[serde(
        default,
        alias = "system_instruction",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_instruction: Option<GeminiContent>,
    /// Sampling and output settings.
    #[serde(
        default,
        alias = "generation_config",
        skip_serializing_if = "Option::is_none"
    )]
    pub generation_config: Option<GenerationConfig>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<GeminiTool>>,
    /// How the model may use the tools.
    #[serde(
        default,
        alias = "tool_config",
        skip_serializing_if = "Option::is_none"
    )]
    pub tool_config: Option<ToolConfig>,
    /// Safety settings, passed through untouched.
    #[serde(
        default,
        alias = "safety_settings",
        skip_serializing_if = "Option::is_none"
    )]
    pub safety_settings: Option<Value>,
    /// Fields this struct does not name (`cachedContent`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// One turn of a conversation: a role and its parts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GeminiContent {
    /// `"user"` or `"model"`; absent in `systemInstruction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The parts of the turn. Gemini may omit it (for example when a thinking model runs out of
    /// output tokens), so it defaults to empty.
    #[serde(default)]
    pub parts: Vec<Part>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One part of a turn. Exactly one of the data fields is normally set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Part {
    /// Text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Inline bytes (base64) with their MIME type.
    #[serde(
        default,
        alias = "inline_data",
        skip_serializing_if = "Option::is_none"
    )]
    pub inline_data: Option<InlineData>,
    /// A reference to a file (Files API URI, `gs://`, YouTube or web URL).
    #[serde(default, alias = "file_data", skip_serializing_if = "Option::is_none")]
    pub file_data: Option<FileData>,
    /// A function call predicted by the model.
    #[serde(
        default,
        alias = "function_call",
        skip_serializing_if = "Option::is_none"
    )]
    pub function_call: Option<GeminiFunctionCall>,
    /// The result of a function call, sent back by the client.
    #[serde(
        default,
        alias = "function_response",
        skip_serializing_if = "Option::is_none"
    )]
    pub function_response: Option<GeminiFunctionResponse>,
    /// Whether this part is a thought (reasoning summary) rather than answer text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thought: Option<bool>,
    /// Opaque signature of the model's reasoning, to be sent back on later turns.
    #[serde(
        default,
        alias = "thought_signature",
        skip_serializing_if = "Option::is_none"
    )]
    pub thought_signature: Option<String>,
    /// Fields this struct does not name (`executableCode`, `videoMetadata`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

impl Part {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Self {
        Part {
            text: Some(text.into()),
            ..Part::default()
        }
    }

    /// Whether the part is a thought.
    pub fn is_thought(&self) -> bool {
        self.thought.unwrap_or(false)
    }
}

/// Inline bytes: `{"mimeType", "data"}` with `data` base64-encoded.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InlineData {
    /// IANA MIME type, e.g. `image/png`.
    #[serde(default, alias = "mime_type")]
    pub mime_type: String,
    /// Base64-encoded bytes.
    #[serde(default)]
    pub data: String,
}

/// A file reference: `{"mimeType", "fileUri"}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileData {
    /// IANA MIME type, when known.
    #[serde(default, alias = "mime_type", skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// The URI of the file.
    #[serde(default, alias = "file_uri")]
    pub file_uri: String,
}

/// `functionCall`: a call the model wants made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GeminiFunctionCall {
    /// The declared function's name.
    #[serde(default)]
    pub name: String,
    /// The arguments, as a JSON object.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    /// The call's id, when Gemini assigns one; echoed in the matching `functionResponse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `functionResponse`: the result of a call, sent back to the model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GeminiFunctionResponse {
    /// The called function's name.
    #[serde(default)]
    pub name: String,
    /// The result, as a JSON object.
    #[serde(default)]
    pub response: Value,
    /// The id of the call this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// `generationConfig`: sampling and output settings. Every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, alias = "top_p", skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, alias = "top_k", skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(
        default,
        alias = "max_output_tokens",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_output_tokens: Option<u32>,
    #[serde(
        default,
        alias = "stop_sequences",
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(
        default,
        alias = "candidate_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub candidate_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// `application/json` asks for JSON output.
    #[serde(
        default,
        alias = "response_mime_type",
        skip_serializing_if = "Option::is_none"
    )]
    pub response_mime_type: Option<String>,
    /// The schema the JSON output must follow (needs `responseMimeType: application/json`).
    #[serde(
        default,
        alias = "response_schema",
        skip_serializing_if = "Option::is_none"
    )]
    pub response_schema: Option<Value>,
    /// The same as JSON Schema: what an OpenAI `json_schema` response format is sent as.
    /// Exclusive with `responseSchema`.
    #[serde(
        default,
        alias = "response_json_schema",
        skip_serializing_if = "Option::is_none"
    )]
    pub response_json_schema: Option<Value>,
    #[serde(
        default,
        alias = "presence_penalty",
        skip_serializing_if = "Option::is_none"
    )]
    pub presence_penalty: Option<f64>,
    #[serde(
        default,
        alias = "frequency_penalty",
        skip_serializing_if = "Option::is_none"
    )]
    pub frequency_penalty: Option<f64>,
    /// Fields this struct does not name (`thinkingConfig`, `responseModalities`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of `tools`. Only function declarations are named; other tool kinds
/// (`googleSearch`, `codeExecution`, …) are kept in `extra`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeminiTool {
    /// Functions the model may call.
    #[serde(
        default,
        alias = "function_declarations",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub function_declarations: Vec<FunctionDeclaration>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A function the model may call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionDeclaration {
    /// The function's name.
    pub name: String,
    /// What the function does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The arguments' schema in Gemini's OpenAPI subset (`Schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The arguments' schema as JSON Schema (`additionalProperties`, `anyOf`, `$ref`…): what an
    /// OpenAI tool's `parameters` are sent as. Exclusive with `parameters`.
    #[serde(
        default,
        rename = "parametersJsonSchema",
        alias = "parameters_json_schema",
        skip_serializing_if = "Option::is_none"
    )]
    pub parameters_json_schema: Option<Value>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `toolConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolConfig {
    /// How functions may be called.
    #[serde(
        default,
        alias = "function_calling_config",
        skip_serializing_if = "Option::is_none"
    )]
    pub function_calling_config: Option<FunctionCallingConfig>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `functionCallingConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FunctionCallingConfig {
    /// `AUTO`, `ANY` (must call) or `NONE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// With `ANY`: the functions the model may choose from.
    #[serde(
        default,
        alias = "allowed_function_names",
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_function_names: Option<Vec<String>>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

// ---------------------------------------------------------------------------------------------
// Wire types: response
// ---------------------------------------------------------------------------------------------

/// `generateContent` response body, and one `alt=sse` event of `streamGenerateContent`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerateContentResponse {
    /// The generated candidates (none when the prompt was blocked).
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// Token counts; cumulative over a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_metadata: Option<UsageMetadata>,
    /// The model that answered, e.g. `gemini-2.5-flash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The response's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    /// Why the prompt was blocked, if it was (`{"blockReason": "SAFETY", …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_feedback: Option<Value>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

impl GenerateContentResponse {
    /// The prompt's `blockReason`, if the prompt was blocked.
    pub fn block_reason(&self) -> Option<&str> {
        self.prompt_feedback
            .as_ref()
            .and_then(|f| f.get("blockReason"))
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
    }
}

/// One generated candidate.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// The generated turn (absent when generation was stopped before any output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<GeminiContent>,
    /// `STOP`, `MAX_TOKENS`, `SAFETY`, … (only on the last event of a stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The candidate's index (Gemini omits it for the first one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Safety ratings, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_ratings: Option<Value>,
    /// Fields this struct does not name (`citationMetadata`, `groundingMetadata`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// `usageMetadata`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_content_token_count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thoughts_token_count: Option<u64>,
    /// What tools (code execution, search grounding) put before the model, read as input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_use_prompt_token_count: Option<u64>,
    /// Fields this struct does not name (`promptTokensDetails`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

impl UsageMetadata {
    /// The OpenAI usage: completion tokens include thought tokens (also reported as
    /// `completion_tokens_details.reasoning_tokens`); prompt tokens include what tools put before
    /// the model (`toolUsePromptTokenCount`, billed as input), as Gemini's `totalTokenCount`
    /// does; cached tokens go to `prompt_tokens_details.cached_tokens`.
    pub fn to_openai(&self) -> Usage {
        let prompt = self
            .prompt_token_count
            .unwrap_or(0)
            .saturating_add(self.tool_use_prompt_token_count.unwrap_or(0));
        let thoughts = self.thoughts_token_count.unwrap_or(0);
        let completion = self
            .candidates_token_count
            .unwrap_or(0)
            .saturating_add(thoughts);
        let cached = self.cached_content_token_count.unwrap_or(0);
        let mut extra = Extra::new();
        if thoughts > 0 {
            let mut details = Map::new();
            details.insert("reasoning_tokens".into(), Value::from(thoughts));
            extra.insert("completion_tokens_details".into(), Value::Object(details));
        }
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            prompt_tokens_details: (cached > 0).then(|| PromptTokensDetails {
                cached_tokens: Some(cached),
                extra: Extra::new(),
            }),
            extra,
        }
    }
}

/// The Gemini error body: `{"error": {"code": 400, "message": "…", "status": "INVALID_ARGUMENT"}}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GeminiError {
    /// The error.
    pub error: GeminiErrorDetail,
}

/// The inside of a [`GeminiError`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GeminiErrorDetail {
    /// The HTTP status code.
    #[serde(default)]
    pub code: u16,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// The canonical status name, e.g. `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Structured details, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// Fields this struct does not name.
    #[serde(flatten)]
    pub extra: Extra,
}

impl std::fmt::Display for GeminiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error.status {
            Some(s) => write!(f, "{} {}: {}", self.error.code, s, self.error.message),
            None => write!(f, "{}: {}", self.error.code, self.error.message),
        }
    }
}

impl std::error::Error for GeminiError {}

// ---------------------------------------------------------------------------------------------
// OpenAI -> Gemini
// ---------------------------------------------------------------------------------------------

/// The resource path of a model: `models/{model}`, unless `model` already starts with `models/`
/// or `tunedModels/`.
pub fn model_path(model: &str) -> String {
    if model.starts_with("models/") || model.starts_with("tunedModels/") {
        model.to_string()
    } else {
        format!("models/{model}")
    }
}

/// Translates an OpenAI chat request into a Gemini `generateContent` request.
///
/// System and developer messages become `systemInstruction`; user messages and tool results
/// become `user` turns, assistant messages `model` turns, and consecutive turns of one role are
/// merged. Tools, `tool_choice`, sampling settings and `response_format` are mapped; OpenAI fields
/// with no Gemini counterpart are dropped. Fails on tool-call arguments that are not JSON, a tool
/// result whose function cannot be named, and content Gemini cannot take (non-base64 data URLs,
/// OpenAI file ids, unknown part types).
pub fn request_from_openai(req: &ChatRequest) -> Result<GenerateContentRequest, TranslateError> {
    let mut system_parts: Vec<Part> = Vec::new();
    let mut contents: Vec<GeminiContent> = Vec::new();
    // Tool-call id -> function name, from earlier assistant messages.
    let mut call_names: HashMap<&str, &str> = HashMap::new();

    for (i, msg) in req.messages.iter().enumerate() {
        match msg.role {
            Role::System | Role::Developer => {
                system_parts.extend(text_parts(msg.content.as_ref()));
            }
            Role::User => {
                let parts = user_parts(msg.content.as_ref(), i)?;
                push_content(&mut contents, "user", parts);
            }
            Role::Assistant => {
                let mut parts = text_parts(msg.content.as_ref());
                // Gemini signs the first call of a turn; calls it did not make get the
                // signature it documents for history it did not generate.
                let calls = msg.tool_calls.iter().flatten();
                let mut signed = calls.clone().any(|tc| call_signature(tc).is_some());
                for tc in msg.tool_calls.iter().flatten() {
                    // A call made without arguments may carry an empty string (some servers
                    // stream none): the empty object, as Anthropic's egress reads it too.
                    let raw = tc.function.arguments.trim();
                    let raw = if raw.is_empty() { "{}" } else { raw };
                    let args: Value = serde_json::from_str(raw).map_err(|e| {
                        TranslateError::invalid(format!(
                            "messages[{i}]: tool call {:?} ({}) has arguments that are not valid \
                             JSON: {e}",
                            tc.id, tc.function.name
                        ))
                    })?;
                    call_names.insert(tc.id.as_str(), tc.function.name.as_str());
                    parts.push(Part {
                        function_call: Some(GeminiFunctionCall {
                            name: tc.function.name.clone(),
                            args,
                            id: non_empty(&tc.id),
                        }),
                        thought_signature: call_signature(tc)
                            .map(str::to_string)
                            .or_else(|| (!signed).then(|| SKIP_THOUGHT_SIGNATURE.to_string())),
                        ..Part::default()
                    });
                    signed = true;
                }
                push_content(&mut contents, "model", parts);
            }
            Role::Tool | Role::Function => {
                let id = msg.tool_call_id.as_deref().filter(|s| !s.is_empty());
                let name = id
                    .and_then(|id| call_names.get(id).copied())
                    .or(msg.name.as_deref())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        TranslateError::invalid(format!(
                            "messages[{i}]: tool result for call {:?} does not follow an assistant \
                             tool call with that id, so its function name is unknown",
                            id.unwrap_or("")
                        ))
                    })?;
                let part = Part {
                    function_response: Some(GeminiFunctionResponse {
                        name: name.to_string(),
                        response: tool_response_value(&msg.text_content()),
                        id: id.map(str::to_string),
                    }),
                    ..Part::default()
                };
                push_content(&mut contents, "user", vec![part]);
            }
        }
    }

    let tools = tools_from_openai(req)?;
    let tool_config = match (&tools, &req.tool_choice) {
        (Some(_), Some(choice)) => tool_config_from_openai(choice)?,
        _ => None,
    };

    Ok(GenerateContentRequest {
        contents,
        system_instruction: (!system_parts.is_empty()).then(|| GeminiContent {
            role: None,
            parts: system_parts,
            extra: Extra::new(),
        }),
        generation_config: generation_config_from_openai(req)?,
        tools,
        tool_config,
        safety_settings: None,
        extra: Extra::new(),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Appends a turn, merging it into the previous one when the role is the same.
fn push_content(contents: &mut Vec<GeminiContent>, role: &str, parts: Vec<Part>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut()
        && last.role.as_deref() == Some(role)
    {
        last.parts.extend(parts);
        return;
    }
    contents.push(GeminiContent {
        role: Some(role.to_string()),
        parts,
        extra: Extra::new(),
    });
}

/// The non-empty text of a message as text parts (non-text parts are skipped).
fn text_parts(content: Option<&Content>) -> Vec<Part> {
    match content {
        None => Vec::new(),
        Some(Content::Text(s)) if s.is_empty() => Vec::new(),
        Some(Content::Text(s)) => vec![Part::text(s.clone())],
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter_map(|p| p.text.as_deref())
            .filter(|t| !t.is_empty())
            .map(Part::text)
            .collect(),
    }
}

fn user_parts(content: Option<&Content>, i: usize) -> Result<Vec<Part>, TranslateError> {
    let parts = match content {
        Some(Content::Parts(parts)) => parts,
        other => return Ok(text_parts(other)),
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        if let Some(part) = user_part(p)
            .map_err(|e| TranslateError(format!("messages[{i}].content[{j}]: {}", e.0), e.1))?
        {
            out.push(part);
        }
    }
    Ok(out)
}

fn user_part(p: &ContentPart) -> Result<Option<Part>, TranslateError> {
    match p.kind.as_str() {
        "text" => Ok(p.text.as_deref().filter(|t| !t.is_empty()).map(Part::text)),
        "image_url" => {
            let url = p
                .image_url
                .as_ref()
                .map(|u| u.url.as_str())
                .ok_or_else(|| TranslateError::invalid("image_url part without an image_url"))?;
            url_part(url).map(Some)
        }
        "input_audio" => {
            let audio = p.extra.get("input_audio");
            let data = audio
                .and_then(|a| a.get("data"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    TranslateError::invalid("input_audio part without input_audio.data")
                })?;
            let format = audio
                .and_then(|a| a.get("format"))
                .and_then(Value::as_str)
                .unwrap_or("wav");
            Ok(Some(Part {
                inline_data: Some(InlineData {
                    mime_type: format!("audio/{format}"),
                    data: data.to_string(),
                }),
                ..Part::default()
            }))
        }
        "file" => {
            let file = p.extra.get("file");
            match file
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
            {
                Some(data_url) => url_part(data_url).map(Some),
                None => Err(TranslateError::unsupported(
                    "file parts must carry file_data (a data URL); OpenAI file ids \
                             cannot be sent to Gemini",
                )),
            }
        }
        other => Err(TranslateError::unsupported(format!(
            "content part type {other:?} cannot be sent to Gemini"
        ))),
    }
}

/// A data URL becomes `inlineData`; any other URL becomes `fileData`.
fn url_part(url: &str) -> Result<Part, TranslateError> {
    let is_data = url
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case("data:"));
    if !is_data {
        return Ok(Part {
            file_data: Some(FileData {
                mime_type: guess_mime(url).map(str::to_string),
                file_uri: url.to_string(),
            }),
            ..Part::default()
        });
    }
    let rest = url.get(5..).unwrap_or("");
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| TranslateError::invalid("malformed data URL: no ',' before the data"))?;
    let mut params = meta.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(TranslateError::unsupported(
            "only base64 data URLs can be sent to Gemini",
        ));
    }
    Ok(Part {
        inline_data: Some(InlineData {
            mime_type: if mime.is_empty() {
                "application/octet-stream".to_string()
            } else {
                mime.to_string()
            },
            data: data.trim().to_string(),
        }),
        ..Part::default()
    })
}

/// The MIME type of a URL, guessed from its extension.
fn guess_mime(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    let last = path.rsplit('/').next().unwrap_or("");
    let (_, ext) = last.rsplit_once('.')?;
    let mime = match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "ogg" => "audio/ogg",
        "flac" => "audio/flac",
        "mp4" => "video/mp4",
        "mov" => "video/mov",
        "webm" => "video/webm",
        _ => return None,
    };
    Some(mime)
}

/// A tool result as a `functionResponse.response` object: the content itself if it is a JSON
/// object, else `{"content": text}`.
fn tool_response_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Value::Object(m),
        _ => {
            let mut m = Map::new();
            m.insert("content".into(), Value::String(text.to_string()));
            Value::Object(m)
        }
    }
}

fn tools_from_openai(req: &ChatRequest) -> Result<Option<Vec<GeminiTool>>, TranslateError> {
    let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let mut declarations = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(TranslateError::unsupported(format!(
                "tools[{i}]: tool type {:?} cannot be sent to Gemini",
                tool.kind
            )));
        }
        declarations.push(FunctionDeclaration {
            name: tool.function.name.clone(),
            description: tool.function.description.clone(),
            parameters: None,
            // OpenAI's parameters are JSON Schema (strict mode puts `additionalProperties:
            // false` on every object), which Gemini's `parameters` field refuses.
            parameters_json_schema: tool
                .function
                .parameters
                .clone()
                .filter(|p| !is_empty_object_schema(p)),
            extra: Extra::new(),
        });
    }
    Ok(Some(vec![GeminiTool {
        function_declarations: declarations,
        extra: Extra::new(),
    }]))
}

/// `{}`, or `{"type": "object"}` that admits no argument at all (no properties, no
/// `additionalProperties` schema): a function without parameters, which Gemini takes as the
/// field left out. An object with `additionalProperties` (a free-form map) is kept.
fn is_empty_object_schema(schema: &Value) -> bool {
    let Some(obj) = schema.as_object() else {
        return false;
    };
    let is_object = obj
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("object"));
    let no_properties = obj
        .get("properties")
        .and_then(Value::as_object)
        .is_none_or(Map::is_empty);
    let no_map = obj
        .get("additionalProperties")
        .is_none_or(|a| *a == Value::Bool(false));
    obj.is_empty() || (is_object && no_properties && no_map)
}

fn tool_config_from_openai(choice: &Value) -> Result<Option<ToolConfig>, TranslateError> {
    let (mode, names) = match choice {
        Value::Null => return Ok(None),
        Value::String(s) => match s.as_str() {
            "auto" => ("AUTO", None),
            "none" => ("NONE", None),
            "required" => ("ANY", None),
            other => {
                return Err(TranslateError::invalid(format!(
                    "tool_choice {other:?} is not one of auto, none, required"
                )));
            }
        },
        Value::Object(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    TranslateError::invalid("tool_choice object without function.name")
                })?;
            ("ANY", Some(vec![name.to_string()]))
        }
        _ => {
            return Err(TranslateError::invalid(
                "tool_choice must be a string or an object".to_string(),
            ));
        }
    };
    Ok(Some(ToolConfig {
        function_calling_config: Some(FunctionCallingConfig {
            mode: Some(mode.to_string()),
            allowed_function_names: names,
            extra: Extra::new(),
        }),
        extra: Extra::new(),
    }))
}

/// The generation settings; `reasoning_effort` becomes a `thinkingConfig` budget
/// ([`ChatRequest::reasoning_budget`]; `none` is a budget of 0, no thinking).
fn generation_config_from_openai(
    req: &ChatRequest,
) -> Result<Option<GenerationConfig>, TranslateError> {
    let stop = req.stop_sequences();
    let mut gc = GenerationConfig {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.extra.get("top_k").and_then(as_u32),
        max_output_tokens: req.max_output_tokens(),
        stop_sequences: (!stop.is_empty()).then_some(stop),
        candidate_count: req.n,
        seed: req.seed,
        presence_penalty: non_zero_f64(req.extra.get("presence_penalty")),
        frequency_penalty: non_zero_f64(req.extra.get("frequency_penalty")),
        ..GenerationConfig::default()
    };
    if let Some(rf) = &req.response_format {
        match rf.get("type").and_then(Value::as_str) {
            Some("json_object") => gc.response_mime_type = Some("application/json".into()),
            Some("json_schema") => {
                gc.response_mime_type = Some("application/json".into());
                gc.response_json_schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| !s.is_null())
                    .cloned();
            }
            _ => {}
        }
    }
    if let Some(budget) = req.reasoning_budget().map_err(TranslateError::invalid)? {
        gc.extra
            .insert("thinkingConfig".into(), json!({"thinkingBudget": budget}));
    }
    Ok((gc != GenerationConfig::default()).then_some(gc))
}

/// A non-negative whole number that fits in `u32` (`40` or `40.0`).
fn as_u32(v: &Value) -> Option<u32> {
    if let Some(n) = v.as_u64() {
        return u32::try_from(n).ok();
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f <= f64::from(u32::MAX) && f.fract() == 0.0).then_some(f as u32)
}

/// A number other than zero (penalties of zero are OpenAI's default and some Gemini models reject
/// the field outright, so zero is not sent).
fn non_zero_f64(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64).filter(|f| *f != 0.0)
}

// ---------------------------------------------------------------------------------------------
// Gemini -> OpenAI
// ---------------------------------------------------------------------------------------------

/// Maps a Gemini `finishReason` to OpenAI's `finish_reason`. `has_calls`: whether the candidate
/// produced function calls (a normal stop then reads `tool_calls`).
pub fn finish_reason_to_openai(reason: Option<&str>, has_calls: bool) -> &'static str {
    match reason {
        Some("MAX_TOKENS") => "length",
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT",
        ) => "content_filter",
        Some("STOP") | None if has_calls => "tool_calls",
        _ => "stop",
    }
}

/// A finish reason that says the model failed to give an answer (a malformed or unexpected
/// function call, too many calls, or an unstated reason): with nothing produced, the answer is
/// an upstream error (retried, or failed over), not an empty success.
fn failed_generation(reason: &str) -> bool {
    matches!(
        reason,
        "MALFORMED_FUNCTION_CALL" | "UNEXPECTED_TOOL_CALL" | "TOO_MANY_TOOL_CALLS" | "OTHER"
    )
}

/// The error for a candidate that ended on a [`failed_generation`] reason with nothing produced.
fn failed_candidate(reason: &str, cand: &Candidate) -> TranslateError {
    let said = cand
        .extra
        .get("finishMessage")
        .and_then(Value::as_str)
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    TranslateError::invalid(format!(
        "Gemini ended the answer without one (finishReason {reason}{said})"
    ))
}

/// Translates a Gemini `generateContent` response into an OpenAI chat completion.
///
/// One choice per candidate; thought parts are left out of the content; function calls become
/// tool calls (with a generated `call_…` id when Gemini gave none). A blocked prompt (no
/// candidates) yields one empty choice with `finish_reason: "content_filter"`. Fails when the
/// body is a Gemini error object.
pub fn response_to_openai(
    resp: GenerateContentResponse,
    model: &str,
) -> Result<ChatCompletion, TranslateError> {
    if let Some(err) = embedded_error(&resp) {
        return Err(err);
    }
    let blocked = resp.block_reason().is_some();
    let mut choices = Vec::with_capacity(resp.candidates.len().max(1));
    for (pos, cand) in resp.candidates.iter().enumerate() {
        let parts = cand.content.as_ref().map_or(&[][..], |c| &c.parts[..]);
        let text = candidate_text(parts);
        let tool_calls: Vec<ToolCall> = parts
            .iter()
            .filter_map(|p| Some((p.function_call.as_ref()?, p)))
            .map(|(fc, p)| ToolCall {
                id: call_id(fc),
                kind: "function".into(),
                function: FunctionCall {
                    name: fc.name.clone(),
                    arguments: args_json(&fc.args),
                },
                extra: signature_extra(p),
            })
            .collect();
        if let Some(reason) = cand.finish_reason.as_deref()
            && failed_generation(reason)
            && text.is_empty()
            && tool_calls.is_empty()
        {
            return Err(failed_candidate(reason, cand));
        }
        let finish = finish_reason_to_openai(cand.finish_reason.as_deref(), !tool_calls.is_empty());
        choices.push(Choice {
            index: cand.index.unwrap_or_else(|| position_index(pos)),
            message: ResponseMessage {
                role: Role::Assistant,
                content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                refusal: None,
                extra: Extra::new(),
            },
            finish_reason: Some(finish.to_string()),
            logprobs: None,
            extra: Extra::new(),
        });
    }
    if choices.is_empty() {
        if !blocked {
            // Neither an answer nor a refusal (`{}`): a broken upstream, not an empty reply.
            return Err(TranslateError::invalid(
                "Gemini's answer has no candidates and no block reason",
            ));
        }
        choices.push(Choice {
            index: 0,
            message: ResponseMessage {
                role: Role::Assistant,
                content: Some(String::new()),
                tool_calls: None,
                refusal: None,
                extra: Extra::new(),
            },
            finish_reason: Some(if blocked { "content_filter" } else { "stop" }.to_string()),
            logprobs: None,
            extra: Extra::new(),
        });
    }
    Ok(ChatCompletion {
        id: resp
            .response_id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(new_completion_id),
        object: "chat.completion".into(),
        created: unix_now(),
        model: resp
            .model_version
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| model.to_string()),
        choices,
        usage: resp.usage_metadata.as_ref().map(UsageMetadata::to_openai),
        system_fingerprint: None,
        extra: Extra::new(),
    })
}

/// A body that deserialized as a response but is really `{"error": {…}}` (Gemini sends errors
/// this way inside a stream too).
fn embedded_error(resp: &GenerateContentResponse) -> Option<TranslateError> {
    let err = resp.extra.get("error")?;
    let msg = match serde_json::from_value::<GeminiErrorDetail>(err.clone()) {
        Ok(detail) => GeminiError { error: detail }.to_string(),
        Err(_) => err.to_string(),
    };
    Some(TranslateError::unsupported(format!(
        "Gemini returned an error: {msg}"
    )))
}

/// The answer text of a candidate: its non-thought text parts, concatenated.
fn candidate_text(parts: &[Part]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_thought())
        .filter_map(|p| p.text.as_deref())
        .collect()
}

fn call_id(fc: &GeminiFunctionCall) -> String {
    fc.id
        .as_deref()
        .and_then(non_empty)
        .unwrap_or_else(|| format!("call_{}", Uuid::now_v7().simple()))
}

/// Compact JSON of a call's arguments (`{}` when Gemini sent none).
fn args_json(args: &Value) -> String {
    if args.is_null() {
        return "{}".to_string();
    }
    serde_json::to_string(args).unwrap_or_else(|_| "{}".to_string())
}

fn new_completion_id() -> String {
    format!("chatcmpl-{}", Uuid::now_v7().simple())
}

fn position_index(pos: usize) -> u32 {
    u32::try_from(pos).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// Translates the events of `streamGenerateContent?alt=sse` into OpenAI chunks.
///
/// Feed each event's parsed [`GenerateContentResponse`] to [`StreamDecoder::on_response`], then
/// call [`StreamDecoder::finish`] once the upstream stream ends. All chunks share one id (the
/// first event's `responseId`, or a generated one), one `created` and one model.
#[derive(Debug)]
pub struct StreamDecoder {
    model: String,
    id: Option<String>,
    created: u64,
    choices: HashMap<u32, ChoiceState>,
    usage: Option<Usage>,
    finished: bool,
}

#[derive(Debug, Default)]
struct ChoiceState {
    started: bool,
    tool_calls: u32,
    finished: bool,
    /// Whether any text came.
    produced: bool,
}

impl StreamDecoder {
    /// A decoder for a stream from `model` (used unless the events name a `modelVersion`).
    pub fn new(model: &str) -> Self {
        StreamDecoder {
            model: model.to_string(),
            id: None,
            created: unix_now(),
            choices: HashMap::new(),
            usage: None,
            finished: false,
        }
    }

    /// The chunks for one event: a role-and-content delta per candidate with new text or
    /// function calls (each call complete, in one delta), then a finish chunk per candidate
    /// that finished. The latest `usageMetadata` is kept for [`StreamDecoder::finish`]. Fails
    /// when the event is a Gemini error object.
    pub fn on_response(
        &mut self,
        resp: GenerateContentResponse,
    ) -> Result<Vec<ChatCompletionChunk>, TranslateError> {
        if let Some(err) = embedded_error(&resp) {
            return Err(err);
        }
        if self.id.is_none() {
            self.id = Some(
                resp.response_id
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(new_completion_id),
            );
            if let Some(v) = resp.model_version.as_deref().filter(|s| !s.is_empty()) {
                self.model = v.to_string();
            }
        }
        if let Some(u) = &resp.usage_metadata {
            self.usage = Some(u.to_openai());
        }

        let mut out: Vec<ChunkChoice> = Vec::new();
        if resp.candidates.is_empty() && resp.block_reason().is_some() {
            let state = self.choices.entry(0).or_default();
            if !state.finished {
                if !state.started {
                    state.started = true;
                    out.push(ChunkChoice::new(0, role_delta(), None));
                }
                state.finished = true;
                out.push(ChunkChoice::new(
                    0,
                    Delta::default(),
                    Some("content_filter".into()),
                ));
            }
        }
        for (pos, cand) in resp.candidates.iter().enumerate() {
            let index = cand.index.unwrap_or_else(|| position_index(pos));
            let state = self.choices.entry(index).or_default();
            let parts = cand.content.as_ref().map_or(&[][..], |c| &c.parts[..]);

            let mut delta = Delta::default();
            if !state.started {
                state.started = true;
                delta.role = Some(Role::Assistant);
            }
            let text = candidate_text(parts);
            if !text.is_empty() {
                state.produced = true;
                delta.content = Some(text);
            }
            let mut calls = Vec::new();
            for (fc, p) in parts
                .iter()
                .filter_map(|p| Some((p.function_call.as_ref()?, p)))
            {
                calls.push(ToolCallDelta {
                    index: state.tool_calls,
                    id: Some(call_id(fc)),
                    kind: Some("function".into()),
                    function: Some(FunctionCallDelta {
                        name: Some(fc.name.clone()),
                        arguments: Some(args_json(&fc.args)),
                    }),
                    extra: signature_extra(p),
                });
                state.tool_calls = state.tool_calls.saturating_add(1);
            }
            if !calls.is_empty() {
                delta.tool_calls = Some(calls);
            }
            if delta != Delta::default() {
                out.push(ChunkChoice::new(index, delta, None));
            }

            let reason = cand.finish_reason.as_deref().filter(|r| !r.is_empty());
            if let Some(reason) = reason
                && failed_generation(reason)
                && !state.finished
                && !state.produced
                && state.tool_calls == 0
            {
                return Err(failed_candidate(reason, cand));
            }
            if let Some(reason) = reason
                && !state.finished
            {
                state.finished = true;
                let mapped = finish_reason_to_openai(Some(reason), state.tool_calls > 0);
                out.push(ChunkChoice::new(
                    index,
                    Delta::default(),
                    Some(mapped.to_string()),
                ));
            }
        }

        Ok(out
            .into_iter()
            .map(|choice| {
                let mut chunk = self.chunk();
                chunk.choices.push(choice);
                chunk
            })
            .collect())
    }

    /// The end of the stream: one chunk with no choices carrying the last usage seen (nothing if
    /// the stream reported none). Calling it again returns nothing.
    pub fn finish(&mut self) -> Vec<ChatCompletionChunk> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let Some(usage) = self.usage.clone() else {
            return Vec::new();
        };
        if self.id.is_none() {
            self.id = Some(new_completion_id());
        }
        let mut chunk = self.chunk();
        chunk.usage = Some(usage);
        vec![chunk]
    }

    fn chunk(&self) -> ChatCompletionChunk {
        ChatCompletionChunk::new(self.id.as_deref().unwrap_or(""), &self.model, self.created)
    }
}

fn role_delta() -> Delta {
    Delta {
        role: Some(Role::Assistant),
        ..Delta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ChunkAccumulator;
    use serde_json::json;

    fn chat(body: Value) -> ChatRequest {
        serde_json::from_value(body).expect("valid OpenAI request")
    }

    fn gemini(body: Value) -> GenerateContentResponse {
        serde_json::from_value(body).expect("valid Gemini response")
    }

    #[test]
    fn model_path_prefixes_bare_names_only() {
        assert_eq!(model_path("gemini-2.5-flash"), "models/gemini-2.5-flash");
        assert_eq!(model_path("models/gemini-2.5-pro"), "models/gemini-2.5-pro");
        assert_eq!(model_path("tunedModels/my-tune"), "tunedModels/my-tune");
    }

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget() {
        let gc = |effort: Value| {
            let req = chat(
                json!({"model": "gemini-2.5-flash", "reasoning_effort": effort,
                "messages": [{"role": "user", "content": "Why?"}]}),
            );
            request_from_openai(&req).map(|r| serde_json::to_value(r.generation_config).unwrap())
        };
        assert_eq!(
            gc(json!("medium")).unwrap(),
            json!({"thinkingConfig": {"thinkingBudget": 8192}})
        );
        assert_eq!(
            gc(json!("none")).unwrap(),
            json!({"thinkingConfig": {"thinkingBudget": 0}})
        );
        assert_eq!(gc(Value::Null).unwrap(), Value::Null);
        let e = gc(json!(3)).unwrap_err();
        assert_eq!(e.1, crate::TranslateKind::Invalid);
    }

    #[test]
    fn request_with_system_tools_tool_results_image_and_schema() {
        let req = chat(json!({
            "model": "gemini-2.5-flash",
            "messages": [
                {"role": "system", "content": "You are a weather bot."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in metric."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is the weather here and in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/photos/street.JPG?w=800"}}
                ]},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_a1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Berlin\"}"}},
                    {"id": "call_b2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_a1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
                {"role": "tool", "tool_call_id": "call_b2", "content": "rainy, 14C"},
                {"role": "user", "content": "Summarise as JSON."}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "strict": true,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false}
            }}, {"type": "function", "function": {
                "name": "now",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": false}
            }}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "summary", "strict": true, "schema": {
                "type": "object", "properties": {"summary": {"type": ["string", "null"]}}, "required": ["summary"], "additionalProperties": false
            }}},
            "temperature": 0.2,
            "top_p": 0.9,
            "max_tokens": 256,
            "max_completion_tokens": 512,
            "stop": "END",
            "n": 1,
            "seed": 7,
            "top_k": 40,
            "frequency_penalty": 0,
            "logprobs": true,
            "user": "u-123"
        }));
        let out = request_from_openai(&req).unwrap();
        let got = serde_json::to_value(&out).unwrap();
        let want = json!({
            "systemInstruction": {"parts": [
                {"text": "You are a weather bot."},
                {"text": "Answer in metric."}
            ]},
            "contents": [
                {"role": "user", "parts": [
                    {"text": "What is the weather here and in Paris?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photos/street.JPG?w=800"}}
                ]},
                {"role": "model", "parts": [
                    {"text": "Let me check."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Berlin"}, "id": "call_a1"},
                     "thoughtSignature": SKIP_THOUGHT_SIGNATURE},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}, "id": "call_b2"}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"temp": 21, "sky": "clear"}, "id": "call_a1"}},
                    {"functionResponse": {"name": "get_weather", "response": {"content": "rainy, 14C"}, "id": "call_b2"}},
                    {"text": "Summarise as JSON."}
                ]}
            ],
            "tools": [{"functionDeclarations": [
                {"name": "get_weather", "description": "Current weather for a city",
                 "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false}},
                {"name": "now"}
            ]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
            "generationConfig": {
                "temperature": 0.2,
                "topP": 0.9,
                "topK": 40,
                "maxOutputTokens": 512,
                "stopSequences": ["END"],
                "candidateCount": 1,
                "seed": 7,
                "responseMimeType": "application/json",
                "responseJsonSchema": {"type": "object", "properties": {"summary": {"type": ["string", "null"]}}, "required": ["summary"], "additionalProperties": false}
            }
        });
        assert_eq!(got, want);

        // The wire shape parses back to the same value.
        let back: GenerateContentRequest = serde_json::from_value(got).unwrap();
        assert_eq!(back, out);
    }

    #[test]
    fn tool_schemas_go_as_json_schema_and_only_argumentless_ones_are_left_out() {
        let params = |schema: Value| {
            let req = chat(json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]
            }));
            let out = request_from_openai(&req).unwrap();
            let tools = out.tools.unwrap();
            let d = &tools[0].function_declarations[0];
            assert_eq!(d.parameters, None);
            d.parameters_json_schema.clone()
        };
        assert_eq!(params(json!({})), None);
        assert_eq!(params(json!({"type": "object"})), None);
        assert_eq!(
            params(json!({"type": "object", "properties": {}, "additionalProperties": false})),
            None
        );
        // A free-form map takes arguments.
        let map = json!({"type": "object", "additionalProperties": {"type": "number"}});
        assert_eq!(params(map.clone()), Some(map));
        let any = json!({"type": "object", "additionalProperties": true});
        assert_eq!(params(any.clone()), Some(any));
    }

    #[test]
    fn tool_choice_strings_and_json_object_mode() {
        let base = |choice: Value| {
            chat(json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
                "tool_choice": choice,
                "response_format": {"type": "json_object"}
            }))
        };
        for (choice, mode) in [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")] {
            let out = request_from_openai(&base(json!(choice))).unwrap();
            let cfg = out.tool_config.unwrap().function_calling_config.unwrap();
            assert_eq!(cfg.mode.as_deref(), Some(mode));
            assert_eq!(cfg.allowed_function_names, None);
            let gc = out.generation_config.unwrap();
            assert_eq!(gc.response_mime_type.as_deref(), Some("application/json"));
            assert_eq!(gc.response_schema, None);
            assert_eq!(gc.response_json_schema, None);
        }
        let err = request_from_openai(&base(json!("sometimes"))).unwrap_err();
        assert!(err.0.contains("sometimes"), "{err}");
    }

    #[test]
    fn consecutive_user_messages_merge_and_empty_config_is_omitted() {
        let req = chat(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "user", "content": "second"},
                {"role": "assistant", "content": "ok"},
                {"role": "assistant", "content": "and more"}
            ]
        }));
        let out = request_from_openai(&req).unwrap();
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            json!({"contents": [
                {"role": "user", "parts": [{"text": "first"}, {"text": "second"}]},
                {"role": "model", "parts": [{"text": "ok"}, {"text": "and more"}]}
            ]})
        );
    }

    #[test]
    fn invalid_tool_call_arguments_are_an_error_naming_the_call() {
        let req = chat(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [
                    {"id": "call_bad9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Ber"}}
                ]}
            ]
        }));
        let err = request_from_openai(&req).unwrap_err();
        assert!(err.0.contains("call_bad9"), "{err}");
        assert!(err.0.contains("get_weather"), "{err}");
        assert!(err.0.contains("messages[1]"), "{err}");
    }

    #[test]
    fn unmatched_tool_result_and_bad_data_url_are_errors() {
        let orphan = chat(json!({
            "model": "m",
            "messages": [{"role": "tool", "tool_call_id": "call_zz", "content": "1"}]
        }));
        let err = request_from_openai(&orphan).unwrap_err();
        assert!(err.0.contains("call_zz"), "{err}");

        let not_b64 = chat(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%3E"}}
            ]}]
        }));
        let err = request_from_openai(&not_b64).unwrap_err();
        assert!(err.0.contains("base64"), "{err}");
        assert!(err.0.contains("messages[0].content[0]"), "{err}");

        // A mangled URL never panics.
        let weird = chat(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "dat"}},
                {"type": "image_url", "image_url": {"url": "é"}}
            ]}]
        }));
        let out = request_from_openai(&weird).unwrap();
        assert_eq!(out.contents[0].parts.len(), 2);
        assert_eq!(
            out.contents[0].parts[0]
                .file_data
                .as_ref()
                .unwrap()
                .mime_type,
            None
        );
    }

    #[test]
    fn text_response_with_thoughts_and_usage() {
        let resp = gemini(json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "The user wants a greeting.", "thought": true},
                    {"text": "Hello! "},
                    {"text": "How can I help?"}
                ]},
                "finishReason": "STOP",
                "index": 0,
                "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
            }],
            "usageMetadata": {
                "promptTokenCount": 12,
                "candidatesTokenCount": 8,
                "totalTokenCount": 50,
                "cachedContentTokenCount": 4,
                "thoughtsTokenCount": 30,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}]
            },
            "modelVersion": "gemini-2.5-flash",
            "responseId": "mJ4haOTcBuWrz7IPhYWq-Qs"
        }));
        let done = response_to_openai(resp, "gemini-flash-latest").unwrap();
        assert_eq!(done.id, "mJ4haOTcBuWrz7IPhYWq-Qs");
        assert_eq!(done.model, "gemini-2.5-flash");
        assert_eq!(done.object, "chat.completion");
        assert!(done.created > 0);
        assert_eq!(done.choices.len(), 1);
        let c = &done.choices[0];
        assert_eq!(c.index, 0);
        assert_eq!(c.message.role, Role::Assistant);
        assert_eq!(c.message.content.as_deref(), Some("Hello! How can I help?"));
        assert_eq!(c.message.tool_calls, None);
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        let u = done.usage.unwrap();
        assert_eq!(u.prompt_tokens, 12);
        assert_eq!(u.completion_tokens, 38);
        assert_eq!(u.total_tokens, 50);
        assert_eq!(u.cached_tokens(), 4);
        assert_eq!(
            u.extra.get("completion_tokens_details"),
            Some(&json!({"reasoning_tokens": 30}))
        );
    }

    #[test]
    fn function_call_response_becomes_tool_calls() {
        let resp = gemini(json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Berlin", "unit": "c"}}, "thoughtSignature": "CiQB0e2Kb1"},
                    {"functionCall": {"name": "get_time", "args": {"tz": "Europe/Paris"}, "id": "fc-7"}}
                ]},
                "finishReason": "STOP"
            }],
            "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 22, "totalTokenCount": 62},
            "modelVersion": "gemini-2.5-pro"
        }));
        let done = response_to_openai(resp, "gemini-2.5-pro").unwrap();
        assert!(done.id.starts_with("chatcmpl-"), "{}", done.id);
        let c = &done.choices[0];
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(c.message.content, None);
        let calls = c.message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() > 10);
        assert_eq!(calls[0].kind, "function");
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            calls[0].function.arguments,
            r#"{"city":"Berlin","unit":"c"}"#
        );
        assert_eq!(calls[1].id, "fc-7");
        assert_eq!(calls[1].function.arguments, r#"{"tz":"Europe/Paris"}"#);
        assert_eq!(done.usage.unwrap().total_tokens, 62);
        // The first call's signature is kept as Google's OpenAI layer keeps it, and goes back to
        // Gemini with the call (not the dummy signature for history it did not make).
        assert_eq!(
            calls[0].extra.get("extra_content"),
            Some(&json!({"google": {"thought_signature": "CiQB0e2Kb1"}}))
        );
        assert!(calls[1].extra.get("extra_content").is_none());
        let mut next: ChatRequest = serde_json::from_value(json!({
            "model": "gemini-2.5-pro",
            "messages": [{"role": "user", "content": "Weather and time?"}]
        }))
        .unwrap();
        let mut turn = crate::openai::Message::text(Role::Assistant, String::new());
        turn.content = None;
        turn.tool_calls = Some(calls.clone());
        next.messages.push(turn);
        let body = serde_json::to_value(request_from_openai(&next).unwrap()).unwrap();
        let parts = &body["contents"][1]["parts"];
        assert_eq!(parts[0]["thoughtSignature"], "CiQB0e2Kb1", "{body:#}");
        assert!(parts[1].get("thoughtSignature").is_none(), "{body:#}");
    }

    #[test]
    fn finish_reasons_map() {
        assert_eq!(finish_reason_to_openai(Some("STOP"), false), "stop");
        assert_eq!(finish_reason_to_openai(Some("STOP"), true), "tool_calls");
        assert_eq!(finish_reason_to_openai(Some("MAX_TOKENS"), true), "length");
        for r in [
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
        ] {
            assert_eq!(finish_reason_to_openai(Some(r), false), "content_filter");
        }
        assert_eq!(
            finish_reason_to_openai(Some("MALFORMED_FUNCTION_CALL"), false),
            "stop"
        );
        assert_eq!(finish_reason_to_openai(Some("OTHER"), false), "stop");
    }

    /// A candidate that ended on a failure reason with nothing produced is an error, whole or
    /// streamed (it was an empty success, not retried); one that produced text keeps it.
    #[test]
    fn a_failed_generation_is_an_error() {
        let failed = serde_json::json!({"candidates": [{"content": {"role": "model", "parts": []},
            "finishReason": "MALFORMED_FUNCTION_CALL", "finishMessage": "bad call"}]});
        let e = response_to_openai(gemini(failed.clone()), "m").expect_err("an error");
        assert!(e.0.contains("MALFORMED_FUNCTION_CALL: bad call"), "{}", e.0);
        let mut dec = StreamDecoder::new("m");
        assert!(dec.on_response(gemini(failed)).is_err());
        let said = serde_json::json!({"candidates": [{"content": {"role": "model",
            "parts": [{"text": "Partly"}]}, "finishReason": "OTHER"}]});
        let ok = response_to_openai(gemini(said.clone()), "m").unwrap();
        assert_eq!(ok.choices[0].message.content.as_deref(), Some("Partly"));
        let mut dec = StreamDecoder::new("m");
        assert!(dec.on_response(gemini(said)).is_ok());
    }

    #[test]
    fn multiple_candidates_and_empty_content() {
        let resp = gemini(json!({
            "candidates": [
                {"content": {"role": "model", "parts": [{"text": "A"}]}, "finishReason": "STOP"},
                {"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 1}
            ]
        }));
        let done = response_to_openai(resp, "gemini-2.5-flash").unwrap();
        assert_eq!(done.model, "gemini-2.5-flash");
        assert_eq!(done.usage, None);
        assert_eq!(done.choices.len(), 2);
        assert_eq!(done.choices[0].index, 0);
        assert_eq!(done.choices[0].message.content.as_deref(), Some("A"));
        assert_eq!(done.choices[1].index, 1);
        assert_eq!(done.choices[1].message.content.as_deref(), Some(""));
        assert_eq!(done.choices[1].finish_reason.as_deref(), Some("length"));
    }

    /// A 200 answer with neither candidates nor a block reason is a broken upstream (it was
    /// taken for an empty reply, and charged).
    #[test]
    fn an_answer_with_nothing_in_it_is_an_error() {
        for body in [
            json!({}),
            json!({"candidates": [], "modelVersion": "gemini-2.5-flash"}),
        ] {
            let e = response_to_openai(gemini(body), "gemini-2.5-flash").unwrap_err();
            assert!(e.0.contains("no candidates"), "{e}");
        }
    }

    #[test]
    fn blocked_prompt_becomes_content_filter() {
        let body = json!({
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
            },
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "blk-1"
        });
        let done = response_to_openai(gemini(body.clone()), "gemini-2.5-flash").unwrap();
        assert_eq!(done.id, "blk-1");
        assert_eq!(done.choices.len(), 1);
        assert_eq!(done.choices[0].message.content.as_deref(), Some(""));
        assert_eq!(
            done.choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
        assert_eq!(done.usage.as_ref().unwrap().prompt_tokens, 9);
        assert_eq!(done.usage.as_ref().unwrap().completion_tokens, 0);

        let mut dec = StreamDecoder::new("gemini-2.5-flash");
        let mut acc = ChunkAccumulator::default();
        for c in dec.on_response(gemini(body)).unwrap() {
            acc.push(&c);
        }
        for c in dec.finish() {
            acc.push(&c);
        }
        assert_eq!(acc.finish_reason(), Some("content_filter"));
        let folded = acc.finish();
        assert_eq!(folded.id, "blk-1");
        assert_eq!(folded.choices[0].message.content.as_deref(), Some(""));
        assert_eq!(folded.usage.unwrap().prompt_tokens, 9);
    }

    #[test]
    fn error_bodies_parse_and_fail_translation() {
        let body = json!({"error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED"
        }});
        let e: GeminiError = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(e.error.code, 429);
        assert_eq!(e.error.status.as_deref(), Some("RESOURCE_EXHAUSTED"));
        assert_eq!(
            e.to_string(),
            "429 RESOURCE_EXHAUSTED: Resource has been exhausted (e.g. check quota)."
        );

        let err = response_to_openai(gemini(body.clone()), "m").unwrap_err();
        assert!(err.0.contains("RESOURCE_EXHAUSTED"), "{err}");
        let err = StreamDecoder::new("m")
            .on_response(gemini(body))
            .unwrap_err();
        assert!(err.0.contains("quota"), "{err}");
    }

    #[test]
    fn three_event_stream_folds_to_text_finish_and_usage() {
        let events = [
            json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "The capital"}]}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 2, "totalTokenCount": 12},
                "modelVersion": "gemini-2.5-flash",
                "responseId": "sse-resp-1"
            }),
            json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": " of France is"}]}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
                "modelVersion": "gemini-2.5-flash",
                "responseId": "sse-resp-1"
            }),
            json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": " Paris."}]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 7, "totalTokenCount": 29, "thoughtsTokenCount": 12},
                "modelVersion": "gemini-2.5-flash",
                "responseId": "sse-resp-1"
            }),
        ];
        let mut dec = StreamDecoder::new("gemini-flash-latest");
        let mut chunks = Vec::new();
        for e in events {
            chunks.extend(dec.on_response(gemini(e)).unwrap());
        }
        chunks.extend(dec.finish());
        assert!(dec.finish().is_empty(), "finish is idempotent");

        // role+text, text, text, finish, usage
        assert_eq!(chunks.len(), 5);
        assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
        assert_eq!(
            chunks[0].choices[0].delta.content.as_deref(),
            Some("The capital")
        );
        assert_eq!(chunks[1].choices[0].delta.role, None);
        assert_eq!(chunks[3].choices[0].finish_reason.as_deref(), Some("stop"));
        assert!(chunks[4].choices.is_empty());
        for c in &chunks {
            assert_eq!(c.id, "sse-resp-1");
            assert_eq!(c.created, chunks[0].created);
            assert_eq!(c.model, "gemini-2.5-flash");
            assert_eq!(c.object, "chat.completion.chunk");
        }
        assert!(chunks[..4].iter().all(|c| c.usage.is_none()));

        let mut acc = ChunkAccumulator::default();
        for c in &chunks {
            acc.push(c);
        }
        assert_eq!(acc.finish_reason(), Some("stop"));
        let done = acc.finish();
        assert_eq!(done.id, "sse-resp-1");
        assert_eq!(
            done.choices[0].message.content.as_deref(),
            Some("The capital of France is Paris.")
        );
        let u = done.usage.unwrap();
        assert_eq!(u.prompt_tokens, 10);
        assert_eq!(u.completion_tokens, 19);
        assert_eq!(u.total_tokens, 29);
    }

    #[test]
    fn streamed_function_calls_are_whole_deltas_with_tool_calls_finish() {
        let events = [
            json!({
                "candidates": [{"content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Berlin"}}, "thoughtSignature": "Cs0BAdHtim8="}
                ]}, "index": 0}],
                "modelVersion": "gemini-2.5-pro"
            }),
            json!({
                "candidates": [{"content": {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-2"}}
                ]}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 55, "candidatesTokenCount": 20, "totalTokenCount": 75}
            }),
        ];
        let mut dec = StreamDecoder::new("gemini-2.5-pro");
        let mut acc = ChunkAccumulator::default();
        let mut all = Vec::new();
        for e in events {
            all.extend(dec.on_response(gemini(e)).unwrap());
        }
        all.extend(dec.finish());
        let first_id = all[0].id.clone();
        assert!(first_id.starts_with("chatcmpl-"), "{first_id}");
        assert!(all.iter().all(|c| c.id == first_id));
        let second = &all[1].choices[0].delta.tool_calls.as_ref().unwrap()[0];
        assert_eq!(second.index, 1);
        assert_eq!(second.id.as_deref(), Some("fc-2"));
        assert_eq!(second.kind.as_deref(), Some("function"));
        for c in &all {
            acc.push(c);
        }
        assert_eq!(acc.finish_reason(), Some("tool_calls"));
        let done = acc.finish();
        let calls = done.choices[0].message.tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[0].id.starts_with("call_"));
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Berlin"}"#);
        assert_eq!(calls[1].function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(done.choices[0].message.content, None);
        assert_eq!(done.usage.unwrap().total_tokens, 75);
    }

    #[test]
    fn finish_without_usage_emits_nothing() {
        let mut dec = StreamDecoder::new("m");
        let chunks = dec
            .on_response(gemini(json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}, "finishReason": "STOP"}]
            })))
            .unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].model, "m");
        assert!(dec.finish().is_empty());
    }

    /// Tokens that tools put before the model count as prompt (they were dropped: 3,000 tokens
    /// of a code execution's results out of the tokens and the cost).
    #[test]
    fn tool_use_prompt_tokens_count_as_prompt() {
        let u: UsageMetadata = serde_json::from_value(json!({
            "promptTokenCount": 1000,
            "candidatesTokenCount": 200,
            "toolUsePromptTokenCount": 3000,
            "totalTokenCount": 4200
        }))
        .unwrap();
        let o = u.to_openai();
        assert_eq!((o.prompt_tokens, o.completion_tokens), (4000, 200));
        assert_eq!(o.total_tokens, 4200);
    }

    #[test]
    fn response_round_trips_unknown_fields() {
        let body = json!({
            "candidates": [{
                "content": {"role": "model", "parts": [{"text": "x", "videoMetadata": {"fps": 1}}]},
                "finishReason": "STOP",
                "citationMetadata": {"citationSources": []},
                "avgLogprobs": -0.1
            }],
            "usageMetadata": {"promptTokenCount": 1, "toolUsePromptTokenCount": 3},
            "createTime": "2025-01-01T00:00:00Z"
        });
        let r = gemini(body.clone());
        assert_eq!(serde_json::to_value(&r).unwrap(), body);
    }
}
