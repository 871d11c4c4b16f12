//! Small wire-format helpers: SSE events, words, query strings.

use std::time::Duration;

use serde_json::Value;

/// One piece of a streamed body, sent after `delay`.
pub(crate) struct Ev {
    pub(crate) delay: Duration,
    pub(crate) text: String,
}

impl Ev {
    pub(crate) fn now(text: impl Into<String>) -> Self {
        Self::after(Duration::ZERO, text)
    }

    pub(crate) fn after(delay: Duration, text: impl Into<String>) -> Self {
        Self {
            delay,
            text: text.into(),
        }
    }
}

/// The separator between events of a recorded SSE body, and the line ending.
fn separators(raw: &str) -> (&'static str, &'static str) {
    if raw.contains("\r\n\r\n") {
        ("\r\n\r\n", "\r\n")
    } else {
        ("\n\n", "\n")
    }
}

/// Splits a recorded SSE body into its events, each with its terminator.
pub(crate) fn split_events(raw: &str) -> Vec<String> {
    let (sep, _) = separators(raw);
    let mut out = Vec::new();
    let mut rest = raw;
    while let Some(i) = rest.find(sep) {
        let end = i + sep.len();
        out.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    if !rest.trim().is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// The recorded SSE body as events sent without delay.
pub(crate) fn verbatim(raw: &str) -> Vec<Ev> {
    split_events(raw).into_iter().map(Ev::now).collect()
}

/// Rewrites the JSON `data:` of each event of a recorded SSE body; `f` returns
/// `false` to drop the event. Events whose data is not JSON (`[DONE]`) are kept.
pub(crate) fn map_json_events(raw: &str, mut f: impl FnMut(&mut Value) -> bool) -> Vec<Ev> {
    let (_, nl) = separators(raw);
    let mut out = Vec::new();
    for block in split_events(raw) {
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim_start().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        match serde_json::from_str::<Value>(&data) {
            Ok(mut value) => {
                if f(&mut value) {
                    let mut text = String::new();
                    if let Some(event) = event {
                        text.push_str(&format!("event: {event}{nl}"));
                    }
                    text.push_str(&format!("data: {value}{nl}{nl}"));
                    out.push(Ev::now(text));
                }
            }
            Err(_) => out.push(Ev::now(block)),
        }
    }
    out
}

/// `event: NAME\ndata: JSON\n\n` (Anthropic style).
pub(crate) fn named_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Parses a JSON fixture, applies `f`, and serialises it again.
pub(crate) fn edit_json(raw: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut value: Value = serde_json::from_str(raw).expect("fixture is valid JSON");
    f(&mut value);
    value.to_string()
}

/// Removes `key` from `value` when it is an object.
pub(crate) fn remove_key(value: &mut Value, key: &str) {
    if let Some(map) = value.as_object_mut() {
        map.remove(key);
    }
}

/// Number of whitespace-separated words.
pub(crate) fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Splits `s` into words, each keeping the whitespace that follows it (leading
/// whitespace stays with the first word), so the pieces concatenate to `s`.
pub(crate) fn split_keep_space(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_ws = false;
    for c in s.chars() {
        if !c.is_whitespace() && prev_ws && cur.chars().any(|c| !c.is_whitespace()) {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
        prev_ws = c.is_whitespace();
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The raw value of query parameter `name` in `query`.
pub(crate) fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Text of a content value that is either a string or a list of parts with
/// `text` fields; parts are joined with a space.
pub(crate) fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "text" || t == "input_text")
            })
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_spaces() {
        assert_eq!(
            split_keep_space("hello  big\nworld "),
            ["hello  ", "big\n", "world "]
        );
        assert_eq!(split_keep_space(" a b"), [" a ", "b"]);
        assert!(split_keep_space("").is_empty());
    }

    #[test]
    fn splits_crlf_events() {
        let evs = split_events("data: 1\r\n\r\ndata: 2\r\n\r\n");
        assert_eq!(evs, ["data: 1\r\n\r\n", "data: 2\r\n\r\n"]);
    }

    #[test]
    fn query() {
        assert_eq!(query_param(Some("alt=sse&key=k"), "key"), Some("k"));
        assert_eq!(query_param(Some("alt=sse"), "key"), None);
        assert_eq!(query_param(None, "key"), None);
    }
}
