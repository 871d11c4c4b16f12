//! Checking a JSON object as it streams in, piece by piece: what of each piece may be sent on
//! (what keeps the text a valid beginning of a JSON object that serde_json reads, short of the
//! object's closing brace), whether the object is whole, and what to send last to end it as a
//! whole object. Streamed
//! tool-call arguments use it, so that a client parsing them as they arrive never meets text that
//! cannot become JSON, and text after a whole object can still be reported in it.

use serde_json::Value;

/// What a container holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

/// Where a number stands (RFC 8259: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    /// After `-`.
    Minus,
    /// After a leading `0`.
    Zero,
    /// In the integer digits.
    Int,
    /// After `.`.
    Dot,
    /// In the fraction digits.
    Frac,
    /// After `e`/`E`.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
}

impl Number {
    /// Whether the number may end here.
    fn can_end(self) -> bool {
        matches!(
            self,
            Number::Zero | Number::Int | Number::Frac | Number::ExpDigits
        )
    }
}

/// Inside a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Plain characters.
    None,
    /// After `\`.
    Backslash,
    /// In `\uXXXX`, this many hex digits read so far (the code unit so far).
    Unicode(u8, u16),
    /// After a high surrogate's escape: `\` of the low one must follow.
    WantLowBackslash,
    /// After that `\`: `u` must follow.
    WantLowU,
    /// In the low surrogate's `\uXXXX`.
    Low(u8, u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the object.
    Start,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `:`, or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After a value: `,` or the container's end.
    After,
    /// In a string (a key when `key`).
    Str {
        key: bool,
        escape: Escape,
    },
    Num(Number),
    /// In `true`, `false` or `null`: the word and how much of it has come.
    Word(&'static str, usize),
    /// The object is whole; only whitespace may follow.
    Done,
}

/// A JSON object arriving in pieces. Text that cannot continue a valid object is refused, and
/// everything after it too.
#[derive(Debug, Clone)]
pub(crate) struct JsonPrefix {
    state: State,
    stack: Vec<Container>,
    broken: bool,
    /// Whether the outermost object has a member (a key was started in it).
    top_members: bool,
    /// The number being read: held back until it ends, since serde_json refuses one too large
    /// for a double (`1e400`), and what was sent cannot be taken back.
    number: String,
    /// Where the number being read started (what the text expected then).
    before_number: State,
    /// A number that ended, to send before the character that ended it.
    ready: String,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix {
            state: State::Start,
            stack: Vec::new(),
            broken: false,
            top_members: false,
            number: String::new(),
            before_number: State::Value,
            ready: String::new(),
        }
    }
}

/// The most containers serde_json reads nested (its recursion limit is 128).
const MAX_DEPTH: usize = 127;

/// Whether serde_json reads this number (it refuses one beyond a double's range).
fn in_range(number: &str) -> bool {
    number.parse::<f64>().is_ok_and(f64::is_finite)
}

impl JsonPrefix {
    /// Takes the next piece; returns what may be sent on: the text that keeps what was sent a
    /// valid beginning of a JSON object, except whitespace before it, a number until it has
    /// ended (it comes with the character after it), and the object's closing brace and what
    /// follows it (sent by [`JsonPrefix::completion`]). Once the text goes wrong, nothing more is
    /// taken.
    pub(crate) fn push(&mut self, piece: &str) -> String {
        let mut out = String::new();
        if self.broken {
            return out;
        }
        for c in piece.chars() {
            let ok = self.step(c);
            out.push_str(&self.ready);
            self.ready.clear();
            if !ok {
                self.broken = true;
                return out;
            }
            match self.state {
                State::Num(_) => self.number.push(c),
                State::Start | State::Done => {}
                _ => out.push(c),
            }
        }
        out
    }

    /// Whether the object has ended, with nothing but whitespace after it.
    pub(crate) fn is_whole(&self) -> bool {
        self.state == State::Done && !self.broken
    }

    /// What to send after the text [`JsonPrefix::push`] let through to end a whole JSON object:
    /// the closing brace of an object that is whole; else that, after the member `key: value`
    /// (for an object that is not: what it could hold, and what could not be read). Before any
    /// `{`, it is the object `{key: value}` alone.
    pub(crate) fn completion(&self, key: &str, value: &Value) -> String {
        let member = format!("{}:{}", Value::String(key.to_string()), value);
        match self.state {
            State::Done if self.broken => {
                let comma = if self.top_members { "," } else { "" };
                return format!("{comma}{member}}}");
            }
            State::Done => return "}".to_string(),
            State::Start => return format!("{{{member}}}"),
            _ => {}
        }
        let mut out = String::new();
        // Finish what is open at the innermost level. A number held back goes now if it is
        // whole; else the text goes on as where it started.
        let mut state = match self.state {
            State::Num(n) if n.can_end() && in_range(&self.number) => {
                out.push_str(&self.number);
                State::After
            }
            State::Num(_) => self.before_number,
            other => other,
        };
        if let State::Str { key, escape } = state {
            match escape {
                Escape::None => {}
                // `\\`: the backslash escaped.
                Escape::Backslash => out.push('\\'),
                Escape::Unicode(n, code) => {
                    out.extend(std::iter::repeat_n('0', 4 - n as usize));
                    // A high surrogate needs its low one.
                    if (0xD800..0xDC00).contains(&(u32::from(code) << (4 * (4 - u32::from(n))))) {
                        out.push_str("\\uDC00");
                    }
                }
                Escape::WantLowBackslash => out.push_str("\\uDC00"),
                Escape::WantLowU => out.push_str("uDC00"),
                Escape::Low(n, _) => {
                    // Any low surrogate completes the pair: DC00 from what is there.
                    let pad = ["DC00", "C00", "00", "0"];
                    out.push_str(pad[n as usize]);
                }
            }
            out.push('"');
            state = if key { State::Colon } else { State::After };
        }
        if let State::Word(word, at) = state {
            out.push_str(&word[at..]);
            state = State::After;
        }
        match state {
            State::Colon => out.push_str(":null"),
            State::Value => out.push_str("null"),
            // After a comma inside an inner object: a member must follow before it closes.
            State::Key if self.stack.len() > 1 => out.push_str("\"\":null"),
            _ => {}
        }
        // After a value (or an empty container's opening): close the containers, the object
        // at the top taking the member first.
        for (depth, container) in self.stack.iter().enumerate().rev() {
            let first_in_it = depth == self.stack.len() - 1
                && matches!(state, State::KeyOrEnd | State::ValueOrEnd);
            match container {
                Container::Array => out.push(']'),
                Container::Object if depth == 0 => {
                    if !(first_in_it || (state == State::Key && self.stack.len() == 1)) {
                        out.push(',');
                    }
                    out.push_str(&member);
                    out.push('}');
                }
                Container::Object => out.push('}'),
            }
            // Containers further out are past their first value.
            state = State::After;
        }
        out
    }

    /// One character; `false` when it cannot come here.
    fn step(&mut self, c: char) -> bool {
        let ws = matches!(c, ' ' | '\t' | '\n' | '\r');
        match self.state {
            State::Start => {
                if ws {
                    return true;
                }
                if c != '{' {
                    return false;
                }
                self.stack.push(Container::Object);
                self.state = State::KeyOrEnd;
                true
            }
            State::Done => ws,
            State::KeyOrEnd | State::Key => {
                if ws {
                    return true;
                }
                match c {
                    '"' => {
                        self.top_members |= self.stack.len() == 1;
                        self.state = State::Str {
                            key: true,
                            escape: Escape::None,
                        };
                        true
                    }
                    '}' if self.state == State::KeyOrEnd => self.close(),
                    _ => false,
                }
            }
            State::Colon => {
                if ws {
                    return true;
                }
                if c == ':' {
                    self.state = State::Value;
                    true
                } else {
                    false
                }
            }
            State::Value | State::ValueOrEnd => {
                if ws {
                    return true;
                }
                if c == ']' && self.state == State::ValueOrEnd {
                    return self.close();
                }
                self.value_start(c)
            }
            State::After => {
                if ws {
                    return true;
                }
                match (c, self.stack.last()) {
                    (',', Some(Container::Object)) => {
                        self.state = State::Key;
                        true
                    }
                    (',', Some(Container::Array)) => {
                        self.state = State::Value;
                        true
                    }
                    ('}', Some(Container::Object)) | (']', Some(Container::Array)) => self.close(),
                    _ => false,
                }
            }
            State::Str { key, escape } => self.string(key, escape, c),
            State::Num(n) => {
                let next = match (n, c) {
                    (Number::Minus, '0') => Some(Number::Zero),
                    (Number::Minus, '1'..='9') => Some(Number::Int),
                    (Number::Int, '0'..='9') => Some(Number::Int),
                    (Number::Zero | Number::Int, '.') => Some(Number::Dot),
                    (Number::Dot | Number::Frac, '0'..='9') => Some(Number::Frac),
                    (Number::Zero | Number::Int | Number::Frac, 'e' | 'E') => Some(Number::Exp),
                    (Number::Exp, '+' | '-') => Some(Number::ExpSign),
                    (Number::Exp | Number::ExpSign | Number::ExpDigits, '0'..='9') => {
                        Some(Number::ExpDigits)
                    }
                    _ => None,
                };
                match next {
                    Some(n) => {
                        self.state = State::Num(n);
                        true
                    }
                    // The number ends here, if it can and serde_json reads it; the character is
                    // what follows it.
                    None if n.can_end() && in_range(&self.number) => {
                        self.ready.push_str(&self.number);
                        self.number.clear();
                        self.state = State::After;
                        self.step(c)
                    }
                    None => {
                        // Not sent: the text goes on from before it.
                        self.number.clear();
                        self.state = self.before_number;
                        false
                    }
                }
            }
            State::Word(word, at) => {
                if word.as_bytes()[at] as char != c {
                    return false;
                }
                self.state = if at + 1 == word.len() {
                    State::After
                } else {
                    State::Word(word, at + 1)
                };
                true
            }
        }
    }

    fn value_start(&mut self, c: char) -> bool {
        if matches!(c, '{' | '[') && self.stack.len() >= MAX_DEPTH {
            return false;
        }
        if matches!(c, '-' | '0'..='9') {
            self.before_number = self.state;
        }
        self.state = match c {
            '{' => {
                self.stack.push(Container::Object);
                State::KeyOrEnd
            }
            '[' => {
                self.stack.push(Container::Array);
                State::ValueOrEnd
            }
            '"' => State::Str {
                key: false,
                escape: Escape::None,
            },
            '-' => State::Num(Number::Minus),
            '0' => State::Num(Number::Zero),
            '1'..='9' => State::Num(Number::Int),
            't' => State::Word("true", 1),
            'f' => State::Word("false", 1),
            'n' => State::Word("null", 1),
            _ => return false,
        };
        true
    }

    /// Closes the innermost container (its closing character has come).
    fn close(&mut self) -> bool {
        self.stack.pop();
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::After
        };
        true
    }

    fn string(&mut self, key: bool, escape: Escape, c: char) -> bool {
        let hex = c.to_digit(16).map(|d| d as u16);
        let escape = match (escape, c) {
            (Escape::None, '"') => {
                self.state = if key { State::Colon } else { State::After };
                return true;
            }
            (Escape::None, '\\') => Escape::Backslash,
            (Escape::None, c) if (c as u32) < 0x20 => return false,
            (Escape::None, _) => Escape::None,
            (Escape::Backslash, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => Escape::None,
            (Escape::Backslash, 'u') => Escape::Unicode(0, 0),
            (Escape::Unicode(n, code), _) if hex.is_some() => {
                let code = (code << 4) | hex.unwrap_or(0);
                if n == 1 && (0xDC..=0xDF).contains(&code) {
                    // A low surrogate with no high one before it.
                    return false;
                }
                if n < 3 {
                    Escape::Unicode(n + 1, code)
                } else if (0xD800..0xDC00).contains(&code) {
                    Escape::WantLowBackslash
                } else {
                    Escape::None
                }
            }
            (Escape::WantLowBackslash, '\\') => Escape::WantLowU,
            (Escape::WantLowU, 'u') => Escape::Low(0, 0),
            (Escape::Low(n, code), _) if hex.is_some() => {
                let code = (code << 4) | hex.unwrap_or(0);
                match n {
                    // The first digit must be D, the second C–F.
                    0 if code != 0xD => return false,
                    1 if !(0xDC..=0xDF).contains(&code) => return false,
                    0..=2 => Escape::Low(n + 1, code),
                    _ => Escape::None,
                }
            }
            _ => return false,
        };
        self.state = State::Str { key, escape };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Feeds `text` in pieces of every size from 1 to 7 bytes (on character boundaries);
    /// returns the accepted text, the prefix state and the completion.
    fn feed(text: &str, piece: usize) -> (String, JsonPrefix) {
        let mut p = JsonPrefix::default();
        let mut accepted = String::new();
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(piece) {
            let part: String = part.iter().collect();
            accepted.push_str(&p.push(&part));
        }
        (accepted, p)
    }

    /// What the client ends up with: the accepted text and the completion.
    fn result(text: &str, piece: usize) -> (String, bool) {
        let (mut accepted, p) = feed(text, piece);
        let whole = p.is_whole();
        accepted.push_str(&p.completion("_raw_arguments", &json!(text)));
        (accepted, whole)
    }

    #[test]
    fn valid_objects_are_accepted_whole_in_any_pieces() {
        for text in [
            r#"{}"#,
            r#" { "a" : 1 } "#,
            r#"{"a":[1,-2.5e+3,0,0.1,1E9,true,false,null,"x\"y\\z\/\u00e9\ud83d\ude00",{"b":{}},[]]}"#,
            "{\"city\": \"Zürich\", \"n\": -0}",
        ] {
            for piece in 1..8 {
                let (got, whole) = result(text, piece);
                assert!(whole, "{text} in pieces of {piece}");
                // Whitespace around the object is not sent.
                assert_eq!(got, text.trim(), "{text} in pieces of {piece}");
                let a: Value = serde_json::from_str(&got).expect("valid");
                let b: Value = serde_json::from_str(text).expect("valid");
                assert_eq!(a, b);
            }
        }
    }

    /// Whatever the text, the accepted part is a prefix of it, and with the completion it is a
    /// JSON object (the reference: serde_json), holding the raw text when it was not whole.
    #[test]
    fn every_beginning_completes_to_an_object() {
        let texts = [
            r#"{'a': 1}"#,
            r#"{"a": 1,}"#,
            r#"{"a": tru"#,
            r#"{"a": -"#,
            r#"{"a": 1.5e"#,
            r#"{"a": 1.5e+"#,
            r#"{"a": 0."#,
            r#"{"a": "x\"#,
            r#"{"a": "x\u00"#,
            r#"{"a": "x\ud83d"#,
            r#"{"a": "x\ud83d\"#,
            r#"{"a": "x\ud83d\u"#,
            r#"{"a": "x\ud83d\udd"#,
            r#"{"a": "x\ude00"}"#,
            r#"{"a": "x\uDC"#,
            r#"{"a": "x\uD8"#,
            r#"{"a": "x\uD"#,
            r#"{"a": "x\u"#,
            r#"{"a": [1, {"b": [true, "#,
            r#"{"a": [1, {"b": "#,
            r#"{"a": [1, {"b""#,
            r#"{"a": [1, {""#,
            r#"{"a": [1, {"#,
            r#"{"a": [1, ["#,
            r#"{"a": [1,"#,
            r#"{"a" "b"}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1} extra"#,
            r#"[1, 2]"#,
            "\"text\"",
            "  ",
            "{\"a\": \"line\nbreak\"}",
            "{\"x\": 1",
            "{",
            "{\"",
        ];
        for text in texts {
            for piece in 1..8 {
                let (accepted, p) = feed(text, piece);
                assert!(text.starts_with(&accepted), "{text}: {accepted}");
                let full = format!("{accepted}{}", p.completion("_raw_arguments", &json!(text)));
                let v: serde_json::Map<String, Value> = serde_json::from_str(&full)
                    .unwrap_or_else(|e| panic!("{text} in pieces of {piece}: {full}: {e}"));
                if p.is_whole() {
                    assert_eq!(
                        Value::Object(v),
                        serde_json::from_str::<Value>(text).unwrap()
                    );
                } else {
                    assert_eq!(v["_raw_arguments"], json!(text), "{full}");
                }
            }
        }
    }

    /// Every cut of a valid object, and every cut with a stray character after it, completes to
    /// an object serde_json reads.
    #[test]
    fn every_cut_and_every_stray_character_completes() {
        let text = r#"{"k": [0, -1.25e-3, 7E+2, true, false, null, "s\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00é", {"o": {}, "e": []}], "z": ""}"#;
        serde_json::from_str::<Value>(text).expect("the text is valid");
        let cuts: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        for &cut in &cuts {
            for stray in [
                "", "'", "x", "}", "]", ",", ":", "\"", "\\", "\u{1}", "0", ".",
            ] {
                let bad = format!("{}{stray}", &text[..cut]);
                let (accepted, p) = feed(&bad, 1);
                assert!(bad.starts_with(&accepted));
                let full = format!("{accepted}{}", p.completion("_raw_arguments", &json!(bad)));
                serde_json::from_str::<serde_json::Map<String, Value>>(&full)
                    .unwrap_or_else(|e| panic!("{bad:?}: {full}: {e}"));
            }
        }
    }

    #[test]
    fn the_accepted_part_stops_where_the_text_goes_wrong() {
        let (accepted, p) = feed(r#"{"a": 1, 'b': 2}"#, 3);
        assert_eq!(accepted, r#"{"a": 1, "#);
        assert!(!p.is_whole());
        assert_eq!(
            p.completion("_raw_arguments", &json!("R")),
            r#""_raw_arguments":"R"}"#
        );
        let (accepted, p) = feed("{'a': 1}", 1);
        assert_eq!(accepted, "{");
        assert_eq!(
            p.completion("k", &json!(1)),
            r#""k":1}"#,
            "an empty object takes the member with no comma"
        );
        let (accepted, p) = feed("not json", 4);
        assert_eq!(accepted, "");
        assert_eq!(p.completion("k", &json!(1)), r#"{"k":1}"#);
        // Nothing is taken after the first refusal, even what would fit.
        let mut p = JsonPrefix::default();
        assert_eq!(p.push("{x"), "{");
        assert_eq!(p.push("}"), "");
        // A whole object's closing brace waits for the completion; whitespace after it is
        // taken (not sent), and anything else makes it not whole.
        let mut p = JsonPrefix::default();
        assert_eq!(p.push(" {\"a\": 1} \n"), "{\"a\": 1");
        assert!(p.is_whole());
        assert_eq!(p.completion("k", &json!(1)), "}");
        assert_eq!(p.push(" {"), "");
        assert!(!p.is_whole());
        assert_eq!(p.completion("k", &json!(1)), r#","k":1}"#);
        let mut p = JsonPrefix::default();
        assert_eq!(p.push("{}}"), "{");
        assert_eq!(p.completion("k", &json!(1)), r#""k":1}"#);
        // Whitespace alone sends nothing.
        let mut p = JsonPrefix::default();
        assert_eq!(p.push(" \n "), "");
        assert_eq!(p.completion("k", &json!(1)), r#"{"k":1}"#);
    }

    /// What serde_json refuses though the grammar allows it is refused too: a number beyond a
    /// double's range (held back until it ends, since it cannot be taken back once sent), and
    /// containers nested deeper than its recursion limit.
    #[test]
    fn what_serde_json_refuses_is_not_sent() {
        let mut p = JsonPrefix::default();
        assert_eq!(p.push("{\"n\": 12"), "{\"n\": ");
        assert_eq!(p.push("3, \"m\": 1e40"), "123, \"m\": ");
        assert_eq!(p.push("0, \"x\": 1"), "");
        assert!(!p.is_whole());
        let sent = "{\"n\": 123, \"m\": ";
        let full = format!("{sent}{}", p.completion("k", &json!("R")));
        assert_eq!(
            serde_json::from_str::<Value>(&full).unwrap(),
            json!({"n": 123, "m": null, "k": "R"})
        );
        // A number still arriving when the arguments end goes with the completion, if whole.
        let mut p = JsonPrefix::default();
        assert_eq!(p.push("{\"n\": -1.5e3"), "{\"n\": ");
        assert_eq!(p.completion("k", &json!(1)), r#"-1.5e3,"k":1}"#);
        let mut p = JsonPrefix::default();
        assert_eq!(p.push("{\"n\": -1.5e"), "{\"n\": ");
        assert_eq!(p.completion("k", &json!(1)), r#"null,"k":1}"#);
        // 127 containers nested are read; a 128th is refused.
        let deep = |n: usize| format!("{{\"a\":{}", "[".repeat(n - 1));
        let mut p = JsonPrefix::default();
        assert_eq!(p.push(&deep(127)), deep(127));
        let mut p = JsonPrefix::default();
        assert_eq!(p.push(&deep(128)), deep(127));
        let full = format!("{}{}", deep(127), p.completion("k", &json!(1)));
        serde_json::from_str::<Value>(&full).unwrap_or_else(|e| panic!("{e}"));
    }
}
