//! Text the CLI prints that comes from elsewhere: values clients chose (a model name, a user id)
//! and store URLs that may hold a password.

use std::borrow::Cow;

/// `s` with its control characters escaped (`\n`, `\u{1b}`…), so that a value a client sent
/// cannot break a table, forge a line or send escape codes to the operator's terminal.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// How many terminal columns `s` takes: East Asian wide characters (CJK) two, combining marks
/// none. Tables pad by it, so that rows with such names line up.
pub fn width(s: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(s)
}

/// `s` for a table cell: control characters escaped, at most `n` columns wide (the last one `…`
/// when cut).
pub fn clip(s: &str, n: usize) -> String {
    let s = clean(s);
    if width(&s) <= n {
        return s.into_owned();
    }
    let mut t = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w > n.saturating_sub(1) {
            break;
        }
        used += w;
        t.push(c);
    }
    t.push('…');
    t
}

/// `s` padded with spaces to `n` columns, on the right (`left`) or on the left.
pub fn pad(s: &str, n: usize, left: bool) -> String {
    let fill = " ".repeat(n.saturating_sub(width(s)));
    if left {
        format!("{s}{fill}")
    } else {
        format!("{fill}{s}")
    }
}

/// A store URL fit to print (see [`sluice_store::redact_url`]).
pub fn redact_url(url: &str) -> String {
    sluice_store::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wide characters take two columns: a cell of them is cut and padded by columns, so that a
    /// table's rows line up (they were counted as one each).
    #[test]
    fn cells_are_measured_in_columns() {
        assert_eq!(width("模型"), 4);
        assert_eq!(width("abc"), 3);
        assert_eq!(clip("模型-宽字符", 6), "模型-…");
        assert_eq!(width(&clip("模型-宽字符", 6)), 6);
        assert_eq!(clip("short", 6), "short");
        assert_eq!(pad("模型", 6, true), "模型  ");
        assert_eq!(pad("7", 3, false), "  7");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("alice"), "alice");
        assert!(matches!(clean("ünïcode ok"), Cow::Borrowed(_)));
        assert_eq!(clean("eve\n2026 FAKE"), "eve\\n2026 FAKE");
        assert_eq!(clean("x\u{1b}[2Jy"), "x\\u{1b}[2Jy");
        assert_eq!(clean("a\tb\u{7f}\u{9b}"), "a\\tb\\u{7f}\\u{9b}");
    }

    #[test]
    fn passwords_in_store_urls_are_hidden() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db.internal:5432/sluice"),
            "postgres://app:***@db.internal:5432/sluice"
        );
        assert_eq!(
            redact_url("postgres://app:p%40ss@db/sluice?sslmode=require"),
            "postgres://app:***@db/sluice?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://db/sluice?user=app&password=hunter2&sslmode=verify-full"),
            "postgresql://db/sluice?user=app&password=***&sslmode=verify-full"
        );
        // Nothing to hide.
        for url in [
            "postgres://app@db/sluice",
            "sqlite://./sluice-data/sluice.db",
            "sqlite::memory:",
            "sqlite:///tmp/a@b:c/sluice.db",
        ] {
            assert_eq!(redact_url(url), url);
        }
        // A password holding the characters that end an authority.
        assert_eq!(
            redact_url("postgres://app:p/a?s#s@db/sluice"),
            "postgres://app:***@db/sluice"
        );
        assert_eq!(
            redact_url("postgress://app:secret@db/x"),
            "postgress://app:***@db/x"
        );
    }
}
