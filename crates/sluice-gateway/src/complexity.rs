//! The `complexity` routing strategy: a model group whose requests go to one of several tiers of
//! other model groups (a small model for small talk and short factual questions, a strong one for
//! code, math, reasoning, legal/medical/financial or long-context work), chosen by an explainable
//! score in `[0, 1]`.
//!
//! # Score
//!
//! The heuristic score is `clamp(Σ weight_f × value_f, 0, 1)` over seven features, each with a
//! value in `[0, 1]`. Text features read the last user message (the last message when there is no
//! user message; its first 64 KiB), tokenized once into lowercase words (letters, digits and
//! `_`; apostrophes are dropped, so `what's` is `whats`) with a light plural rule (`bugs` also
//! matches `bug`) and a few stems (`indemnif…`, `diagnos…`). Cue words and phrases each carry an evidence weight
//! (about 0.9 for unambiguous cues such as `python` or `integral`, 0.3–0.6 for weaker ones such as
//! `function` or `why`), symbols add fixed amounts, and the summed evidence `e` becomes a value
//! through the saturating `sat(e) = 1 − exp(−e)`: one strong cue gives ≈ 0.6, two ≈ 0.8.
//!
//! Features, with their weights (`W_*` below):
//!
//! - `length` (+0.40): the whole conversation's size, `tokens ≈ UTF-8 bytes / 4` over message
//!   contents and tool-call arguments; `ln(tokens / 20) / ln(3000 / 20)` clamped to `[0, 1]`,
//!   so 0 up to 20 tokens, ≈ 0.5 at 250, 1 from 3000 (long-context work alone reaches the strong
//!   tier).
//! - `code` (+0.70): sat(cue words + 1.5·fences + 0.4·inline code spans + 0.3·operators
//!   (`=> -> :: == != && || </ +=`) + 0.15·braces + 0.25·lines ending in `;` + 0.1·indented
//!   lines + 0.3·snake_case/camelCase identifiers + 0.3·calls `name(`).
//! - `math` (+0.60): sat(cue words + 0.35·arithmetic + 0.5·math glyphs (∫ ∑ √ ≤ π …) +
//!   0.6·LaTeX commands and `$$`); arithmetic is an operator between two operands, one of them a
//!   digit (`3 + 4`, `x^2`), dates such as `2024-01-05` excluded.
//! - `reasoning` (+0.50): sat(cue words and phrases (why, explain, analyze, compare, design,
//!   step by step, pros and cons, trade-off …) + 0.3 per question after the first).
//! - `domain` (+0.50): sat(legal, medical and financial cue words: contract, clause, liability,
//!   indemnif…, GDPR, diagnosis, dosage, valuation, tax, EBITDA …).
//! - `depth` (+0.15): `(user turns − 1) / 5` clamped, so 1 from 6 user turns.
//! - `small_talk` (−0.50): `raw × (1 − max(code, math, reasoning, domain))`.
//!
//! `small_talk`'s raw value is the largest of: 1 for a greeting, thanks or chit-chat cue in a
//! message of at most 12 words (falling linearly to 0 at 30 words); 1 for a factual question
//! opener (`what`, `who`, `when`, `where`, `which`, `how many`, `define`, `translate` …) in at most
//! 12 words (0 at 20 words); 0.5 for any message of at most 3 words. Technical evidence damps it,
//! so `hi, fix my python bug` is not pulled down.
//!
//! # kNN
//!
//! When the table has `examples`, each is split into lowercase alphanumeric terms (stop words and
//! one-character terms dropped, a trailing plural `s` removed; in scripts written without spaces,
//! pairs of neighbouring characters) and turned into an L2-normalized
//! TF-IDF vector (`idf = ln((1 + N) / (1 + df)) + 1`). A request's last user message is
//! vectorized with that vocabulary (unknown words ignored) and compared by cosine with every
//! example; the `k` most similar with similarity > 0 vote: `knn = Σ sim_i × pos_i / Σ sim_i`,
//! where an example of the first tier is at 0, of the last at 1, and of a tier between them at
//! the middle of that tier's score band (so the votes of one tier alone land in it). The vote's
//! weight grows with how close the nearest example is: `w = knn_weight + (1 − knn_weight) × s`,
//! with `s` the best similarity, so a request that is an example's own text (`s = 1`) goes to that
//! example's tier whatever the heuristic says, and a distant match weighs `knn_weight`
//! (`knn_weight = 0` turns the examples off). The final score is `(1 − w) × heuristic + w × knn`.
//! Without a neighbour the heuristic stands.
//!
//! The final score, rounded to 3 decimals, goes to the first tier whose `max_score` is at least
//! the score; the last tier takes everything else.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sluice_types::openai::{ChatRequest, Content, Message, Role};

/// `[models.NAME.complexity]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComplexityConfig {
    /// Ascending tiers; the request goes to the first tier whose `max_score` is >= its score; the
    /// last tier has no `max_score` (catch-all).
    pub tiers: Vec<TierConfig>,
    /// Optional labelled examples for k-nearest-neighbour voting.
    #[serde(default)]
    pub examples: Vec<ExampleConfig>,
    /// k for kNN (default 5).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Weight of the kNN score in the blend with the heuristic score when examples exist
    /// (default 0.5).
    #[serde(default = "default_knn_weight")]
    pub knn_weight: f64,
}

fn default_k() -> usize {
    5
}

fn default_knn_weight() -> f64 {
    0.5
}

/// One tier of a complexity group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    /// A model group name in `[models]`.
    pub model: String,
    #[serde(default)]
    pub max_score: Option<f64>,
}

/// A labelled example for kNN voting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleConfig {
    pub text: String,
    /// A tier name.
    pub tier: String,
}

/// The routing decision for one request, with every feature's value and contribution.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    /// The chosen tier's name.
    pub tier: String,
    pub tier_index: usize,
    /// The tier's model group.
    pub model: String,
    /// Final score in `[0, 1]`, rounded to 3 decimals.
    pub score: f64,
    pub heuristic_score: f64,
    pub knn_score: Option<f64>,
    /// The weight the kNN vote had in the score (it grows with the nearest example's
    /// similarity), rounded to 3 decimals; `None` without a vote.
    pub knn_weight: Option<f64>,
    /// Every feature, in a fixed order.
    pub features: Vec<Feature>,
    /// The nearest examples that voted (empty without examples).
    pub neighbours: Vec<Neighbour>,
}

/// One feature of the heuristic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Feature {
    pub name: &'static str,
    /// In `[0, 1]`, rounded to 3 decimals.
    pub value: f64,
    /// `weight × value`, rounded to 3 decimals (negative for `small_talk`).
    pub contribution: f64,
    /// What the value came from, for people.
    pub detail: String,
}

/// An example that voted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neighbour {
    pub tier: String,
    /// Cosine similarity, rounded to 3 decimals.
    pub similarity: f64,
    /// The example's first 80 characters.
    pub text: String,
}

impl Decision {
    /// The `x-sluice-route` header value, e.g. `tier=strong; model=gpt-4o; score=0.720`. Names are
    /// reduced to header-safe ASCII (other characters become `_`).
    pub fn header_value(&self) -> String {
        format!(
            "tier={}; model={}; score={:.3}",
            header_safe(&self.tier),
            header_safe(&self.model),
            self.score
        )
    }

    /// A multi-line explanation for people: the decision, one line per feature, the neighbours.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "tier {} (#{}) -> model {}; score {:.3}",
            self.tier, self.tier_index, self.model, self.score
        );
        match self.knn_score {
            Some(k) => {
                let _ = writeln!(
                    out,
                    "  heuristic {:.3} blended with knn {:.3} (weight {:.3}) from {} neighbour(s)",
                    self.heuristic_score,
                    k,
                    self.knn_weight.unwrap_or_default(),
                    self.neighbours.len()
                );
            }
            None => {
                let _ = writeln!(out, "  heuristic {:.3}; no knn vote", self.heuristic_score);
            }
        }
        out.push_str("features:\n");
        for f in &self.features {
            let _ = writeln!(
                out,
                "  {:<11} value {:.3}  contribution {:+.3}  {}",
                f.name, f.value, f.contribution, f.detail
            );
        }
        if self.neighbours.is_empty() {
            out.push_str("neighbours: none\n");
        } else {
            out.push_str("neighbours:\n");
            for n in &self.neighbours {
                let _ = writeln!(out, "  {:.3}  {:<10} {:?}", n.similarity, n.tier, n.text);
            }
        }
        out
    }
}

/// `s` with every character a header field may not carry as `_` (borrowed when it has none).
pub(crate) fn header_safe(s: &str) -> std::borrow::Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "._-/:@+".contains(c);
    if s.chars().all(safe) {
        return std::borrow::Cow::Borrowed(s);
    }
    s.chars()
        .map(|c| if safe(c) { c } else { '_' })
        .collect::<String>()
        .into()
}

/// A complexity classifier, built once at config load.
#[derive(Debug, Clone)]
pub struct Classifier {
    tiers: Vec<TierConfig>,
    k: usize,
    knn_weight: f64,
    index: KnnIndex,
}

impl Classifier {
    /// Validates the table and builds the kNN index. Errors are one line naming the key relative
    /// to the complexity table.
    pub fn new(cfg: &ComplexityConfig) -> Result<Self, String> {
        if cfg.tiers.is_empty() {
            return Err("tiers: at least one tier is required".into());
        }
        let last = cfg.tiers.len() - 1;
        let mut prev_max: Option<(usize, f64)> = None;
        for (i, t) in cfg.tiers.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(format!("tiers[{i}].name: must not be empty"));
            }
            if let Some(j) = cfg.tiers[..i].iter().position(|o| o.name == t.name) {
                return Err(format!(
                    "tiers[{i}].name: duplicate tier name `{}` (also tiers[{j}])",
                    t.name
                ));
            }
            if t.model.trim().is_empty() {
                return Err(format!("tiers[{i}].model: must not be empty"));
            }
            match t.max_score {
                None if i < last => {
                    return Err(format!(
                        "tiers[{i}].max_score: required on every tier but the last"
                    ));
                }
                None => {}
                Some(m) => {
                    if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
                        return Err(format!(
                            "tiers[{i}].max_score: must be a number in [0, 1], got {m}"
                        ));
                    }
                    if let Some((j, p)) = prev_max
                        && m <= p
                    {
                        return Err(format!(
                            "tiers[{i}].max_score: must be greater than tiers[{j}].max_score ({p})"
                        ));
                    }
                    prev_max = Some((i, m));
                    if i == last && last > 0 {
                        tracing::warn!(
                            tier = %t.name,
                            "complexity: the last tier's max_score is ignored (it is the catch-all)"
                        );
                    }
                }
            }
        }
        if cfg.k == 0 {
            return Err("k: must be at least 1".into());
        }
        if !(cfg.knn_weight.is_finite() && (0.0..=1.0).contains(&cfg.knn_weight)) {
            return Err(format!(
                "knn_weight: must be a number in [0, 1], got {}",
                cfg.knn_weight
            ));
        }
        let mut labelled = Vec::with_capacity(cfg.examples.len());
        for (i, ex) in cfg.examples.iter().enumerate() {
            if ex.text.trim().is_empty() {
                return Err(format!("examples[{i}].text: must not be empty"));
            }
            let Some(tier) = cfg.tiers.iter().position(|t| t.name == ex.tier) else {
                let names: Vec<&str> = cfg.tiers.iter().map(|t| t.name.as_str()).collect();
                return Err(format!(
                    "examples[{i}].tier: no tier `{}`; tiers: {}",
                    ex.tier,
                    names.join(", ")
                ));
            };
            let mut terms = 0usize;
            for_each_term(&ex.text, &mut String::new(), &mut |_| terms += 1);
            if terms == 0 {
                return Err(format!(
                    "examples[{i}].text: `{}` has no word the examples are compared by (stop words and one-letter words are left out); give a longer example",
                    ex.text
                ));
            }
            labelled.push((tier, ex.text.as_str()));
        }
        Ok(Classifier {
            tiers: cfg.tiers.clone(),
            k: cfg.k,
            knn_weight: cfg.knn_weight,
            index: KnnIndex::build(&labelled),
        })
    }

    /// The tiers, in order.
    pub fn tiers(&self) -> &[TierConfig] {
        &self.tiers
    }

    /// Classifies a chat request.
    pub fn classify(&self, req: &ChatRequest) -> Decision {
        self.classify_messages(&req.messages)
    }

    /// Classifies a bare prompt, as one user message.
    pub fn classify_text(&self, prompt: &str) -> Decision {
        self.classify_messages(&[Message::text(Role::User, prompt)])
    }

    fn classify_messages(&self, messages: &[Message]) -> Decision {
        // The last user turn, not a message that only carries what a tool returned (images a
        // `/v1/messages` tool result held).
        let focus = messages
            .iter()
            .rposition(|m| m.role == Role::User && !sluice_types::anthropic::is_tool_media(m))
            .or_else(|| messages.len().checked_sub(1))
            .and_then(|i| messages.get(i));
        let (heuristic, features) = heuristic(messages, focus);
        let heuristic = round3(heuristic);
        let (knn, neighbours, nearest) = match focus {
            Some(m) if !self.index.examples.is_empty() && self.knn_weight > 0.0 => self.knn(m),
            _ => (None, Vec::new(), 0.0),
        };
        // The closer the nearest example, the more the examples decide: an example's own text
        // goes to its tier.
        let weight =
            knn.map(|_| self.knn_weight + (1.0 - self.knn_weight) * nearest.clamp(0.0, 1.0));
        let score = match (knn, weight) {
            (Some(k), Some(w)) => round3(((1.0 - w) * heuristic + w * k).clamp(0.0, 1.0)),
            _ => heuristic,
        };
        let last = self.tiers.len().saturating_sub(1);
        let tier_index = self.tiers[..last]
            .iter()
            .position(|t| t.max_score.is_some_and(|m| score <= m))
            .unwrap_or(last);
        let (tier, model) = self
            .tiers
            .get(tier_index)
            .map(|t| (t.name.clone(), t.model.clone()))
            .unwrap_or_default();
        Decision {
            tier,
            tier_index,
            model,
            score,
            heuristic_score: heuristic,
            knn_score: knn,
            knn_weight: weight.map(round3),
            features,
            neighbours,
        }
    }

    /// Where an example of tier `i` (of `span + 1`) votes: 0 for the first tier, 1 for the last,
    /// and the middle of its own score band for a tier between them, so that the votes of one
    /// tier's examples alone land in that tier whatever its thresholds.
    fn vote_position(&self, i: usize, span: usize) -> f64 {
        if span == 0 || i == 0 {
            return 0.0;
        }
        if i >= span {
            return 1.0;
        }
        let bound = |j: usize| self.tiers.get(j).and_then(|t| t.max_score).unwrap_or(1.0);
        (bound(i - 1) + bound(i)) / 2.0
    }

    /// The examples' vote, the neighbours that cast it, and the best similarity.
    fn knn(&self, focus: &Message) -> (Option<f64>, Vec<Neighbour>, f64) {
        let Some(query) = self.index.vectorize(focus) else {
            return (None, Vec::new(), 0.0);
        };
        let mut scored: Vec<(f64, usize)> = self
            .index
            .examples
            .iter()
            .enumerate()
            .map(|(i, ex)| (dot(&query, &ex.vector), i))
            .filter(|(s, _)| *s > 1e-12)
            .collect();
        if scored.is_empty() {
            return (None, Vec::new(), 0.0);
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let nearest = scored[0].0;
        scored.truncate(self.k);
        let span = self.tiers.len().saturating_sub(1);
        let (mut num, mut den) = (0.0, 0.0);
        let mut neighbours = Vec::with_capacity(scored.len());
        for (sim, i) in scored {
            let Some(ex) = self.index.examples.get(i) else {
                continue;
            };
            let pos = self.vote_position(ex.tier_index, span);
            num += sim * pos;
            den += sim;
            neighbours.push(Neighbour {
                tier: self
                    .tiers
                    .get(ex.tier_index)
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
                similarity: round3(sim),
                text: ex.text.clone(),
            });
        }
        if den <= 0.0 {
            return (None, Vec::new(), 0.0);
        }
        (Some(round3(num / den)), neighbours, nearest)
    }
}

/// Rounds to 3 decimals; `-0.0` becomes `0.0`.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0 + 0.0
}

/// Calls `f` with each text piece of a message: the string content, or each text part.
fn for_each_text(msg: &Message, mut f: impl FnMut(&str)) {
    match &msg.content {
        Some(Content::Text(s)) => f(s),
        Some(Content::Parts(parts)) => {
            for t in parts.iter().filter_map(|p| p.text.as_deref()) {
                f(t);
            }
        }
        None => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Heuristic
// ---------------------------------------------------------------------------------------------

use crate::tokens::media_bytes;

const W_LENGTH: f64 = 0.40;
const W_CODE: f64 = 0.70;
const W_MATH: f64 = 0.60;
const W_REASONING: f64 = 0.50;
const W_DOMAIN: f64 = 0.50;
const W_DEPTH: f64 = 0.15;
const W_SMALL_TALK: f64 = -0.50;

/// Tokens at and below which `length` is 0, and from which it is 1.
const LENGTH_LOW_TOKENS: f64 = 20.0;
const LENGTH_HIGH_TOKENS: f64 = 3000.0;
/// User turns from which `depth` is 1.
const DEPTH_FULL_TURNS: f64 = 6.0;

/// Saturating map from summed evidence to `[0, 1]`.
fn sat(e: f64) -> f64 {
    if e <= 0.0 { 0.0 } else { 1.0 - (-e).exp() }
}

/// `1` up to `full` words, falling linearly to `0` at `zero` words.
fn shortness(words: usize, full: usize, zero: usize) -> f64 {
    if words <= full {
        1.0
    } else if words >= zero {
        0.0
    } else {
        (zero - words) as f64 / (zero - full) as f64
    }
}

fn heuristic(messages: &[Message], focus: Option<&Message>) -> (f64, Vec<Feature>) {
    let mut bytes = 0usize;
    let mut user_turns = 0usize;
    for m in messages {
        for_each_text(m, |t| bytes += t.len());
        if let Some(Content::Parts(parts)) = &m.content {
            bytes += parts
                .iter()
                .filter(|p| p.text.is_none())
                .map(media_bytes)
                .sum::<usize>();
        }
        if let Some(calls) = &m.tool_calls {
            bytes += calls
                .iter()
                .map(|c| c.function.arguments.len())
                .sum::<usize>();
        }
        if m.role == Role::User && !sluice_types::anthropic::is_tool_media(m) {
            user_turns += 1;
        }
    }
    let mut scan = Scanner::default();
    if let Some(m) = focus {
        for_each_text(m, |t| scan.feed(t));
    }

    let mut features = Vec::with_capacity(7);
    let mut total = 0.0;
    let mut push = |name: &'static str, weight: f64, value: f64, detail: String| {
        let value = value.clamp(0.0, 1.0);
        let contribution = weight * value;
        total += contribution;
        features.push(Feature {
            name,
            value: round3(value),
            contribution: round3(contribution),
            detail,
        });
    };

    // length
    let tokens = bytes as f64 / 4.0;
    let length = if tokens <= LENGTH_LOW_TOKENS {
        0.0
    } else {
        (tokens / LENGTH_LOW_TOKENS).ln() / (LENGTH_HIGH_TOKENS / LENGTH_LOW_TOKENS).ln()
    };
    push(
        "length",
        W_LENGTH,
        length,
        format!(
            "~{} tokens in {} message(s)",
            tokens.round() as u64,
            messages.len()
        ),
    );

    // code
    let s = &scan;
    let code_symbols = s.operators + s.braces + s.semicolon_lines + s.identifiers + s.calls;
    let code_e = s.code.total
        + 1.5 * s.fences as f64
        + 0.4 * (s.inline_ticks / 2) as f64
        + 0.3 * s.operators as f64
        + 0.15 * s.braces as f64
        + 0.25 * s.semicolon_lines as f64
        + 0.1 * s.indented_lines as f64
        + 0.3 * s.identifiers as f64
        + 0.3 * s.calls as f64;
    let code = sat(code_e);
    let mut detail = cue_detail(&s.code);
    add_count(&mut detail, s.fences, "code fence(s)");
    add_count(&mut detail, s.inline_ticks / 2, "inline code span(s)");
    add_count(&mut detail, code_symbols, "code symbol(s)");
    add_count(&mut detail, s.indented_lines, "indented line(s)");
    push("code", W_CODE, code, none_if_empty(detail));

    // math
    let math_e = s.math.total
        + 0.35 * s.arithmetic as f64
        + 0.5 * s.math_glyphs as f64
        + 0.6 * s.latex as f64;
    let math = sat(math_e);
    let mut detail = cue_detail(&s.math);
    add_count(&mut detail, s.arithmetic, "arithmetic expression(s)");
    add_count(&mut detail, s.math_glyphs, "math symbol(s)");
    add_count(&mut detail, s.latex, "LaTeX command(s)");
    push("math", W_MATH, math, none_if_empty(detail));

    // reasoning
    let extra_questions = s.questions.saturating_sub(1);
    let reasoning = sat(s.reasoning.total + 0.3 * extra_questions as f64);
    let mut detail = cue_detail(&s.reasoning);
    add_count(&mut detail, s.questions, "question(s)");
    push("reasoning", W_REASONING, reasoning, none_if_empty(detail));

    // domain
    let domain = sat(s.domain.total);
    push(
        "domain",
        W_DOMAIN,
        domain,
        none_if_empty(cue_detail(&s.domain)),
    );

    // depth
    let depth = (user_turns.saturating_sub(1) as f64 / (DEPTH_FULL_TURNS - 1.0)).clamp(0.0, 1.0);
    push(
        "depth",
        W_DEPTH,
        depth,
        format!("{user_turns} user turn(s)"),
    );

    // small talk
    let greeting = if s.social.hits > 0 {
        shortness(s.words, 12, 30)
    } else {
        0.0
    };
    let factual = if s.factual_opener {
        shortness(s.words, 12, 20)
    } else {
        0.0
    };
    let tiny = if s.words <= 3 { 0.5 } else { 0.0 };
    let raw = greeting.max(factual).max(tiny);
    let technical = code.max(math).max(reasoning).max(domain);
    let small_talk = raw * (1.0 - technical);
    let mut detail = String::new();
    if greeting > 0.0 {
        detail = cue_detail(&s.social);
    }
    if factual > 0.0 {
        sep(&mut detail);
        detail.push_str("short factual question");
    }
    if tiny > 0.0 && greeting == 0.0 && factual == 0.0 {
        detail.push_str("very short message");
    }
    if raw > 0.0 {
        let _ = write!(
            detail,
            "; {} word(s); damped by technical cues {:.3}",
            s.words, technical
        );
    } else {
        let _ = write!(detail, "none; {} word(s)", s.words);
    }
    push("small_talk", W_SMALL_TALK, small_talk, detail);

    (total.clamp(0.0, 1.0), features)
}

fn sep(s: &mut String) {
    if !s.is_empty() {
        s.push_str(", ");
    }
}

fn add_count(s: &mut String, n: usize, what: &str) {
    if n > 0 {
        sep(s);
        let _ = write!(s, "{n} {what}");
    }
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "no cues".into() } else { s }
}

fn cue_detail(e: &Evidence) -> String {
    let mut s = String::new();
    if e.hits > 0 {
        let _ = write!(s, "{} cue(s) ({}", e.hits, e.words.join(", "));
        if e.hits > e.words.len() {
            s.push_str(", …");
        }
        s.push(')');
    }
    s
}

/// Summed evidence of one class of cue words, with the first few distinct cues for the detail.
#[derive(Debug, Default)]
struct Evidence {
    total: f64,
    hits: usize,
    words: Vec<&'static str>,
}

impl Evidence {
    fn add(&mut self, cue: &'static str, weight: f64) {
        self.total += weight;
        self.hits += 1;
        if self.words.len() < 4 && !self.words.contains(&cue) {
            self.words.push(cue);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PendingOp {
    op: char,
    left_digit: bool,
    left_operand: bool,
    tight_left: bool,
}

/// One pass over a message's text: words, cue words, phrases and symbols.
#[derive(Debug)]
struct Scanner {
    words: usize,
    questions: usize,
    factual_opener: bool,
    code: Evidence,
    math: Evidence,
    reasoning: Evidence,
    domain: Evidence,
    social: Evidence,
    fences: usize,
    inline_ticks: usize,
    operators: usize,
    braces: usize,
    semicolon_lines: usize,
    indented_lines: usize,
    identifiers: usize,
    calls: usize,
    arithmetic: usize,
    math_glyphs: usize,
    latex: usize,
    // tokenizer state
    scanned: usize,
    cur: String,
    prev1: String,
    prev2: String,
    word_alpha: bool,
    word_underscore: bool,
    word_camel: bool,
    word_after_backslash: bool,
    /// Inside a Windows path (`D:\app\log`) until the next space: its backslash-words are not
    /// LaTeX commands (`\log`, `\in`).
    in_path: bool,
    last_lower: bool,
    prev: char,
    /// The two characters before `prev`.
    before_prev: [char; 2],
    prev_nonspace: char,
    ticks: usize,
    at_line_start: bool,
    indent: usize,
    line_last: char,
    pending: Option<PendingOp>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            words: 0,
            questions: 0,
            factual_opener: false,
            code: Evidence::default(),
            math: Evidence::default(),
            reasoning: Evidence::default(),
            domain: Evidence::default(),
            social: Evidence::default(),
            fences: 0,
            inline_ticks: 0,
            operators: 0,
            braces: 0,
            semicolon_lines: 0,
            indented_lines: 0,
            identifiers: 0,
            calls: 0,
            arithmetic: 0,
            math_glyphs: 0,
            latex: 0,
            scanned: 0,
            cur: String::new(),
            prev1: String::new(),
            prev2: String::new(),
            word_alpha: false,
            word_underscore: false,
            word_camel: false,
            word_after_backslash: false,
            in_path: false,
            last_lower: false,
            prev: '\n',
            before_prev: ['\n'; 2],
            prev_nonspace: '\n',
            ticks: 0,
            at_line_start: true,
            indent: 0,
            line_last: '\n',
            pending: None,
        }
    }
}

/// Bytes of the last user message the text features read (the `length` feature counts all).
const MAX_SCAN_BYTES: usize = 64 * 1024;

const MATH_GLYPHS: &str = "∫∑∏√∞≤≥≠≈∂∇π∈∀∃±θλσμ";
/// LaTeX commands that count without an argument after them.
const LATEX_COMMANDS: &[&str] = &[
    "alpha",
    "approx",
    "beta",
    "cap",
    "cdot",
    "cdots",
    "cos",
    "cup",
    "delta",
    "epsilon",
    "exists",
    "forall",
    "frac",
    "gamma",
    "geq",
    "in",
    "infty",
    "int",
    "lambda",
    "langle",
    "ldots",
    "leq",
    "lim",
    "log",
    "mathbb",
    "mathbf",
    "mathrm",
    "mu",
    "nabla",
    "neq",
    "omega",
    "partial",
    "phi",
    "pi",
    "pm",
    "prod",
    "rangle",
    "rightarrow",
    "sigma",
    "sin",
    "sqrt",
    "subset",
    "sum",
    "tan",
    "theta",
    "times",
    "to",
    "vec",
];
const ARITHMETIC_OPS: &str = "+-*/^=×÷";

impl Scanner {
    /// Scans one piece of text; pieces are separated as if by a newline. Past
    /// [`MAX_SCAN_BYTES`] the rest is skipped: evidence has long saturated by then.
    fn feed(&mut self, text: &str) {
        for c in text.chars() {
            if self.scanned >= MAX_SCAN_BYTES {
                break;
            }
            self.scanned += c.len_utf8();
            self.step(c);
        }
        self.step('\n');
    }

    fn step(&mut self, c: char) {
        // Backtick runs: three or more open or close a fence, shorter ones delimit inline code.
        if c == '`' {
            self.ticks += 1;
        } else if self.ticks > 0 {
            if self.ticks >= 3 {
                self.fences += 1;
            } else {
                self.inline_ticks += 1;
            }
            self.ticks = 0;
        }

        // Lines: a trailing `;`, indentation.
        if c == '\n' {
            if self.line_last == ';' {
                self.semicolon_lines += 1;
            }
            self.at_line_start = true;
            self.indent = 0;
            self.line_last = '\n';
        } else if self.at_line_start {
            match c {
                ' ' => self.indent += 1,
                '\t' => self.indent += 4,
                _ => {
                    if self.indent >= 4 && !c.is_whitespace() {
                        self.indented_lines += 1;
                    }
                    self.at_line_start = false;
                }
            }
        }

        // An arithmetic operator waiting for its right operand.
        if !c.is_whitespace()
            && let Some(op) = self.pending.take()
        {
            let right_digit = c.is_ascii_digit();
            let right_operand = c.is_alphanumeric() || c == '(';
            let tight_right = !self.prev.is_whitespace();
            let date_like = matches!(op.op, '-' | '/')
                && op.left_digit
                && right_digit
                && op.tight_left
                && tight_right;
            if op.left_operand && right_operand && (op.left_digit || right_digit) && !date_like {
                self.arithmetic += 1;
            }
        }

        if unspaced(c) {
            // Scripts written without spaces: each character counts as a word, and it ends an
            // embedded Latin word (`用python写` holds the word `python`).
            if !self.cur.is_empty() {
                self.end_word(c);
            }
            self.cur.push(c);
            self.word_alpha = true;
            self.end_word(' ');
        } else if c.is_alphanumeric() || c == '_' {
            if self.cur.is_empty() {
                self.word_after_backslash = self.prev == '\\';
            }
            if c == '_' {
                self.word_underscore = true;
            }
            if c.is_uppercase() && self.last_lower {
                self.word_camel = true;
            }
            self.last_lower = c.is_lowercase();
            if c.is_alphabetic() {
                self.word_alpha = true;
            }
            for l in c.to_lowercase() {
                self.cur.push(l);
            }
        } else if (c == '\'' || c == '\u{2019}') && !self.cur.is_empty() {
            // An apostrophe inside a word (`what's`, `don't`) is dropped.
        } else {
            if !self.cur.is_empty() {
                self.end_word(c);
            }
            self.symbol(c);
        }

        if c.is_whitespace() {
            self.in_path = false;
        } else {
            self.line_last = c;
            self.prev_nonspace = c;
            // A drive letter opens a path: `D:\` after a space, a quote, a bracket or the start
            // (not `$f:\mathbb`).
            if c == '\\'
                && self.prev == ':'
                && self.before_prev[1].is_ascii_alphabetic()
                && (self.before_prev[0].is_whitespace()
                    || matches!(self.before_prev[0], '"' | '\'' | '`' | '(' | '[' | '<'))
            {
                self.in_path = true;
            }
        }
        self.before_prev = [self.before_prev[1], self.prev];
        self.prev = c;
    }

    fn symbol(&mut self, c: char) {
        match (self.prev, c) {
            ('=', '>')
            | ('-', '>')
            | (':', ':')
            | ('=', '=')
            | ('!', '=')
            | ('&', '&')
            | ('|', '|')
            | ('<', '/')
            | ('+', '=') => self.operators += 1,
            ('$', '$') => self.latex += 1,
            _ => {}
        }
        match c {
            '{' | '}' => self.braces += 1,
            '?' if self.prev != '?' => self.questions += 1,
            _ => {}
        }
        if MATH_GLYPHS.contains(c) {
            self.math_glyphs += 1;
        }
        if ARITHMETIC_OPS.contains(c) {
            let left = self.prev_nonspace;
            self.pending = Some(PendingOp {
                op: c,
                left_digit: left.is_ascii_digit(),
                left_operand: left.is_alphanumeric() || left == ')',
                tight_left: !self.prev.is_whitespace(),
            });
        }
    }

    fn end_word(&mut self, next: char) {
        let mut word = std::mem::take(&mut self.cur);
        self.words += 1;
        if self.words == 1 {
            self.factual_opener = FACTUAL_OPENERS.contains(&word.as_str());
        } else if self.words == 2 && self.prev1 == "how" {
            self.factual_opener |= HOW_FACTUAL.contains(&word.as_str());
        }
        if self.word_alpha {
            if self.word_underscore || self.word_camel {
                self.identifiers += 1;
            }
            if next == '(' && !self.word_after_backslash {
                self.calls += 1;
            }
            // A LaTeX command: a known one, or one taking an argument (`\frac{`, `\hat{`,
            // `\sum_`); not any backslash-word (`C:\Users\Anna`, `\n`).
            if self.word_after_backslash
                && word.len() >= 2
                && (matches!(next, '{' | '_' | '^')
                    || (!self.in_path && LATEX_COMMANDS.contains(&word.as_str())))
            {
                self.latex += 1;
            } else if let Some((cue, class, weight)) = lookup(&word) {
                self.evidence(class).add(cue, weight);
            }
            if let Some(p) = match_phrase(&self.prev2, &self.prev1, &word) {
                self.evidence(p.class).add(&p.label, p.weight);
            }
        }
        // Rotate the word buffers without allocating: prev2 <- prev1 <- word.
        std::mem::swap(&mut self.prev2, &mut self.prev1);
        std::mem::swap(&mut self.prev1, &mut word);
        word.clear();
        self.cur = word;
        self.word_alpha = false;
        self.word_underscore = false;
        self.word_camel = false;
        self.word_after_backslash = false;
        self.last_lower = false;
    }

    fn evidence(&mut self, class: Class) -> &mut Evidence {
        match class {
            Class::Code => &mut self.code,
            Class::Math => &mut self.math,
            Class::Reasoning => &mut self.reasoning,
            Class::Domain => &mut self.domain,
            Class::Social => &mut self.social,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Code,
    Math,
    Reasoning,
    Domain,
    Social,
}

/// Whether `c` belongs to a script written without spaces between words (Chinese, Japanese
/// kana, Thai, Lao, Khmer, Myanmar): the scanner counts such characters one by one.
fn unspaced(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30FF}'     // Hiragana, Katakana
        | '\u{31F0}'..='\u{31FF}'   // Katakana extensions
        | '\u{3400}'..='\u{4DBF}'   // CJK extension A
        | '\u{4E00}'..='\u{9FFF}'   // CJK unified ideographs
        | '\u{F900}'..='\u{FAFF}'   // CJK compatibility ideographs
        | '\u{20000}'..='\u{2EBEF}' // CJK extensions B–F
        | '\u{0E00}'..='\u{0EFF}'   // Thai, Lao
        | '\u{1000}'..='\u{109F}'   // Myanmar
        | '\u{1780}'..='\u{17FF}'   // Khmer
    )
}

/// First words that make a short message a factual question.
const FACTUAL_OPENERS: &[&str] = &[
    "what",
    "whats",
    "who",
    "whos",
    "whose",
    "when",
    "where",
    "wheres",
    "which",
    "define",
    "name",
    "translate",
    "is",
    "are",
    "was",
    "were",
    "does",
    "did",
    "spell",
    "list",
];

/// Second words after `how` that make a factual question (`how many`, `how old`).
const HOW_FACTUAL: &[&str] = &[
    "many", "much", "old", "tall", "far", "long", "big", "deep", "large", "often", "high", "fast",
    "heavy",
];

/// Cue words, stems and phrases, one group per line: `class weight: entries`. An entry is a
/// lowercase word, a stem ending in `*` (`indemnif*` matches `indemnify`, `indemnification`), or
/// a phrase of two or three words joined by `_` (`trade_off` matches `trade-off`).
const LEXICON: &str = "\
code 0.9: python rust rustc javascript typescript java kotlin golang cpp csharp haskell php
code 0.9: scala bash powershell sql mysql postgres postgresql sqlite html css regex regexp
code 0.9: django numpy pytorch tensorflow docker dockerfile git npm unittest pytest webpack
code 0.9: graphql codebase compile compiler compiles compiling debug debugging debugger
code 0.9: traceback stacktrace segfault mutex struct enum impl fn println printf stdout stderr
code 0.9: nullptr refactor refactoring kubectl localhost stack_trace race_condition memory_leak
code 0.8: code coding programming recursion async deadlock multithread* linked_list
code 0.8: binary_search hash_map hash_table pull_request unit_test unit_tests time_complexity
code 0.7: json yaml xml pandas github implement exception panicked recursive concurrency def
code 0.7: iterator data_structure
code 0.6: cargo ruby perl react flask pip linux implementation snippet function bug buggy
code 0.6: runtime algorithm await api endpoint http backend frontend boolean pointer const
code 0.6: parser repo microservice sdk cli command_line shell_script
code 0.5: program script variable syntax concurrent database schema deploy array lambda caching
code 0.4: method class import thread server framework parse cache scalability
code 0.3: error query library string integer loop latency distributed
math 0.9: integral derivative theorem lemma corollary probability determinant polynomial
math 0.9: logarithm calculus trigonometry combinatorics factorial quadratic eigen*
math 0.8: prove proof matrix matrices equation algebra topology permutation irrational bayes
math 0.8: bayesian sqrt dx asymptotic stochastic expected_value standard_deviation
math 0.7: differentiate differential geometry modulo variance converge convergence cos exponent
math 0.7: denominator numerator
math 0.6: integrate dy statistics statistical sin exponential gradient geometric theta
math 0.6: square_root
math 0.5: inequality solve calculate vector regression hypothesis arithmetic optimization
math 0.4: compute prime tan fraction
math 0.3: limit log percentage
reasoning 0.8: tradeoff step_by_step trade_off trade_offs
reasoning 0.7: analyze analyse analysis compare comparison evaluate assess design architect
reasoning 0.7: architecture derive justify critique critically hypothesize first_principles
reasoning 0.7: root_cause
reasoning 0.6: contrast evaluation assessment strategy optimize optimise implications
reasoning 0.6: prioritize argue investigate thesis nuanced rigorous pros_and_cons in_depth
reasoning 0.6: think_through walk_me_through
reasoning 0.5: consequences recommend recommendation argument essay comprehensive thorough
reasoning 0.5: thoroughly reasoning
reasoning 0.4: plan planning brainstorm research detailed elaborate discuss versus vs impact
reasoning 0.4: scenario what_if
reasoning 0.35: why explain
reasoning 0.3: roadmap describe difference pros
domain 0.9: jurisdiction statute statutory gdpr hipaa ccpa lawsuit litigation plaintiff
domain 0.9: defendant tort subpoena dosage prognosis pathology oncology biopsy valuation ebitda
domain 0.9: dcf irr npv annuity ifrs gaap fiduciary indemnif* contraindicat* capital_gains
domain 0.9: balance_sheet
domain 0.8: clause liability liabilities liable negligence arbitration nda enforceable
domain 0.8: medication prescription prescribe clinical cardiac insulin antibiotic pediatric
domain 0.8: tumor hypertension taxable depreciation hedging dividend securities 401k amortiz*
domain 0.8: amortis* due_diligence intellectual_property non_compete
domain 0.7: contract compliance compliant attorney lawyer regulatory dose symptom patient
domain 0.7: syndrome diabetes tax portfolio mortgage liquidity diagnos* pharmac* cash_flow
domain 0.7: side_effects
domain 0.6: copyright trademark patent tenant landlord legal legally regulation warranty breach
domain 0.6: precedent treatment disease chronic mg therapy pregnancy cancer deduction
domain 0.6: deductible derivatives hedge equity roi audit accounting ledger blood_pressure
domain 0.5: agreement court lease investment interest_rate
domain 0.4: inflation revenue
domain 0.3: interaction
social 1.0: hi hello hey heya hiya howdy yo greetings thanks thank thx ty cheers bye goodbye
social 1.0: cya morning evening lol haha hehe ok okay cool nice awesome sup joke funny weather
social 1.0: weekend favorite favourite bored hobby welcome sorry how_are_you whats_up
social 1.0: good_night nice_to_meet
";

#[derive(Debug, Default)]
struct Lexicon {
    words: HashMap<&'static str, (Class, f64)>,
    stems: Vec<(&'static str, Class, f64)>,
    phrases: Vec<LexPhrase>,
}

#[derive(Debug)]
struct LexPhrase {
    words: Vec<&'static str>,
    label: String,
    class: Class,
    weight: f64,
}

/// Parses [`LEXICON`]-style text; lines that do not parse are skipped and reported.
fn parse_lexicon(text: &'static str) -> (Lexicon, Vec<String>) {
    let mut lex = Lexicon::default();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((head, entries)) = line.split_once(':') else {
            errors.push(format!("line {}: no `:`", n + 1));
            continue;
        };
        let mut head = head.split_whitespace();
        let class = match head.next() {
            Some("code") => Class::Code,
            Some("math") => Class::Math,
            Some("reasoning") => Class::Reasoning,
            Some("domain") => Class::Domain,
            Some("social") => Class::Social,
            other => {
                errors.push(format!("line {}: unknown class {other:?}", n + 1));
                continue;
            }
        };
        let weight = match head.next().map(str::parse::<f64>) {
            Some(Ok(w)) if w > 0.0 && w <= 1.0 && head.next().is_none() => w,
            _ => {
                errors.push(format!("line {}: bad weight", n + 1));
                continue;
            }
        };
        for entry in entries.split_whitespace() {
            if let Some(stem) = entry.strip_suffix('*') {
                lex.stems.push((stem, class, weight));
            } else if entry.contains('_') {
                let words: Vec<&'static str> = entry.split('_').collect();
                if !(2..=3).contains(&words.len()) || words.iter().any(|w| w.is_empty()) {
                    errors.push(format!("line {}: bad phrase `{entry}`", n + 1));
                    continue;
                }
                lex.phrases.push(LexPhrase {
                    label: words.join(" "),
                    words,
                    class,
                    weight,
                });
            } else if lex.words.insert(entry, (class, weight)).is_some() {
                errors.push(format!("line {}: `{entry}` is listed twice", n + 1));
            }
        }
    }
    (lex, errors)
}

fn lexicon() -> &'static Lexicon {
    static LEX: OnceLock<Lexicon> = OnceLock::new();
    LEX.get_or_init(|| {
        let (lex, errors) = parse_lexicon(LEXICON);
        for e in errors {
            tracing::error!("complexity lexicon: {e}");
        }
        lex
    })
}

/// The cue a lowercase word stands for: itself, its singular (`bugs`), or a stem.
fn lookup(word: &str) -> Option<(&'static str, Class, f64)> {
    let lex = lexicon();
    if let Some((k, &(class, w))) = lex.words.get_key_value(word) {
        return Some((k, class, w));
    }
    if word.len() > 3
        && let Some(singular) = word.strip_suffix('s')
        && !singular.ends_with('s')
        && let Some((k, &(class, w))) = lex.words.get_key_value(singular)
    {
        return Some((k, class, w));
    }
    lex.stems
        .iter()
        .find(|(stem, _, _)| word.starts_with(stem))
        .copied()
}

/// The phrase ending with `word`, given the two words before it.
fn match_phrase(prev2: &str, prev1: &str, word: &str) -> Option<&'static LexPhrase> {
    lexicon().phrases.iter().find(|p| match p.words.as_slice() {
        [a, b] => prev1 == *a && word == *b,
        [a, b, c] => prev2 == *a && prev1 == *b && word == *c,
        _ => false,
    })
}

// ---------------------------------------------------------------------------------------------
// kNN
// ---------------------------------------------------------------------------------------------

const STOPWORDS: &[&str] = &[
    "a", "about", "after", "all", "also", "am", "an", "and", "any", "are", "as", "at", "be",
    "been", "but", "by", "can", "could", "did", "do", "does", "for", "from", "had", "has", "have",
    "he", "her", "here", "him", "his", "how", "i", "if", "im", "in", "into", "is", "it", "its",
    "just", "me", "my", "no", "not", "of", "on", "or", "our", "out", "please", "she", "so", "some",
    "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those",
    "to", "up", "us", "was", "we", "were", "what", "when", "where", "which", "who", "why", "will",
    "with", "would", "you", "your",
];

/// Calls `f` with each kNN term of `text`: lowercase alphanumeric words of two or more
/// characters, stop words dropped, a trailing plural `s` removed; in scripts written without
/// spaces (Chinese, Japanese, Thai, …), each pair of neighbouring characters (a character alone
/// when it has no neighbour in its script).
fn for_each_term(text: &str, buf: &mut String, f: &mut impl FnMut(&str)) {
    buf.clear();
    // The previous character of an unspaced run, and whether it began the run.
    let mut run: Option<(char, bool)> = None;
    let mut pair = String::new();
    let end_run = |run: &mut Option<(char, bool)>, f: &mut dyn FnMut(&str)| {
        if let Some((c, true)) = run.take() {
            f(c.encode_utf8(&mut [0; 4]));
        }
    };
    for c in text.chars() {
        if unspaced(c) {
            emit_term(buf, f);
            if let Some((p, _)) = run {
                pair.clear();
                pair.push(p);
                pair.push(c);
                f(&pair);
                run = Some((c, false));
            } else {
                run = Some((c, true));
            }
            continue;
        }
        end_run(&mut run, f);
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                buf.push(l);
            }
        } else if (c == '\'' || c == '\u{2019}') && !buf.is_empty() {
            // dropped inside a word
        } else {
            emit_term(buf, f);
        }
    }
    end_run(&mut run, f);
    emit_term(buf, f);
}

fn emit_term(buf: &mut String, f: &mut impl FnMut(&str)) {
    if buf.is_empty() {
        return;
    }
    if buf.chars().nth(1).is_some() && !STOPWORDS.contains(&buf.as_str()) {
        if buf.len() > 3 && buf.ends_with('s') && !buf.ends_with("ss") {
            buf.pop();
        }
        f(buf);
    }
    buf.clear();
}

#[derive(Debug, Clone, Default)]
struct KnnIndex {
    vocab: HashMap<String, u32>,
    idf: Vec<f64>,
    /// The idf of a word no example has (a document frequency of 0).
    unseen_idf: f64,
    examples: Vec<IndexedExample>,
}

#[derive(Debug, Clone)]
struct IndexedExample {
    tier_index: usize,
    /// The first 80 characters.
    text: String,
    /// Sorted by term id, L2-normalized.
    vector: Vec<(u32, f64)>,
}

impl KnnIndex {
    fn build(examples: &[(usize, &str)]) -> Self {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let mut df: Vec<u32> = Vec::new();
        let mut buf = String::new();
        let mut counted: Vec<Vec<(u32, f64)>> = Vec::with_capacity(examples.len());
        for (_, text) in examples {
            let mut ids: Vec<u32> = Vec::new();
            for_each_term(text, &mut buf, &mut |t| {
                let id = match vocab.get(t) {
                    Some(&id) => id,
                    None => {
                        let id = df.len() as u32;
                        vocab.insert(t.to_string(), id);
                        df.push(0);
                        id
                    }
                };
                ids.push(id);
            });
            let counts = count_ids(&mut ids);
            for &(id, _) in &counts {
                if let Some(d) = df.get_mut(id as usize) {
                    *d += 1;
                }
            }
            counted.push(counts);
        }
        let n = examples.len() as f64;
        let idf_of = |d: u32| ((1.0 + n) / (1.0 + f64::from(d))).ln() + 1.0;
        let idf: Vec<f64> = df.iter().map(|&d| idf_of(d)).collect();
        let unseen_idf = idf_of(0);
        let examples = examples
            .iter()
            .zip(counted)
            .map(|(&(tier_index, text), counts)| IndexedExample {
                tier_index,
                text: text.chars().take(80).collect(),
                vector: weigh(counts, &idf, unseen_idf),
            })
            .collect();
        KnnIndex {
            vocab,
            idf,
            unseen_idf,
            examples,
        }
    }

    /// The TF-IDF vector of a message's text; `None` when no word is in the vocabulary.
    /// Words the examples do not have count too, with the weight of a word no example has:
    /// they match no example, but they make the text's vector longer, so a long request that
    /// merely contains an example's words is not taken for that example.
    fn vectorize(&self, msg: &Message) -> Option<Vec<(u32, f64)>> {
        let mut ids = Vec::new();
        let mut unseen: HashMap<String, u32> = HashMap::new();
        let mut known = false;
        let mut buf = String::new();
        // Like the features, from the first MAX_SCAN_BYTES of text: a match has long been
        // decided by then, and a huge prompt costs no more.
        let mut budget = MAX_SCAN_BYTES;
        for_each_text(msg, |text| {
            let mut end = text.len().min(budget);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            budget -= end;
            for_each_term(&text[..end], &mut buf, &mut |t| {
                if let Some(&id) = self.vocab.get(t) {
                    known = true;
                    ids.push(id);
                } else if let Some(&id) = unseen.get(t) {
                    ids.push(id);
                } else {
                    let id = u32::try_from(self.idf.len() + unseen.len()).unwrap_or(u32::MAX);
                    unseen.insert(t.to_string(), id);
                    ids.push(id);
                }
            });
        });
        if !known {
            return None;
        }
        let v = weigh(count_ids(&mut ids), &self.idf, self.unseen_idf);
        if v.is_empty() { None } else { Some(v) }
    }
}

/// Sorted `(id, count)` pairs of a list of ids.
fn count_ids(ids: &mut [u32]) -> Vec<(u32, f64)> {
    ids.sort_unstable();
    let mut out: Vec<(u32, f64)> = Vec::new();
    for &id in ids.iter() {
        match out.last_mut() {
            Some((last, c)) if *last == id => *c += 1.0,
            _ => out.push((id, 1.0)),
        }
    }
    out
}

/// Counts times idf, L2-normalized. An id past the vocabulary is a word no example has, weighed
/// by `unseen`.
fn weigh(mut counts: Vec<(u32, f64)>, idf: &[f64], unseen: f64) -> Vec<(u32, f64)> {
    for (id, w) in counts.iter_mut() {
        *w *= idf.get(*id as usize).copied().unwrap_or(unseen);
    }
    let norm = counts.iter().map(|(_, w)| w * w).sum::<f64>().sqrt();
    if norm > 0.0 {
        for (_, w) in counts.iter_mut() {
            *w /= norm;
        }
        counts
    } else {
        Vec::new()
    }
}

/// Dot product of two sparse vectors sorted by id.
fn dot(a: &[(u32, f64)], b: &[(u32, f64)]) -> f64 {
    let (mut i, mut j, mut s) = (0, 0, 0.0);
    while let (Some(&(ia, wa)), Some(&(ib, wb))) = (a.get(i), b.get(j)) {
        match ia.cmp(&ib) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                s += wa * wb;
                i += 1;
                j += 1;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_types::openai::ContentPart;

    fn tier(name: &str, model: &str, max: Option<f64>) -> TierConfig {
        TierConfig {
            name: name.into(),
            model: model.into(),
            max_score: max,
        }
    }

    fn config(tiers: Vec<TierConfig>) -> ComplexityConfig {
        ComplexityConfig {
            tiers,
            examples: Vec::new(),
            k: default_k(),
            knn_weight: default_knn_weight(),
        }
    }

    /// The two-tier setup the labelled set is scored against.
    fn two_tiers() -> ComplexityConfig {
        config(vec![
            tier("small", "gpt-4o-mini", Some(0.35)),
            tier("strong", "gpt-4o", None),
        ])
    }

    fn request(messages: Vec<Message>) -> ChatRequest {
        serde_json::from_value(serde_json::json!({"model": "auto", "messages": []}))
            .map(|mut r: ChatRequest| {
                r.messages = messages;
                r
            })
            .expect("request")
    }

    fn feature<'a>(d: &'a Decision, name: &str) -> &'a Feature {
        d.features.iter().find(|f| f.name == name).expect("feature")
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Kind {
        Greeting,
        Fact,
        Code,
        Math,
        Reasoning,
        Domain,
        Long,
        Other,
    }

    fn labelled_set() -> Vec<(Kind, &'static str, String)> {
        use Kind::*;
        let doc = "The team met on Tuesday to review the quarterly schedule. Marketing presented \
                   the new launch calendar and the sales group shared feedback from regional \
                   partners about the spring campaign.\n"
            .repeat(80);
        let long = format!("{doc}\nSummarize the key decisions in the notes above.");
        let s = |k: Kind, t: &'static str, p: &str| (k, t, p.to_string());
        vec![
            s(Greeting, "small", "Hi!"),
            s(Greeting, "small", "Hello, how are you today?"),
            s(Greeting, "small", "Thanks a lot, that was really helpful!"),
            s(
                Greeting,
                "small",
                "Good morning! Hope you're having a nice weekend.",
            ),
            s(Greeting, "small", "hey what's up"),
            s(Greeting, "small", "Bye, talk to you later!"),
            s(Greeting, "small", "Tell me a funny joke about cats"),
            s(Greeting, "small", "Good evening, hope your day went well"),
            s(Greeting, "small", "lol that's hilarious"),
            s(Fact, "small", "Who painted the Mona Lisa?"),
            s(Fact, "small", "What year did the Berlin Wall fall?"),
            s(Other, "small", "Suggest a name for my new puppy"),
            s(
                Other,
                "small",
                "Write a short birthday message for my sister",
            ),
            s(
                Code,
                "strong",
                "Convert this promise chain to async/await: fetch(url).then(r => r.json()).then(data => console.log(data))",
            ),
            s(
                Code,
                "strong",
                "My Docker container exits immediately with code 137, what does that mean?",
            ),
            s(
                Code,
                "strong",
                "Write unit tests for a function that validates email addresses",
            ),
            s(Math, "strong", "Solve for x: 3x + 7 = 22"),
            s(
                Reasoning,
                "strong",
                "Should our team migrate from REST to gRPC? Walk me through the decision.",
            ),
            s(
                Domain,
                "strong",
                "What are the side effects of combining ibuprofen with lisinopril for a patient with kidney disease?",
            ),
            s(
                Domain,
                "strong",
                "Can my landlord keep my security deposit for normal wear and tear in California?",
            ),
            s(Fact, "small", "What is the capital of France?"),
            s(Fact, "small", "Who wrote Pride and Prejudice?"),
            s(Fact, "small", "When did World War II end?"),
            s(Fact, "small", "How many legs does a spider have?"),
            s(
                Fact,
                "small",
                "What's the boiling point of water in Fahrenheit?",
            ),
            s(Fact, "small", "Translate 'good night' into Spanish"),
            s(Fact, "small", "What is 12 + 30?"),
            s(Fact, "small", "Give me a synonym for happy"),
            s(Other, "small", "Why is the sky blue?"),
            s(Other, "small", "Write a haiku about autumn leaves"),
            s(Other, "small", "Recommend a good novel for a long flight"),
            s(
                Other,
                "small",
                "Rewrite this sentence to sound friendlier: Your order will ship next week.",
            ),
            s(
                Code,
                "strong",
                "Write a Python function that parses a CSV file and returns the average of each column.",
            ),
            s(
                Code,
                "strong",
                "Why does this fail?\n```\nfn main() {\n    let s = String::from(\"a\");\n    let t = s;\n    println!(\"{}\", s);\n}\n```",
            ),
            s(
                Code,
                "strong",
                "Fix the bug: `arr.map(x => x * 2).filter(x => x > 3)` returns an empty list",
            ),
            s(
                Code,
                "strong",
                "Traceback (most recent call last):\n  File \"app.py\", line 3, in <module>\n    import pandas as pd\nModuleNotFoundError: No module named 'pandas'",
            ),
            s(
                Code,
                "strong",
                "Write a SQL query that returns the top 5 customers by total order value in 2023.",
            ),
            s(
                Code,
                "strong",
                "Implement a thread-safe LRU cache in Go with generics.",
            ),
            s(
                Code,
                "strong",
                "Write a regex that matches valid IPv4 addresses",
            ),
            s(
                Code,
                "strong",
                "Refactor this to use dependency injection: class UserService { constructor() { this.db = new Database(); } }",
            ),
            s(Code, "strong", "How do I reverse a linked list in place?"),
            s(
                Math,
                "strong",
                "Compute the integral of x^2 * sin(x) dx from 0 to pi.",
            ),
            s(
                Math,
                "strong",
                "Prove that the square root of 2 is irrational.",
            ),
            s(
                Math,
                "strong",
                "A bag has 3 red and 5 blue balls. What is the probability of drawing two red balls without replacement?",
            ),
            s(
                Math,
                "strong",
                "Find the eigenvalues of the matrix [[2, 1], [1, 2]].",
            ),
            s(
                Reasoning,
                "strong",
                "Compare the trade-offs between microservices and a monolith for a five-person startup, and recommend an architecture.",
            ),
            s(
                Reasoning,
                "strong",
                "Explain step by step how a bill becomes a law in the United States, and analyze why so few bills pass.",
            ),
            s(
                Reasoning,
                "strong",
                "Design a database schema and caching strategy for a social network feed that serves 10 million users.",
            ),
            s(
                Reasoning,
                "strong",
                "What are the pros and cons of nuclear power versus solar for a country's energy strategy? Consider cost, safety and emissions.",
            ),
            s(
                Domain,
                "strong",
                "Review this contract clause for liability risks: 'The Supplier shall indemnify the Customer against all losses arising from breach of this Agreement.'",
            ),
            s(
                Domain,
                "strong",
                "My patient is on warfarin; what dosage adjustments are needed when starting amiodarone, and what are the interaction risks?",
            ),
            s(
                Domain,
                "strong",
                "How should I account for deferred tax liabilities in a DCF valuation of a SaaS company?",
            ),
            s(
                Domain,
                "strong",
                "Is this GDPR compliant? We store EU customer emails on US servers without a data processing agreement.",
            ),
            (Long, "strong", long),
        ]
    }

    #[test]
    fn labelled_set_is_routed_right() {
        let c = Classifier::new(&two_tiers()).expect("valid");
        let set = labelled_set();
        assert!(set.len() >= 30);
        let mut wrong = Vec::new();
        let mut right = 0;
        for (kind, want, prompt) in &set {
            let d = c.classify_text(prompt);
            if d.tier == *want {
                right += 1;
            } else {
                let short: String = prompt.chars().take(70).collect();
                wrong.push(format!(
                    "{kind:?} {short:?}: want {want}, got {} ({})",
                    d.tier, d.score
                ));
                assert!(
                    !matches!(kind, Kind::Greeting | Kind::Code),
                    "every greeting must go small and every code request strong: {:?} -> {}\n{}",
                    short,
                    d.tier,
                    d.explain()
                );
            }
        }
        let accuracy = right as f64 / set.len() as f64;
        assert!(
            accuracy >= 0.9,
            "accuracy {accuracy:.3}; misclassified:\n{}",
            wrong.join("\n")
        );
        if !wrong.is_empty() {
            eprintln!("misclassified:\n{}", wrong.join("\n"));
        }
    }

    #[test]
    fn features_come_in_a_fixed_order_and_explain() {
        let c = Classifier::new(&two_tiers()).expect("valid");
        let d = c.classify_text("Write a Python function that sorts a list of tuples.");
        let names: Vec<&str> = d.features.iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                "length",
                "code",
                "math",
                "reasoning",
                "domain",
                "depth",
                "small_talk"
            ]
        );
        assert_eq!(d.tier, "strong");
        assert_eq!(d.tier_index, 1);
        assert_eq!(d.model, "gpt-4o");
        assert!(feature(&d, "code").contribution > 0.35);
        assert!(feature(&d, "code").detail.contains("python"));
        let hi = c.classify_text("hello there!");
        assert!(feature(&hi, "small_talk").contribution < 0.0);
        assert_eq!(hi.score, 0.0);
        // No negative zeros in the output.
        assert!(
            d.features
                .iter()
                .all(|f| !(f.contribution == 0.0 && f.contribution.is_sign_negative()))
        );
        assert!(!d.explain().contains("-0.000"), "{}", d.explain());
        for f in &d.features {
            assert!((0.0..=1.0).contains(&f.value), "{f:?}");
        }
    }

    #[test]
    fn header_is_ascii_and_explain_names_every_feature() {
        let c = Classifier::new(&config(vec![
            tier("petit\u{e9}", "small;model", Some(0.3)),
            tier("strong", "gpt-4o", None),
        ]))
        .expect("valid");
        let d = c.classify_text("hi\nthere");
        let h = d.header_value();
        assert!(h.is_ascii(), "{h}");
        assert!(!h.contains('\n') && !h.contains('\r'), "{h}");
        assert_eq!(h, "tier=petit_; model=small_model; score=0.000");
        let strong =
            c.classify_text("Prove the theorem by induction: the sum of 1..n is n(n+1)/2.");
        assert_eq!(
            strong.header_value(),
            format!("tier=strong; model=gpt-4o; score={:.3}", strong.score)
        );
        let e = strong.explain();
        for f in &strong.features {
            assert!(e.contains(f.name), "{e}");
        }
        assert!(
            e.starts_with("tier strong (#1) -> model gpt-4o; score "),
            "{e}"
        );
        assert!(e.contains("neighbours: none"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_key() {
        let err = |cfg: ComplexityConfig| Classifier::new(&cfg).expect_err("an error");
        assert_eq!(err(config(vec![])), "tiers: at least one tier is required");
        assert_eq!(
            err(config(vec![tier("", "m", None)])),
            "tiers[0].name: must not be empty"
        );
        assert_eq!(
            err(config(vec![
                tier("a", "m", Some(0.2)),
                tier("a", "n", None)
            ])),
            "tiers[1].name: duplicate tier name `a` (also tiers[0])"
        );
        assert_eq!(
            err(config(vec![tier("a", " ", None)])),
            "tiers[0].model: must not be empty"
        );
        assert_eq!(
            err(config(vec![tier("a", "m", None), tier("b", "n", None)])),
            "tiers[0].max_score: required on every tier but the last"
        );
        assert_eq!(
            err(config(vec![
                tier("a", "m", Some(1.5)),
                tier("b", "n", None)
            ])),
            "tiers[0].max_score: must be a number in [0, 1], got 1.5"
        );
        assert_eq!(
            err(config(vec![
                tier("a", "m", Some(f64::NAN)),
                tier("b", "n", None)
            ])),
            "tiers[0].max_score: must be a number in [0, 1], got NaN"
        );
        assert_eq!(
            err(config(vec![
                tier("a", "m", Some(0.4)),
                tier("b", "n", Some(0.4)),
                tier("c", "o", None)
            ])),
            "tiers[1].max_score: must be greater than tiers[0].max_score (0.4)"
        );
        let mut cfg = two_tiers();
        cfg.k = 0;
        assert_eq!(err(cfg), "k: must be at least 1");
        let mut cfg = two_tiers();
        cfg.knn_weight = 1.5;
        assert_eq!(err(cfg), "knn_weight: must be a number in [0, 1], got 1.5");
        let mut cfg = two_tiers();
        cfg.knn_weight = -0.1;
        assert_eq!(err(cfg), "knn_weight: must be a number in [0, 1], got -0.1");
        let mut cfg = two_tiers();
        cfg.examples = (0..4)
            .map(|i| ExampleConfig {
                text: format!("example {i}"),
                tier: if i == 3 { "huge" } else { "small" }.into(),
            })
            .collect();
        assert_eq!(
            err(cfg),
            "examples[3].tier: no tier `huge`; tiers: small, strong"
        );
        let mut cfg = two_tiers();
        cfg.examples = vec![ExampleConfig {
            text: "  ".into(),
            tier: "small".into(),
        }];
        assert_eq!(err(cfg), "examples[0].text: must not be empty");
    }

    #[test]
    fn last_tier_with_a_max_score_is_still_a_catch_all() {
        let c = Classifier::new(&config(vec![
            tier("small", "a", Some(0.1)),
            tier("strong", "b", Some(0.2)),
        ]))
        .expect("valid");
        let d = c.classify_text(
            "Prove that every bounded monotone sequence converges, using the completeness axiom, step by step.",
        );
        assert!(d.score > 0.2, "{}", d.explain());
        assert_eq!(d.tier, "strong");
        // One tier takes everything.
        let one = Classifier::new(&config(vec![tier("only", "m", None)])).expect("valid");
        assert_eq!(one.classify_text("hi").tier, "only");
        assert_eq!(
            one.classify_text("Prove Fermat's last theorem").tier_index,
            0
        );
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: ComplexityConfig = serde_json::from_value(serde_json::json!({
            "tiers": [{"name": "small", "model": "m", "max_score": 0.3}, {"name": "strong", "model": "n"}]
        }))
        .expect("parses");
        assert_eq!(cfg.k, 5);
        assert_eq!(cfg.knn_weight, 0.5);
        assert!(cfg.examples.is_empty());
        let bad = serde_json::from_value::<ComplexityConfig>(serde_json::json!({
            "tiers": [{"name": "small", "model": "m", "max": 0.3}]
        }));
        assert!(bad.is_err());
    }

    #[test]
    fn three_tiers_pick_the_middle_for_a_middle_score() {
        let c = Classifier::new(&config(vec![
            tier("small", "mini", Some(0.2)),
            tier("medium", "mid", Some(0.5)),
            tier("strong", "big", None),
        ]))
        .expect("valid");
        let mid = c.classify_text("Explain why the sky is blue and compare it with sunsets.");
        assert!(mid.score > 0.2 && mid.score <= 0.5, "{}", mid.explain());
        assert_eq!((mid.tier.as_str(), mid.tier_index), ("medium", 1));
        assert_eq!(mid.model, "mid");
        assert_eq!(c.classify_text("thanks!").tier, "small");
        let hard = c.classify_text(
            "Debug this Python code step by step:\n```python\ndef f(xs):\n    return [x ** 2 for x in xs if x % 2 == 0]\n```\nWhy does it raise a TypeError for None values? Analyze the time complexity too.",
        );
        assert_eq!(hard.tier, "strong", "{}", hard.explain());
    }

    fn kube_config() -> ComplexityConfig {
        let ex = |text: &str, tier: &str| ExampleConfig {
            text: text.into(),
            tier: tier.into(),
        };
        let mut cfg = two_tiers();
        cfg.examples = vec![
            ex(
                "Generate kubernetes manifests for a deployment with three replicas",
                "strong",
            ),
            ex(
                "Write a helm chart and kubernetes manifests with an ingress and autoscaling",
                "strong",
            ),
            ex(
                "Convert these kubernetes manifests to kustomize overlays",
                "strong",
            ),
            ex("hello there, how is your day going", "small"),
            ex("what is the capital of spain", "small"),
            ex("thanks so much for the help", "small"),
        ];
        cfg.k = 3;
        cfg
    }

    #[test]
    fn knn_examples_tip_a_borderline_decision() {
        let prompt = "Set up kubernetes manifests for my web service with a helm chart";
        let plain = Classifier::new(&two_tiers()).expect("valid");
        let before = plain.classify_text(prompt);
        assert_eq!(before.tier, "small", "{}", before.explain());
        assert_eq!(before.knn_score, None);
        assert!(before.neighbours.is_empty());

        let c = Classifier::new(&kube_config()).expect("valid");
        let after = c.classify_text(prompt);
        assert_eq!(after.tier, "strong", "{}", after.explain());
        assert_eq!(after.heuristic_score, before.heuristic_score);
        assert_eq!(after.knn_score, Some(1.0));
        assert!(!after.neighbours.is_empty() && after.neighbours.len() <= 3);
        assert!(after.neighbours.iter().all(|n| n.tier == "strong"));
        assert!(after.neighbours[0].similarity > 0.0);
        assert!(after.neighbours[0].text.contains("kubernetes"));
        let sims: Vec<f64> = after.neighbours.iter().map(|n| n.similarity).collect();
        assert!(sims.windows(2).all(|w| w[0] >= w[1]), "{sims:?}");
        let w = after.knn_weight.expect("a weight");
        assert!(w > 0.5 && w < 1.0, "{w}");
        assert_eq!(
            after.score,
            round3((1.0 - w) * after.heuristic_score + w * 1.0),
            "{}",
            after.explain()
        );
        let e = after.explain();
        assert!(e.contains("kubernetes") && e.contains("knn 1.000"), "{e}");

        // Small-tier examples pull toward small; words no example has leave the heuristic alone.
        let hi = c.classify_text("hello, how is your day?");
        assert_eq!(hi.knn_score, Some(0.0));
        assert_eq!(hi.tier, "small");
        let unknown = c.classify_text("Prove the integral of x^2 dx converges");
        assert_eq!(unknown.knn_score, None);
        assert_eq!(unknown.score, unknown.heuristic_score);
    }

    /// A long request that merely contains an example's words is not that example: words no
    /// example has count in the request's vector (they were dropped, so this maximally complex
    /// request matched "thanks so much for the help" closely and went to the small tier).
    #[test]
    fn an_example_inside_a_long_request_is_a_distant_match() {
        let c = Classifier::new(&kube_config()).expect("valid");
        let d = c.classify_text(
            "Prove step by step that the sum of the first n odd numbers is n^2, then implement \
             a Rust function that checks it for every n below a million, and analyse the \
             contract's liability clause for the vendor. Thanks so much for the help!",
        );
        let nearest = d.neighbours.first().expect("a neighbour");
        assert!(nearest.similarity < 0.5, "{}", d.explain());
        assert_eq!(d.tier, "strong", "{}", d.explain());
        // The example's own text still matches itself.
        let own = c.classify_text("thanks so much for the help");
        assert!(own.neighbours[0].similarity > 0.999, "{}", own.explain());
        assert_eq!(own.tier, "small");
    }

    /// Examples in scripts written without spaces are compared by character pairs (a sentence
    /// was one term, so no two sentences ever matched); an example with no term is refused.
    #[test]
    fn unspaced_scripts_are_compared_by_character_pairs() {
        let mut cfg = two_tiers();
        cfg.examples = vec![ExampleConfig {
            text: "请帮我写一个快速排序算法".into(),
            tier: "strong".into(),
        }];
        let c = Classifier::new(&cfg).expect("valid");
        let d = c.classify_text("请帮我写一个冒泡排序算法");
        assert_eq!(d.knn_score, Some(1.0), "{}", d.explain());
        let mut terms = Vec::new();
        for_each_term("用python写 a 排", &mut String::new(), &mut |t| {
            terms.push(t.to_string())
        });
        assert_eq!(terms, ["用", "python", "写", "排"]);

        cfg.examples = vec![ExampleConfig {
            text: "Who are you?".into(),
            tier: "small".into(),
        }];
        let e = Classifier::new(&cfg).unwrap_err();
        assert!(e.starts_with("examples[0].text:"), "{e}");
    }

    /// A long document or a few images given as parts count toward `length` (they counted as
    /// nothing: "summarize this contract" with a 2 MB PDF went to the small tier).
    #[test]
    fn documents_and_images_count_toward_length() {
        let c = Classifier::new(&two_tiers()).expect("valid");
        let pdf = "JVBERi0xLjcK".repeat(200_000);
        let msg: Message = serde_json::from_value(serde_json::json!({
            "role": "user", "content": [
                {"type": "text", "text": "Summarize this contract."},
                {"type": "file", "file": {"filename": "c.pdf", "file_data": format!("data:application/pdf;base64,{pdf}")}}
            ]
        }))
        .unwrap();
        let d = c.classify(&request(vec![msg]));
        assert!(feature(&d, "length").value > 0.5, "{}", d.explain());
        assert_eq!(d.tier, "strong", "{}", d.explain());
        let image: Message = serde_json::from_value(serde_json::json!({
            "role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            ]
        }))
        .unwrap();
        let d = c.classify(&request(vec![image]));
        assert!(feature(&d, "length").value > 0.0, "{}", d.explain());
    }

    /// Behind a `/v1/messages` tool result with an image, the task is still the user's last own
    /// words, not the message carrying the image.
    #[test]
    fn tool_media_messages_are_not_the_users_turn() {
        let c = Classifier::new(&two_tiers()).expect("valid");
        let task = "Refactor this Python function to use a dataclass:\n```python\ndef f(x):\n    return {'a': x}\n```";
        let messages: Vec<Message> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": task},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "done"},
            {"role": "user", "content": [
                {"type": "text", "text": format!("{}toolu_1]", sluice_types::anthropic::TOOL_MEDIA_LINE)},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
            ]}
        ]))
        .unwrap();
        let alone = c.classify(&request(vec![Message::text(Role::User, task)]));
        let d = c.classify(&request(messages));
        assert_eq!(
            feature(&d, "code").value,
            feature(&alone, "code").value,
            "{}",
            d.explain()
        );
        assert_eq!(feature(&d, "depth").value, feature(&alone, "depth").value);
    }

    /// Backslashes in a Windows path or an escape are not LaTeX.
    #[test]
    fn backslash_words_are_latex_only_when_they_look_it() {
        let mut s = Scanner::default();
        s.feed("Where is C:\\Users\\Anna\\Desktop\\photos? It printed \\u00e9 and \\n.");
        assert_eq!(s.latex, 0, "{s:?}");
        // Path segments that are LaTeX names (`\\log`, `\\in`, `\\int`) are still a path.
        let mut s = Scanner::default();
        s.feed("Why can't I open D:\\app\\log\\in\\today.csv or \"e:\\int\\cap\\x\"?");
        assert_eq!(s.latex, 0, "{s:?}");
        let mut s = Scanner::default();
        s.feed("Show \\sum_{i=1}^n i = \\frac{n(n+1)}{2} and \\alpha \\leq \\hat{x}");
        assert_eq!(s.latex, 5, "{s:?}");
        // A path ends at a space; a colon before a backslash elsewhere is no path.
        let mut s = Scanner::default();
        s.feed("D:\\data then \\log x, and f:\\in; x\\in\\mathbb{R}, ab:\\cap");
        assert_eq!(s.latex, 4, "{s:?}");
        // A math colon is no drive letter, and a command taking an argument is LaTeX anywhere.
        let mut s = Scanner::default();
        s.feed("Let $f:\\mathbb{R}\\to\\mathbb{R}$ be continuous, and C:\\x\\frac{1}{2}");
        assert_eq!(s.latex, 4, "{s:?}");
    }

    /// An example's own text goes to the example's tier with the default weight, even with no
    /// heuristic cue and three tiers (it was halved toward the first tier: the strong example
    /// went to the middle tier, the middle one to the first).
    #[test]
    fn an_examples_own_text_goes_to_its_tier() {
        let mut cfg = config(vec![
            tier("small", "s", Some(0.3)),
            tier("mid", "m", Some(0.6)),
            tier("strong", "l", None),
        ]);
        let ex = |text: &str, tier: &str| ExampleConfig {
            text: text.into(),
            tier: tier.into(),
        };
        cfg.examples = vec![
            ex("write a helm chart for this service", "strong"),
            ex("summarize this email", "mid"),
            ex("thanks, that's all", "small"),
        ];
        let c = Classifier::new(&cfg).expect("valid");
        for e in &cfg.examples {
            let d = c.classify_text(&e.text);
            assert_eq!(d.tier, e.tier, "{}", d.explain());
            assert_eq!(d.knn_weight, Some(1.0), "{}", d.explain());
        }
        // A distant match weighs less than a close one.
        let d = c.classify_text("please summarize the attached quarterly report for my team");
        let w = d.knn_weight.expect("a vote");
        assert!(w > 0.5 && w < 1.0, "{w}");
        // knn_weight = 0 turns the examples off.
        cfg.knn_weight = 0.0;
        let d = Classifier::new(&cfg)
            .unwrap()
            .classify_text("write a helm chart for this service");
        assert_eq!((d.knn_score, d.knn_weight), (None, None));
        assert!(d.neighbours.is_empty());
    }

    /// A middle tier's examples vote inside that tier's band, whatever its thresholds (they
    /// voted at an even grid: 0.5 of three tiers, inside the first tier's band here).
    #[test]
    fn a_middle_tier_example_votes_inside_its_band() {
        let mut cfg = config(vec![
            tier("small", "s", Some(0.6)),
            tier("medium", "m", Some(0.8)),
            tier("strong", "l", None),
        ]);
        cfg.knn_weight = 1.0;
        cfg.examples = vec![
            ExampleConfig {
                text: "convert this csv file to yaml".into(),
                tier: "medium".into(),
            },
            ExampleConfig {
                text: "good morning friend".into(),
                tier: "small".into(),
            },
        ];
        let c = Classifier::new(&cfg).expect("valid");
        let d = c.classify_text("convert this csv file to yaml");
        assert_eq!(d.knn_score, Some(0.7));
        assert_eq!(d.tier, "medium", "{}", d.explain());
        assert_eq!(c.classify_text("good morning").tier, "small");
    }

    #[test]
    fn knn_vectors_are_normalized_tf_idf() {
        let idx = KnnIndex::build(&[(0, "apple banana apple"), (1, "banana cherry")]);
        // idf(apple) = ln(3/2)+1, idf(banana) = ln(3/3)+1 = 1.
        let apple = (1.5f64).ln() + 1.0;
        let a = &idx.examples[0].vector;
        let norm = ((2.0 * apple).powi(2) + 1.0).sqrt();
        assert_eq!(a.len(), 2);
        assert!((a[0].1 - 2.0 * apple / norm).abs() < 1e-12);
        assert!((a[1].1 - 1.0 / norm).abs() < 1e-12);
        let self_sim = dot(a, a);
        assert!((self_sim - 1.0).abs() < 1e-12);
        // "the" is a stop word and "apples" is "apple".
        let q = idx
            .vectorize(&Message::text(Role::User, "the apples"))
            .expect("known word");
        assert_eq!(q.len(), 1);
        assert!(
            idx.vectorize(&Message::text(Role::User, "the zebra"))
                .is_none()
        );
        // A word no example has weighs as a document frequency of 0 would: ln(3/1)+1.
        let q = idx
            .vectorize(&Message::text(Role::User, "apple zebra"))
            .expect("known word");
        let zebra = (3.0f64).ln() + 1.0;
        let norm = (apple * apple + zebra * zebra).sqrt();
        assert_eq!(q.len(), 2);
        assert!((q[0].1 - apple / norm).abs() < 1e-12, "{q:?}");
        assert!((q[1].1 - zebra / norm).abs() < 1e-12, "{q:?}");
        // A huge prompt is read as far as the features are (64 KiB), not whole.
        let huge: String = std::iter::once("apple".to_string())
            .chain((0..300_000).map(|i| format!(" w{i}")))
            .collect();
        let q = idx
            .vectorize(&Message::text(Role::User, &huge))
            .expect("known word");
        assert!(q.len() < 20_000, "{}", q.len());
    }

    #[test]
    fn multi_part_content_and_depth() {
        let c = Classifier::new(&two_tiers()).expect("valid");
        let parts = Message {
            content: Some(Content::Parts(vec![
                ContentPart::text("What does this screenshot show?"),
                serde_json::from_value(serde_json::json!({
                    "type": "image_url", "image_url": {"url": "https://example.com/x.png"}
                }))
                .expect("part"),
                ContentPart::text(
                    "```rust\nfn main() { let v: Vec<u8> = Vec::new(); v.push(1); }\n```",
                ),
            ])),
            ..Message::text(Role::User, "")
        };
        let d = c.classify(&request(vec![parts]));
        assert!(feature(&d, "code").value > 0.8, "{}", d.explain());
        assert_eq!(d.tier, "strong");

        // Depth counts user turns; the text features read the last user message.
        let mut msgs = vec![Message::text(Role::System, "You are helpful.")];
        for i in 0..6 {
            msgs.push(Message::text(
                Role::User,
                format!("tell me about topic {i}"),
            ));
            msgs.push(Message::text(Role::Assistant, "Sure, here it is."));
        }
        msgs.push(Message::text(Role::Tool, "{\"ok\": true}"));
        let deep = c.classify(&request(msgs.clone()));
        let depth = feature(&deep, "depth");
        assert_eq!(depth.value, 1.0);
        assert!((depth.contribution - W_DEPTH).abs() < 1e-9);
        assert_eq!(depth.detail, "6 user turn(s)");
        let shallow = c.classify(&request(msgs[..2].to_vec()));
        assert_eq!(feature(&shallow, "depth").value, 0.0);
        assert!(feature(&deep, "length").value > feature(&shallow, "length").value);

        // The last user message is what the text features read.
        msgs.push(Message::text(Role::User, "thanks!"));
        let last = c.classify(&request(msgs));
        assert!(feature(&last, "small_talk").value > 0.0);

        // No messages at all: nothing to read, the first tier.
        let empty = c.classify(&request(vec![]));
        assert_eq!((empty.tier.as_str(), empty.score), ("small", 0.0));
    }

    #[test]
    fn symbols_and_words() {
        let mut s = Scanner::default();
        s.feed("Let x = 3 + 4 on 2024-01-05, call foo_bar() and fooBar(); `a`\nx => y; C::new()");
        assert_eq!(s.arithmetic, 2, "{s:?}");
        assert_eq!(s.identifiers, 2);
        assert_eq!(s.calls, 3);
        assert_eq!(s.inline_ticks / 2, 1);
        assert_eq!(s.operators, 2);
        assert_eq!(s.semicolon_lines, 0);
        let mut s = Scanner::default();
        s.feed("How many trade-offs? Step-by-step, what's up ∫ \\frac{1}{2}");
        assert!(s.factual_opener);
        assert!(s.reasoning.words.contains(&"trade offs"), "{s:?}");
        assert!(s.reasoning.words.contains(&"step by step"), "{s:?}");
        assert!(s.social.words.contains(&"whats up"), "{s:?}");
        assert_eq!(s.math_glyphs, 1);
        assert_eq!(s.latex, 1);
        assert_eq!(s.braces, 4);
        assert_eq!(s.questions, 1);
        // Plurals and stems.
        assert_eq!(lookup("tests").map(|l| l.0), None);
        assert_eq!(lookup("bugs").map(|l| l.0), Some("bug"));
        assert_eq!(lookup("indemnification").map(|l| l.0), Some("indemnif"));
        assert_eq!(lookup("class").map(|l| l.0), Some("class"));
    }

    #[test]
    fn lexicon_parses_cleanly() {
        let (lex, errors) = parse_lexicon(LEXICON);
        assert!(errors.is_empty(), "{errors:?}");
        for w in lex.words.keys().chain(lex.stems.iter().map(|s| &s.0)) {
            assert!(
                w.chars().all(|c| c.is_lowercase() || c.is_ascii_digit()),
                "{w}"
            );
        }
        assert!(lex.words.len() > 300 && lex.phrases.len() > 30);
        let (_, errors) = parse_lexicon("code 0.5: a a\nnope 1: b\nmath 2: c\nmath 0.5: x_\nmath");
        assert_eq!(errors.len(), 5, "{errors:?}");
    }

    #[test]
    fn scripts_without_spaces_are_counted_by_character_and_keep_their_latin_cues() {
        let c = Classifier::new(&two_tiers()).expect("classifier");
        let zh = c.classify_text("请帮我用python写一个快速排序算法并分析时间复杂度");
        assert!(feature(&zh, "code").value > 0.0, "{zh:?}");
        assert_eq!(feature(&zh, "small_talk").value, 0.0, "{zh:?}");
        // A short greeting stays small talk.
        let hi = c.classify_text("你好");
        assert!(feature(&hi, "small_talk").value > 0.0, "{hi:?}");
    }
}
