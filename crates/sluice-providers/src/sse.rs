//! A decoder for `text/event-stream` bodies, after the event-stream interpretation of the HTML
//! standard (§9.2.6): lines end with CRLF, LF or CR; a leading byte-order mark is skipped; `:`
//! starts a comment; `data` lines join with LF; a blank line dispatches the event.
//!
//! Bytes are split into lines before they are decoded, so a character split across network
//! chunks is whole again, and each line is decoded with replacement: an invalid byte becomes
//! U+FFFD and the stream goes on, as the standard's UTF-8 decode does.

use std::collections::VecDeque;
use std::time::Duration;

/// The longest line kept while waiting for its end. An upstream that sends more without a line
/// break is not speaking SSE.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event` field; `message` when the event had none.
    pub event: String,
    /// The `data` lines, joined with LF.
    pub data: String,
    /// The last event id seen on the stream.
    pub id: String,
    /// The `retry` field, when this event carried one.
    pub retry: Option<Duration>,
}

/// Turns body bytes, in chunks of any size, into events.
#[derive(Debug, Default)]
pub struct Decoder {
    /// The current line's bytes, until its end arrives.
    line: Vec<u8>,
    /// Whether the next line is the stream's first (which may start with a byte-order mark).
    past_first_line: bool,
    /// The previous chunk ended with CR: an LF opening the next one belongs to it.
    skip_lf: bool,
    data: String,
    /// Whether at least one `data` field has been seen since the last dispatch.
    has_data: bool,
    event: String,
    id: String,
    retry: Option<Duration>,
}

/// The body is not an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTooLong;

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `bytes`, appending the events they complete to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut VecDeque<Event>) -> Result<(), LineTooLong> {
        if self.skip_lf && !bytes.is_empty() {
            self.skip_lf = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.push(&bytes[..end])?;
            self.line_ended(out);
            let mut next = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            bytes = &bytes[next..];
        }
        self.push(bytes)
    }

    /// The end of the body: an event whose data is complete but whose closing blank line never
    /// came is still dispatched; a line cut short is dropped, with the event it belonged to.
    pub fn finish(&mut self) -> Option<Event> {
        if !self.line.is_empty() {
            self.line.clear();
            self.reset();
            return None;
        }
        self.dispatch()
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), LineTooLong> {
        if self.line.len() + bytes.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_ended(&mut self, out: &mut VecDeque<Event>) {
        let mut line = std::mem::take(&mut self.line);
        if !self.past_first_line {
            self.past_first_line = true;
            if line.starts_with(b"\xEF\xBB\xBF") {
                line.drain(..3);
            }
        }
        if line.is_empty() {
            if let Some(ev) = self.dispatch() {
                out.push_back(ev);
            }
        } else if line[0] != b':' {
            let text = String::from_utf8_lossy(&line);
            let (name, value) = match text.split_once(':') {
                Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
                None => (text.as_ref(), ""),
            };
            match name {
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "event" => self.event = value.to_string(),
                // Not a field of the standard: llama.cpp's server reports a stream's error as
                // `error: {json}` (then `data: [DONE]`). It becomes an `error` event of its own,
                // so that the error is not lost.
                "error" => {
                    if self.has_data {
                        self.data.clear();
                    }
                    self.event = "error".to_string();
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "id" if !value.contains('\0') => self.id = value.to_string(),
                "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    self.retry = value.parse().ok().map(Duration::from_millis);
                }
                _ => {}
            }
        }
        // Keep the allocation for the next line.
        line.clear();
        self.line = line;
    }

    fn dispatch(&mut self) -> Option<Event> {
        if !self.has_data {
            self.reset();
            return None;
        }
        let event = std::mem::take(&mut self.event);
        let ev = Event {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.id.clone(),
            retry: self.retry.take(),
        };
        self.has_data = false;
        Some(ev)
    }

    fn reset(&mut self) {
        self.data.clear();
        self.has_data = false;
        self.event.clear();
        self.retry = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one by one, then ends the body.
    fn decode(chunks: &[&[u8]]) -> Vec<Event> {
        let mut d = Decoder::new();
        let mut out = VecDeque::new();
        for c in chunks {
            d.feed(c, &mut out).expect("lines fit");
        }
        out.extend(d.finish());
        out.into_iter().collect()
    }

    fn datas(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn every_line_ending_and_every_split_gives_the_same_events() {
        let body =
            "event: delta\ndata: {\"a\":1}\n\ndata: x\ndata: y\n\n: keep-alive\n\ndata: [DONE]\n\n";
        for ending in ["\n", "\r\n", "\r"] {
            let text = body.replace('\n', ending);
            let bytes = text.as_bytes();
            let whole = decode(&[bytes]);
            assert_eq!(datas(&whole), ["{\"a\":1}", "x\ny", "[DONE]"], "{ending:?}");
            assert_eq!(whole[0].event, "delta");
            assert_eq!(whole[1].event, "message");
            // Split at every byte, and byte by byte.
            for at in 0..bytes.len() {
                assert_eq!(
                    decode(&[&bytes[..at], &bytes[at..]]),
                    whole,
                    "{ending:?} at {at}"
                );
            }
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(decode(&singles), whole, "{ending:?} byte by byte");
        }
    }

    #[test]
    fn a_byte_order_mark_is_skipped_even_when_split() {
        let body = "\u{feff}data: {\"id\":\"x\"}\n\n";
        let bytes = body.as_bytes();
        assert_eq!(datas(&decode(&[bytes])), ["{\"id\":\"x\"}"]);
        assert_eq!(
            datas(&decode(&[&bytes[..1], &bytes[1..2], &bytes[2..]])),
            ["{\"id\":\"x\"}"]
        );
        // Only at the start of the stream.
        let later = decode(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]);
        assert_eq!(datas(&later), ["a"]);
    }

    #[test]
    fn a_character_split_across_chunks_is_whole_and_an_invalid_byte_is_replaced() {
        let body = "data: héllo → 世界\n\n".as_bytes();
        for at in 0..body.len() {
            assert_eq!(
                datas(&decode(&[&body[..at], &body[at..]])),
                ["héllo → 世界"],
                "split at {at}"
            );
        }
        let events = decode(&[b"data: a\xFFb\n\n", b"data: next\n\n"]);
        assert_eq!(datas(&events), ["a\u{fffd}b", "next"]);
    }

    #[test]
    fn an_error_field_is_an_error_event() {
        // llama.cpp's server: the error as a field of its own, then the end marker.
        let events =
            decode(&[b"error: {\"code\":400,\"message\":\"too long\"}\n\ndata: [DONE]\n\n"]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event, "error");
        assert_eq!(events[0].data, "{\"code\":400,\"message\":\"too long\"}");
        assert_eq!(
            (events[1].event.as_str(), events[1].data.as_str()),
            ("message", "[DONE]")
        );
    }

    #[test]
    fn fields_follow_the_standard() {
        let events = decode(&[
            b"id: 7\nretry: 1500\nevent: e\ndata:no-space\ndata\ndata:  two\nunknown: x\n\n",
            b"retry: soon\ndata: later\n\n",
        ]);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, "no-space\n\n two");
        assert_eq!(events[0].event, "e");
        assert_eq!(events[0].id, "7");
        assert_eq!(events[0].retry, Some(Duration::from_millis(1500)));
        // The id carries over; an invalid retry is ignored; the event type does not carry.
        assert_eq!(events[1].id, "7");
        assert_eq!(events[1].retry, None);
        assert_eq!(events[1].event, "message");
        // A blank line with no data dispatches nothing and forgets the event type.
        let events = decode(&[b"event: lost\n\ndata: d\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, "message");
    }

    #[test]
    fn the_end_of_the_body_keeps_whole_lines_and_drops_a_cut_one() {
        // The closing blank line never came, but the data line is whole.
        assert_eq!(datas(&decode(&[b"data: [DONE]\n"])), ["[DONE]"]);
        assert_eq!(datas(&decode(&[b"data: [DONE]\r"])), ["[DONE]"]);
        // The body broke off in the middle of a line.
        assert!(decode(&[b"data: a\n\ndata: {\"cut"]).len() == 1);
        assert!(decode(&[b"data: one\ndata: {\"cut"]).is_empty());
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut d = Decoder::new();
        let mut out = VecDeque::new();
        let block = vec![b'a'; 1024 * 1024];
        let mut refused = false;
        for _ in 0..=MAX_LINE / block.len() {
            if d.feed(&block, &mut out).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
