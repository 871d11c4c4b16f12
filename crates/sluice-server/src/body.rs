//! Reading and parsing request bodies with errors a client can act on: 413 over the size limit,
//! 400 `invalid_json` for malformed JSON (with line and column), 400 `invalid_request` naming the
//! parameter for a wrong type or a missing field.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use sluice_core::error::{Error, ErrorCode};

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read(headers: &HeaderMap, body: Body, limit: usize) -> Result<bytes::Bytes, Error> {
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
    while let Some(frame) = stream.next().await {
        let frame =
            frame.map_err(|e| Error::invalid(format!("could not read the request body: {e}")))?;
        if buf.len() + frame.len() > limit {
            drain(&mut stream).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&frame);
    }
    Ok(buf.freeze())
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

/// Parses JSON into `T`, naming the offending parameter on type errors.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::new(
            ErrorCode::InvalidJson,
            "request body is empty; send a JSON object",
        ));
    }
    // The plain parse is the hot path; only a body that fails is parsed again with its path
    // tracked, to name the offending parameter.
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok(v);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let param = if path == "." || path.is_empty() {
                        None
                    } else {
                        Some(path)
                    };
                    let msg = match &param {
                        Some(p) => format!("invalid value for `{p}`: {}", strip_position(&inner)),
                        None => format!("invalid request body: {}", strip_position(&inner)),
                    };
                    let mut err = Error::invalid(msg);
                    err.param = param;
                    Err(err)
                }
                _ => Err(Error::new(
                    ErrorCode::InvalidJson,
                    format!(
                        "request body is not valid JSON: {} (line {}, column {})",
                        strip_position(&inner),
                        inner.line(),
                        inner.column()
                    ),
                )),
            }
        }
    }
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
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("model")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_types::openai::ChatRequest;

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
        assert!(e.message.contains("model"), "{}", e.message);
    }
}
