//! Reading and parsing request bodies with errors a client can act on: 413 over the size limit,
//! 400 `invalid_json` for malformed JSON (with line and column), 400 `invalid_request` naming the
//! parameter for a wrong type or a missing field.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use sluice_core::error::{Error, ErrorCode};

/// How long a request body may send nothing before the request is refused (408).
pub const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The most JSON values (numbers, strings, arrays, objects...) a request body may hold. Parsed,
/// a value takes tens of bytes however short its text (`0,` is two): a body of 30 MiB of small
/// numbers took gigabytes. A million is far more than any real request holds (OpenAI's
/// embeddings take 300,000 tokens at most); long texts and images are one value each.
pub const MAX_JSON_VALUES: usize = 1_000_000;

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
    read_idle(headers, body, limit, BODY_IDLE).await
}

/// [`read`], refusing a body that sends nothing for `idle`.
async fn read_idle(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    idle: std::time::Duration,
) -> Result<bytes::Bytes, Error> {
    let too_large = || {
        Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request body is larger than the server's limit of {limit} bytes (server.max_body_bytes)"
            ),
        )
    };
    if let Some(encoding) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
    {
        let mut stream = body.into_data_stream();
        drain(&mut stream).await;
        return Err(Error::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "request bodies encoded as `{encoding}` are not accepted; send the JSON uncompressed"
            ),
        ));
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit as u64) {
        discard(headers, body).await;
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    loop {
        // A client that stops sending its body does not hold the request (and its connection)
        // for ever.
        let Ok(next) = tokio::time::timeout(idle, stream.next()).await else {
            return Err(Error::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body stopped arriving: nothing for {} s",
                    idle.as_secs_f64()
                ),
            ));
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| {
            if client_left(&e) {
                Error::new(
                    ErrorCode::ClientClosed,
                    "the client closed the connection before sending the whole request body",
                )
            } else {
                Error::invalid(format!("could not read the request body: {e}"))
            }
        })?;
        if buf.len() + frame.len() > limit {
            drain(&mut stream).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&frame);
    }
    Ok(buf.freeze())
}

/// Whether a body failed because its connection ended before the body did (the client went
/// away), rather than because of what it sent.
fn client_left(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        source = err.source();
    }
    false
}

/// Discards the body of a request refused before it was read (a wrong key, an unknown route, a
/// body too large), so that a client still uploading gets the error rather than a reset
/// connection. A client that waits for `100 Continue` has sent nothing: it gets the error at once.
pub async fn discard(headers: &HeaderMap, body: Body) {
    let waits = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if !waits {
        drain(&mut body.into_data_stream()).await;
    }
}

/// Reads (and discards) a bounded amount of a body that is refused, so that the client is still
/// sending when the error arrives instead of meeting a closed connection (the SDKs would report a
/// connection error and upload it again).
async fn drain(stream: &mut axum::body::BodyDataStream) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut discarded = 0usize;
    while discarded < 64 * 1024 * 1024 {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(f))) => discarded += f.len(),
            _ => break,
        }
    }
}

/// About how many values a JSON text holds: one more than its commas and openings outside
/// strings (`,`, `[`, `{`), which is at least the number of values besides object keys. One
/// pass, no allocation.
fn json_values(bytes: &[u8]) -> usize {
    let mut n = 1usize;
    let mut at = 0;
    while at < bytes.len() {
        // Outside strings: count, up to the next string.
        let next = memchr::memchr(b'"', &bytes[at..]).map_or(bytes.len(), |i| at + i);
        n += bytes[at..next]
            .iter()
            .filter(|&&b| matches!(b, b',' | b'[' | b'{'))
            .count();
        // Inside: skip to its end (a long text or base64 image at memchr's speed).
        at = next + 1;
        while at < bytes.len() {
            match memchr::memchr2(b'"', b'\\', &bytes[at..]) {
                Some(i) if bytes[at + i] == b'\\' => at += i + 2,
                Some(i) => {
                    at += i + 1;
                    break;
                }
                None => at = bytes.len(),
            }
        }
    }
    n
}

/// Parses JSON into `T`, naming the offending parameter on type errors.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::new(
            ErrorCode::InvalidJson,
            "request body is empty; send a JSON object",
        ));
    }
    let values = json_values(bytes);
    if values > MAX_JSON_VALUES {
        return Err(Error::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request body holds {values} JSON values, more than the {MAX_JSON_VALUES} accepted"
            ),
        ));
    }
    // Every body the API takes is an object (a struct would also take an array, field by
    // field).
    let kind = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Some("array"),
        Some(b'"') => Some("string"),
        Some(b't' | b'f') => Some("boolean"),
        Some(b'n') => Some("null"),
        Some(b'-' | b'0'..=b'9') => Some("number"),
        _ => None,
    };
    if let Some(kind) = kind {
        return Err(Error::invalid(format!(
            "invalid request body: invalid type: {kind}, expected a JSON object"
        )));
    }
    // The plain parse is the hot path; only a body that fails is parsed again with its path
    // tracked, to name the offending parameter.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        // The plain parse failed on what follows the value (`{…} trailing`, two objects).
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(inner) => Err(not_json(&inner)),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let at = (path != "." && !path.is_empty()).then_some(path);
                    let detail = plain_words(&strip_position(&inner));
                    // A missing field is named by the message, not the path (which stops at
                    // the object that lacks it).
                    if let Some(field) = missing_field(&detail) {
                        let param = match &at {
                            Some(p) => format!("{p}.{field}"),
                            None => field.to_string(),
                        };
                        let mut err =
                            Error::invalid(format!("missing required parameter `{param}`"));
                        err.param = Some(param);
                        return Err(err);
                    }
                    let msg = match &at {
                        Some(p) => format!("invalid value for `{p}`: {detail}"),
                        None => format!("invalid request body: {detail}"),
                    };
                    let mut err = Error::invalid(msg);
                    err.param = at;
                    Err(err)
                }
                _ => Err(not_json(&inner)),
            }
        }
    }
}

/// The error for a body that is not JSON, with where it stops being JSON.
fn not_json(inner: &serde_json::Error) -> Error {
    Error::new(
        ErrorCode::InvalidJson,
        format!(
            "request body is not valid JSON: {} (line {}, column {})",
            strip_position(inner),
            inner.line(),
            inner.column()
        ),
    )
}

/// The field a "missing field `x`" message names.
fn missing_field(detail: &str) -> Option<&str> {
    detail
        .strip_prefix("missing field `")?
        .strip_suffix('`')
        .filter(|f| !f.is_empty())
}

/// serde's wording with Rust's own names put in JSON's terms: what it expected (`struct
/// ChatRequest` is a JSON object, `u32` a whole number from 0 to 4294967295, …) and the kind of
/// value it found (`sequence` is an array, `map` an object). A value the client sent, quoted in
/// the message, is left as it is.
fn plain_words(detail: &str) -> String {
    let (head, tail) = match detail.rfind("expected ") {
        Some(i) => detail.split_at(i),
        None => (detail, ""),
    };
    let mut head = head.to_string();
    for (rust, json) in [
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: object"),
    ] {
        if let Some(rest) = head.strip_prefix(rust) {
            head = format!("{json}{rest}");
        }
    }
    let mut tail = tail.to_string();
    if let Some(rest) = tail.strip_prefix("expected struct ") {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        tail = format!("expected a JSON object{}", &rest[end..]);
    }
    for (rust, json) in [
        ("u8", "a whole number from 0 to 255"),
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number from 0 to 18446744073709551615"),
        ("i32", "a whole number from -2147483648 to 2147483647"),
        ("i64", "a whole number"),
        ("f32", "a number"),
        ("f64", "a number"),
        ("usize", "a whole number"),
        ("a sequence", "an array"),
        ("a map", "an object"),
    ] {
        tail = replace_word(&tail, rust, json);
    }
    head + &tail
}

/// Replaces `word` where it stands alone (not inside another word).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        let alone = !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..i]);
        out.push_str(if alone { with } else { word });
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// serde_json's message without its " at line L column C" suffix.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The `model` field of a body that did not parse, if it can be found, for the record.
pub fn sniff_model(bytes: &[u8]) -> Option<String> {
    // Only `model` is kept: the rest is skipped as it is read, nothing allocated for it.
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(bytes).ok()?.model
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_types::openai::ChatRequest;

    /// A body of many small values is refused before it is parsed (30 MiB of `0,` took
    /// gigabytes); long strings are one value each.
    #[test]
    fn a_body_of_too_many_values_is_refused() {
        assert_eq!(json_values(br#"{"a":[0,1,2],"b":"x,[{"}"#), 6);
        assert_eq!(json_values(br#""\",[""#), 1);
        let many = format!(r#"{{"model":"m","x":[{}0]}}"#, "0,".repeat(MAX_JSON_VALUES));
        let e = parse::<serde_json::Value>(many.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge, "{e}");
        assert!(e.message.contains("JSON values"), "{e}");
        let long = format!(r#"{{"model":"m","text":"{}"}}"#, "a,[{".repeat(1_000_000));
        assert!(parse::<serde_json::Value>(long.as_bytes()).is_ok());
    }

    /// A body that stops arriving is refused with 408, not waited for.
    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let body = Body::from_stream(futures::stream::pending::<
            Result<bytes::Bytes, std::io::Error>,
        >());
        let e = read_idle(
            &HeaderMap::new(),
            body,
            1024,
            std::time::Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::RequestTimeout, "{e}");
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let e = parse::<ChatRequest>(b"{\"model\": ").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    #[test]
    fn wrong_types_name_the_parameter() {
        let e = parse::<ChatRequest>(br#"{"model": "m", "messages": [], "temperature": "hot"}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse::<ChatRequest>(
            br#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse::<ChatRequest>(br#"{"messages": []}"#).unwrap_err();
        assert_eq!(e.message, "missing required parameter `model`");
        assert_eq!(e.param.as_deref(), Some("model"));
        let e =
            parse::<ChatRequest>(br#"{"model": "m", "messages": [{"content": "x"}]}"#).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].role"),
            "{}",
            e.message
        );
    }

    /// Messages speak JSON, not Rust: no struct names or integer types.
    /// What follows the object is not ignored (`{…} trailing`, two objects: accepted, the
    /// first one used); a body that is not an object is refused for every type (an array was
    /// read field by field into a struct).
    #[test]
    fn only_one_object_is_a_body() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Spec {
            name: String,
            rpm: Option<u32>,
        }
        for body in [
            &br#"{"name": "x"} trailing"#[..],
            br#"{"name": "x"}{"name": "y"}"#,
            br#"{"name": "t3"}]]]}}}"#,
        ] {
            let e = parse::<Spec>(body).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidJson, "{}", e.message);
            assert!(e.message.contains("trailing"), "{}", e.message);
        }
        for (body, kind) in [
            (&br#"["x", 7]"#[..], "array"),
            (b" \"x\"", "string"),
            (b"7", "number"),
            (b"null", "null"),
        ] {
            let e = parse::<Spec>(body).unwrap_err();
            assert_eq!(
                e.message,
                format!("invalid request body: invalid type: {kind}, expected a JSON object")
            );
        }
        assert!(parse::<Spec>(b" {\"name\": \"x\"}\n").is_ok());
    }

    #[test]
    fn type_errors_speak_json() {
        let e = parse::<ChatRequest>(b"[]").unwrap_err();
        assert_eq!(
            e.message,
            "invalid request body: invalid type: sequence, expected a JSON object"
                .replace("sequence", "array")
        );
        let e =
            parse::<ChatRequest>(br#"{"model": "m", "messages": [], "max_tokens": 1000000000000}"#)
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(
            e.message.contains("a whole number from 0 to 4294967295") && !e.message.contains("u32"),
            "{}",
            e.message
        );
        assert_eq!(
            replace_word("u32 or u320 or (u32)", "u32", "N"),
            "N or u320 or (N)"
        );
        // The client's own words, quoted before what was expected, stay as they are.
        assert_eq!(
            plain_words("unknown variant `data struct u32`, expected one of `a`, `b`"),
            "unknown variant `data struct u32`, expected one of `a`, `b`"
        );
    }
}
