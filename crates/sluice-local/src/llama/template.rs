//! Chat templates: the Jinja template a GGUF file ships in
//! `tokenizer.chat_template`, rendered with minijinja the way Hugging Face
//! `transformers` renders it (`trim_blocks` and `lstrip_blocks` on, Python
//! string methods such as `.strip()` / `.startswith()`, `raise_exception`,
//! `tojson`, loop controls, `strftime_now`).

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value, context};
use serde::Serialize;

use super::error::LocalError;

const TEMPLATE_NAME: &str = "chat";

/// The ChatML template, used when a GGUF file carries no chat template.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// One message of a conversation, as chat templates see it
/// (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl TemplateMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template. Cheap to render concurrently (`Send + Sync`).
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Hugging Face style Jinja chat template. `bos_token` and
    /// `eos_token` are the strings the template sees as `bos_token` /
    /// `eos_token`.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, LocalError> {
        let source = source.into();
        let mut env = Environment::new();
        // transformers compiles templates with these two Jinja options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| LocalError::Template(describe(&e)))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), the
    /// fallback for models without a template of their own.
    pub fn chatml(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self::new(CHATML_TEMPLATE, bos_token, eos_token).expect("the ChatML template compiles")
    }

    /// The Jinja source of the template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation into the prompt text. With
    /// `add_generation_prompt` the text ends with the header that opens the
    /// assistant's turn, so the model's continuation is the answer.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, LocalError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| LocalError::Template(describe(&e)))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| LocalError::Template(describe(&e)))
    }
}

impl ChatTemplate {
    /// Renders a conversation whose last message is the start of the assistant's answer (a
    /// prefill), so that the model's continuation goes on from it: the text is rendered with
    /// that message and no generation prompt, and cut right after its content (what the template
    /// writes after it, the end of the turn, is left out). `None` when the template does not
    /// write the message's content as given (one that trims it, say, writes it trimmed, and the
    /// cut is made after that) or the last message is not the assistant's.
    pub fn render_continuing(
        &self,
        messages: &[TemplateMessage],
    ) -> Result<Option<String>, LocalError> {
        /// Stands in for the last message's text to find where the template writes it: no
        /// whitespace (templates trim), nothing a template would change.
        const MARK: &str = "\u{E000}sluice-prefill\u{E001}";
        let Some((last, earlier)) = messages.split_last().filter(|(m, _)| m.role == "assistant")
        else {
            return Ok(None);
        };
        // Where the text starts: the text before it is the same whatever it says.
        let mut marked = earlier.to_vec();
        marked.push(TemplateMessage::new("assistant", MARK));
        let with_mark = self.render(&marked, false)?;
        let Some(start) = with_mark
            .find(MARK)
            .filter(|at| with_mark.rfind(MARK) == Some(*at))
        else {
            return Ok(None);
        };
        let text = self.render(messages, false)?;
        let content = last.content.as_str();
        let written = text.get(start..).and_then(|rest| {
            [
                content,
                content.trim_end(),
                content.trim(),
                content.trim_start(),
            ]
            .into_iter()
            .filter(|c| !c.is_empty())
            .find(|c| rest.starts_with(c))
        });
        Ok(written.map(|c| text[..start + c.len()].to_string()))
    }
}

/// An error's message with its chain of causes (where `raise_exception`'s
/// text ends up).
fn describe(e: &JinjaError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `raise_exception(message)`: templates call it to reject a conversation
/// (e.g. roles that do not alternate).
fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time, formatted. Supports
/// `%Y %y %m %d %e %H %M %S %b %B %a %A %j %%` (what chat templates use).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs, &format)
}

fn format_utc(unix_secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic
/// Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(list: &[(&str, &str)]) -> Vec<TemplateMessage> {
        list.iter()
            .map(|(r, c)| TemplateMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn chatml_fallback_renders() {
        let t = ChatTemplate::chatml("", "<|im_end|>");
        let out = t
            .render(&msgs(&[("system", "Be brief."), ("user", "Hi")]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(&[("user", "Hi")]), false).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn hugging_face_features_work() {
        // A Llama-3 / Mistral style template exercising what HF templates use:
        // bos_token, raise_exception, loop variables, pycompat string methods,
        // the trim filter, tojson, namespace and loop controls, and
        // trim_blocks / lstrip_blocks whitespace control.
        let src = r#"{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message.content.startswith('skip') %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ loop.index }}/{{ loop.length }}{% if loop.last %} last{% endif %}] {{ message['role'].upper() }}: {{ message['content'].strip() }}|{{ message['content'] | trim }}|{{ message['content'] | tojson }}
{% endfor %}
{{ ns.n }}{% if add_generation_prompt %} GO{{ eos_token }}{% endif %}"#;
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(
                &msgs(&[
                    ("user", "  hello \"there\"  "),
                    ("assistant", "skip me"),
                    ("user", "bye"),
                ]),
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>\n[1/3] USER: hello \"there\"|hello \"there\"|\"  hello \\\"there\\\"  \"\n[3/3 last] USER: bye|bye|\"bye\"\n2 GO</s>"
        );
        let err = t
            .render(&msgs(&[("assistant", "x")]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    /// A final assistant message is continued: the prompt ends right after its content, without
    /// the end of its turn, also where the template trims what it writes.
    #[test]
    fn a_final_assistant_message_is_continued() {
        let t = ChatTemplate::chatml("", "<|im_end|>");
        let out = t
            .render_continuing(&msgs(&[
                ("user", "Name a colour."),
                ("assistant", "The colour is"),
            ]))
            .unwrap();
        assert_eq!(
            out.as_deref(),
            Some(
                "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nThe colour is"
            )
        );
        // A template that trims the content: cut after the trimmed text.
        let trims = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let out = trims
            .render_continuing(&msgs(&[("user", "Hi"), ("assistant", "Hello, ")]))
            .unwrap();
        assert_eq!(out.as_deref(), Some("<user>Hi</user><assistant>Hello,"));
        // The same text earlier in the conversation is not where the answer starts.
        let out = trims
            .render_continuing(&msgs(&[
                ("user", "Answer like:\n```json\n{}\n```"),
                ("assistant", "```json\n"),
            ]))
            .unwrap();
        assert_eq!(
            out.as_deref(),
            Some("<user>Answer like:\n```json\n{}\n```</user><assistant>```json")
        );
        // Nor is the same text in what the template writes after it.
        let out = t
            .render_continuing(&msgs(&[("user", "Hi"), ("assistant", "e")]))
            .unwrap();
        assert_eq!(
            out.as_deref(),
            Some("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\ne")
        );
        // Not an assistant's last message, or one the template does not write: nothing to
        // continue.
        assert_eq!(t.render_continuing(&msgs(&[("user", "Hi")])).unwrap(), None);
        let drops = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            drops
                .render_continuing(&msgs(&[("user", "Hi"), ("assistant", "Hello")]))
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_broken_template_is_an_error() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, LocalError::Template(_)), "{err}");
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:25:09 UTC, a Friday, day 208 of a leap year.
        let t = 1_722_000_309;
        assert_eq!(format_utc(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_utc(t, "%A %B %e %H:%M:%S %y %m %j %%"),
            "Friday July 26 13:25:09 24 07 208 %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
    }
}
