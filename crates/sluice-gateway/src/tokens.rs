//! Token counting with the model's tokenizer, for upstreams that do not report usage.
//!
//! OpenAI models use their tiktoken encoding (`o200k_base` for the GPT-4o/4.1/5 and o-series
//! families, `cl100k_base` for GPT-4 and GPT-3.5). Other models are counted with `o200k_base` as
//! an estimate; records say `usage_source = "tokenizer"` whenever Sluice counted.

use sluice_types::openai::{ChatRequest, Content};
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// The BPE for a model name (dated snapshots and `ft:` names included).
pub fn bpe_for(model: &str) -> &'static CoreBPE {
    let bare = model.rsplit('/').next().unwrap_or(model);
    let tok = match get_tokenizer(bare) {
        Some(t @ (Tokenizer::Cl100kBase | Tokenizer::O200kBase)) => t,
        _ => Tokenizer::O200kBase,
    };
    match tok {
        Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        _ => tiktoken_rs::o200k_base_singleton(),
    }
}

/// Loads the encodings in the background so that the first count does not pay for it. The
/// gateway does not call it: the encodings take tens of megabytes and most upstreams report
/// usage, so they load on first use.
pub fn preload() {
    std::thread::spawn(|| {
        let _ = tiktoken_rs::o200k_base_singleton();
        let _ = tiktoken_rs::cl100k_base_singleton();
    });
}

/// Tokens in a text.
pub fn count_text(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    bpe_for(model).encode_ordinary(text).len() as u64
}

/// Above this much prompt text (messages, tool calls and tool definitions), estimates made on
/// the request path count four bytes a token instead of running the tokenizer.
pub const TOKENIZE_MAX_BYTES: usize = 64 * 1024;

/// The tokens an image counts for in estimates (OpenAI's price of a high-detail 1024×1024
/// image).
pub const IMAGE_TOKENS: usize = 765;

/// What a content part that is not text counts for, as bytes of text (four to a token): an image
/// its [`IMAGE_TOKENS`]; a document or audio given inline its decoded size (three quarters of
/// its base64); one given by reference an image's worth.
pub fn media_bytes(part: &sluice_types::openai::ContentPart) -> usize {
    fn strings(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.len(),
            serde_json::Value::Array(a) => a.iter().map(strings).sum(),
            serde_json::Value::Object(o) => o.values().map(strings).sum(),
            _ => 0,
        }
    }
    if part.image_url.is_some() {
        return IMAGE_TOKENS * 4;
    }
    let inline = part.extra.values().map(strings).sum::<usize>() * 3 / 4;
    inline.max(IMAGE_TOKENS * 4)
}

/// The bytes the media parts (images, documents, audio) of a prompt count for.
fn prompt_media_bytes(req: &ChatRequest) -> usize {
    req.messages
        .iter()
        .filter_map(|m| match &m.content {
            Some(Content::Parts(parts)) => Some(parts),
            _ => None,
        })
        .flatten()
        .filter(|p| p.text.is_none())
        .map(media_bytes)
        .sum()
}

/// A prompt's tokens estimated from its size alone (four bytes a token), without the tokenizer:
/// messages, tool calls, tool definitions and media.
pub fn estimate_prompt_by_size(req: &ChatRequest) -> u64 {
    (prompt_bytes(req, usize::MAX).saturating_add(prompt_media_bytes(req)) as u64).div_ceil(4)
}

/// Whether counting a chat's tokens (its prompt, and `output` bytes of answer) with the
/// tokenizer is long work: more than [`TOKENIZE_MAX_BYTES`] of text, to be done by
/// [`off_thread`].
pub fn counting_is_long(req: &ChatRequest, output: usize) -> bool {
    output > TOKENIZE_MAX_BYTES
        || prompt_bytes(req, TOKENIZE_MAX_BYTES - output).saturating_add(output)
            > TOKENIZE_MAX_BYTES
}

/// Runs a long count on the blocking pool. A connection thread serves all of its connections
/// (see `sluice_core::shard`): a count of megabytes of text run on it would hold up every other
/// request there meanwhile.
pub async fn off_thread<T: Default + Send + 'static>(
    count: impl FnOnce() -> T + Send + 'static,
) -> T {
    match tokio::task::spawn_blocking(count).await {
        Ok(n) => n,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled: only when the runtime itself shuts down.
            Err(_) => T::default(),
        },
    }
}

/// The bytes of a prompt the tokenizer would read, stopping once past `limit`.
fn prompt_bytes(req: &ChatRequest, limit: usize) -> usize {
    let mut n = 0;
    for m in &req.messages {
        n += m.text_len() + m.name.as_ref().map_or(0, String::len);
        for tc in m.tool_calls.iter().flatten() {
            n += tc.function.name.len() + tc.function.arguments.len();
        }
        if n > limit {
            return n;
        }
    }
    if let Some(tools) = &req.tools {
        n += json_len(tools);
    }
    n + other_prompt_fields(req).map(json_len).sum::<usize>()
}

/// The fields besides messages and tools that an upstream reads as prompt: a structured-output
/// schema (`response_format`) and the legacy `functions` list (passed on as it is).
fn other_prompt_fields(req: &ChatRequest) -> impl Iterator<Item = &serde_json::Value> {
    req.response_format.iter().chain(req.extra.get("functions"))
}

/// The length of a value's JSON, counted without building it.
pub(crate) fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => 0,
    }
}

/// A prompt's tokens for an estimate made before or while a request runs: counted with the
/// model's tokenizer, or four bytes a token when the prompt is longer than
/// [`TOKENIZE_MAX_BYTES`] (so a huge prompt costs no tokenizer time on the request path); media
/// parts count as [`media_bytes`].
pub fn estimate_prompt(model: &str, req: &ChatRequest) -> u64 {
    if prompt_bytes(req, TOKENIZE_MAX_BYTES) > TOKENIZE_MAX_BYTES {
        // All of it: the count above stops once past the limit.
        estimate_prompt_by_size(req)
    } else {
        count_prompt_and_media(model, req)
    }
}

/// A prompt's tokens when the upstream reported none: [`count_prompt`] for its text, plus its
/// media parts as [`media_bytes`] counts them (what `count_tokens` answers, too).
pub fn count_prompt_and_media(model: &str, req: &ChatRequest) -> u64 {
    count_prompt(model, req).saturating_add((prompt_media_bytes(req) as u64).div_ceil(4))
}

/// Prompt tokens of a chat request, with OpenAI's chat framing: 3 tokens per message, 1 more per
/// `name`, and 3 to prime the reply. Tool definitions and tool calls are counted as their JSON.
pub fn count_prompt(model: &str, req: &ChatRequest) -> u64 {
    let bpe = bpe_for(model);
    let mut n: u64 = 3;
    for m in &req.messages {
        n += 3;
        n += bpe.encode_ordinary(m.role.as_str()).len() as u64;
        match &m.content {
            Some(Content::Text(t)) => n += bpe.encode_ordinary(t).len() as u64,
            Some(Content::Parts(parts)) => {
                for p in parts {
                    if let Some(t) = &p.text {
                        n += bpe.encode_ordinary(t).len() as u64;
                    }
                }
            }
            None => {}
        }
        if let Some(name) = &m.name {
            n += 1 + bpe.encode_ordinary(name).len() as u64;
        }
        for tc in m.tool_calls.iter().flatten() {
            n += 1 + bpe.encode_ordinary(&tc.function.name).len() as u64;
            n += bpe.encode_ordinary(&tc.function.arguments).len() as u64;
        }
    }
    if let Some(tools) = &req.tools
        && let Ok(json) = serde_json::to_string(tools)
    {
        n += bpe.encode_ordinary(&json).len() as u64;
    }
    for v in other_prompt_fields(req) {
        n += bpe.encode_ordinary(&v.to_string()).len() as u64;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_published_encodings() {
        // "hello world" is 2 tokens in both cl100k_base and o200k_base.
        assert_eq!(count_text("gpt-4o-mini", "hello world"), 2);
        assert_eq!(count_text("gpt-4", "hello world"), 2);
        // cl100k_base and o200k_base differ on longer text.
        let text = "Sluice counts tokens the way the upstream would have counted them.";
        assert!(count_text("gpt-4o", text) > 5);
    }

    #[test]
    fn prompt_framing_adds_per_message_overhead() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hello world"}]
        }))
        .unwrap();
        // 3 (priming) + 3 (message) + 1 ("user") + 2 ("hello world")
        assert_eq!(count_prompt("gpt-4o", &req), 9);
    }

    #[test]
    fn a_huge_prompt_is_estimated_by_its_bytes() {
        let small: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]
        }))
        .unwrap();
        assert_eq!(
            estimate_prompt("gpt-4o", &small),
            count_prompt("gpt-4o", &small)
        );
        // A short message with megabytes of tool arguments is huge too.
        let args = format!("{{\"blob\":\"{}\"}}", "ab ".repeat(400_000));
        let huge: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": args}}]}
            ]
        }))
        .unwrap();
        let bytes = 2 + 1 + args.len();
        assert_eq!(estimate_prompt("gpt-4o", &huge), (bytes as u64).div_ceil(4));

        // Long history in many messages, each under the limit: all of it counts (the count
        // stopped at the limit, so 200 KB read as about 17k tokens).
        let turn = "word ".repeat(2_000);
        let messages: Vec<serde_json::Value> = (0..20)
            .map(|_| serde_json::json!({"role": "user", "content": turn}))
            .collect();
        let long: ChatRequest =
            serde_json::from_value(serde_json::json!({"model": "gpt-4o", "messages": messages}))
                .unwrap();
        assert_eq!(
            estimate_prompt("gpt-4o", &long),
            (20 * turn.len() as u64).div_ceil(4)
        );
    }

    #[test]
    fn media_parts_count_in_estimates() {
        let req: ChatRequest = serde_json::from_value(serde_json::json!({
            "model": "gpt-4o", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}}
            ]}]
        }))
        .unwrap();
        let text_only = count_prompt("gpt-4o", &req);
        assert_eq!(
            estimate_prompt("gpt-4o", &req),
            text_only + 2 * IMAGE_TOKENS as u64
        );
        assert!(estimate_prompt_by_size(&req) >= 2 * IMAGE_TOKENS as u64);
    }

    /// Counting is long work past 64 KiB of prompt and answer together, and such a count runs
    /// off the calling thread with the same result.
    #[tokio::test]
    async fn long_counts_run_off_the_calling_thread() {
        let req = |text: &str| -> ChatRequest {
            serde_json::from_value(serde_json::json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": text}]
            }))
            .unwrap()
        };
        let small = req("hello world");
        assert!(!counting_is_long(&small, 10));
        assert!(counting_is_long(&small, TOKENIZE_MAX_BYTES + 1));
        let big = req(&"word ".repeat(TOKENIZE_MAX_BYTES / 4));
        assert!(counting_is_long(&big, 0));
        let half = req(&"x".repeat(TOKENIZE_MAX_BYTES / 2));
        assert!(!counting_is_long(&half, 100));
        assert!(counting_is_long(&half, TOKENIZE_MAX_BYTES / 2 + 100));
        let caller = std::thread::current().id();
        let expected = count_prompt_and_media("gpt-4o", &big);
        let (n, thread) = off_thread(move || {
            (
                count_prompt_and_media("gpt-4o", &big),
                Some(std::thread::current().id()),
            )
        })
        .await;
        assert_eq!(n, expected);
        assert_ne!(thread, Some(caller));
    }
}
