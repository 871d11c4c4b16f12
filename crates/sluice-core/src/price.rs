//! Prices and cost.
//!
//! The shipped table (`data/prices.toml`) gives USD per million tokens for current models of
//! OpenAI, Anthropic, Google, Mistral and hosted Llama models. A deployment may override any
//! price; a model with no price costs 0 and its records say so through `cost_usd = 0`.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// Prices of one model in USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
    /// Price of prompt tokens read from the provider's cache; defaults to `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Price of prompt tokens written to the provider's cache (Anthropic charges 1.25 × input
    /// for its 5-minute cache); defaults to `input`.
    #[serde(default)]
    pub cache_write_input: Option<f64>,
    /// Price of prompt tokens written to a one-hour cache (Anthropic's `ttl: "1h"`, charged
    /// 2 × input); defaults to twice `input`.
    #[serde(default)]
    pub cache_write_1h_input: Option<f64>,
}

/// Prompt tokens a call wrote to the provider's cache: all of them, and how many of those were
/// written for an hour (Anthropic's `ttl: "1h"`, priced apart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheWrites {
    pub tokens: u64,
    pub one_hour: u64,
}

impl ModelPrice {
    /// The cost of a call. `cached` is the part of `prompt` that was read from cache.
    pub fn cost(&self, prompt: u64, completion: u64, cached: u64) -> f64 {
        self.cost_with_writes(prompt, completion, cached, CacheWrites::default())
    }

    /// The cost of a call of which `cached` prompt tokens were read from the cache and
    /// `writes` others written to it.
    pub fn cost_with_writes(
        &self,
        prompt: u64,
        completion: u64,
        cached: u64,
        writes: CacheWrites,
    ) -> f64 {
        let cached = cached.min(prompt);
        let all_writes = writes.tokens.min(prompt - cached);
        let hour = writes.one_hour.min(all_writes);
        let fresh = prompt - cached - all_writes;
        let cached_price = self.cached_input.unwrap_or(self.input);
        let write_price = self.cache_write_input.unwrap_or(self.input);
        let hour_price = self.cache_write_1h_input.unwrap_or(self.input * 2.0);
        (fresh as f64 * self.input
            + cached as f64 * cached_price
            + (all_writes - hour) as f64 * write_price
            + hour as f64 * hour_price
            + completion as f64 * self.output)
            / 1_000_000.0
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    as_of: String,
    models: HashMap<String, ModelPrice>,
}

/// A price table.
#[derive(Debug)]
pub struct PriceTable {
    as_of: String,
    models: HashMap<String, ModelPrice>,
}

const BUILTIN: &str = include_str!("../data/prices.toml");

impl PriceTable {
    /// Parses a table in the shipped file's format.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: PriceFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(PriceTable {
            as_of: f.as_of,
            models: f.models,
        })
    }

    /// The table shipped with Sluice.
    pub fn builtin() -> &'static PriceTable {
        static TABLE: OnceLock<PriceTable> = OnceLock::new();
        TABLE.get_or_init(|| PriceTable::parse(BUILTIN).expect("shipped price table parses"))
    }

    /// The date the prices were taken.
    pub fn as_of(&self) -> &str {
        &self.as_of
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of a model: exact name, then without a `provider/` prefix, then the longest
    /// entry the name is a snapshot of (the entry, `-`, then a [`snapshot_suffix`]: a date or
    /// version stamp, `latest`, `preview`), never another product of the family (`o1-pro` is
    /// not `o1`, nor `claude-opus-4-5` `claude-opus-4`).
    pub fn lookup(&self, model: &str) -> Option<ModelPrice> {
        if let Some(p) = self.models.get(model) {
            return Some(*p);
        }
        let bare = model.rsplit('/').next().unwrap_or(model);
        if let Some(p) = self.models.get(bare) {
            return Some(*p);
        }
        self.models
            .iter()
            .filter(|(name, _)| {
                bare.strip_prefix(name.as_str())
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(snapshot_suffix)
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
    }
}

/// A dollar amount for people, exact to ten significant digits and never rounded to a cent: whole
/// dollars (`$5`), at least two decimals otherwise (`$12.50`, `$12.999`), and as many as a small
/// amount needs (`$0.004`, `$0.00000002`), so that a budget or a cost is shown as it is set.
pub fn format_usd(v: f64) -> String {
    if !v.is_finite() {
        return format!("${v}");
    }
    if v == 0.0 {
        return "$0".into();
    }
    // Ten significant digits; a float's noise (0.1 + 0.2) is below them.
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (9 - magnitude).clamp(2, 15) as usize;
    let s = format!("{v:.decimals$}");
    let s = s.trim_end_matches('0');
    let s = match s.strip_suffix('.') {
        Some(whole) => whole.to_string(),
        None if s.len() - s.find('.').unwrap_or(s.len()) == 2 => format!("{s}0"),
        None => s.to_string(),
    };
    if s == "-0" || s.parse::<f64>() == Ok(0.0) {
        // Below the fifteenth decimal.
        return format!("${v:e}");
    }
    format!("${s}")
}

/// Whether what follows a model name marks a snapshot of the same model at the same price: a
/// date (`2024-08-06`, `20241022`), an `MMDD` or three-digit version stamp (`0125`, `002`),
/// `latest`, or `preview`/`exp`, each optionally followed by such a date (`preview-05-20`).
fn snapshot_suffix(rest: &str) -> bool {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let date = |s: &str| {
        let parts: Vec<&str> = s.split('-').collect();
        match parts[..] {
            [one] => digits(one, 8) || digits(one, 4) || digits(one, 3),
            [y, m, d] => digits(y, 4) && digits(m, 2) && digits(d, 2),
            // `preview-05-20`, `preview-09-2025`
            [a, b] => digits(a, 2) && (digits(b, 2) || digits(b, 4)),
            _ => false,
        }
    };
    if rest == "latest" || date(rest) {
        return true;
    }
    ["preview", "exp"].iter().any(|tag| {
        rest.strip_prefix(tag)
            .is_some_and(|r| r.is_empty() || r.strip_prefix('-').is_some_and(date))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_parses_and_covers_the_major_providers() {
        let t = PriceTable::builtin();
        for m in [
            "gpt-4o-mini",
            "claude-sonnet-4-5",
            "gemini-2.5-flash",
            "mistral-large-latest",
            "llama-3.3-70b-versatile",
        ] {
            assert!(t.lookup(m).is_some(), "{m} has no price");
        }
    }

    #[test]
    fn snapshots_and_prefixes_resolve_to_the_longest_family() {
        let t = PriceTable::builtin();
        assert_eq!(t.lookup("gpt-4o-mini-2024-07-18"), t.lookup("gpt-4o-mini"));
        assert_eq!(t.lookup("gpt-4o-2024-08-06"), t.lookup("gpt-4o"));
        assert_eq!(t.lookup("openai/gpt-4o"), t.lookup("gpt-4o"));
        assert_eq!(
            t.lookup("claude-3-5-haiku-20241022"),
            t.lookup("claude-3-5-haiku")
        );
        assert!(t.lookup("gpt-4o-mini").unwrap().input < t.lookup("gpt-4o").unwrap().input);
        assert_eq!(t.lookup("my-own-model"), None);
        assert_eq!(t.lookup("gpt-3.5-turbo-0125"), t.lookup("gpt-3.5-turbo"));
        assert_eq!(
            t.lookup("gemini-2.5-flash-preview-05-20"),
            t.lookup("gemini-2.5-flash")
        );
        assert_eq!(
            t.lookup("gemini-2.0-flash-001"),
            t.lookup("gemini-2.0-flash")
        );
        assert_eq!(t.lookup("o3-mini-2025-01-31"), t.lookup("o3-mini"));
        // Mistral's aliases and dated versions alike.
        for (version, family) in [
            ("mistral-large-latest", "mistral-large"),
            ("mistral-large-2411", "mistral-large"),
            ("mistral-small-2503", "mistral-small"),
            ("mistral-medium-2505", "mistral-medium"),
            ("codestral-2501", "codestral"),
        ] {
            assert!(t.lookup(family).is_some(), "{family}");
            assert_eq!(t.lookup(version), t.lookup(family), "{version}");
        }
        // Other products of a family are not priced as the family: o1-mini is not o1 (14×
        // over), o3-pro not o3 (10× under), claude-opus-4-5 not claude-opus-4.
        for other in [
            "o1-mini",
            "o1-pro",
            "o3-pro",
            "gpt-5-pro",
            "gpt-5-codex",
            "claude-opus-4-5-20251101",
            "gpt-4o-audio-preview-2024-12-17",
        ] {
            assert_eq!(t.lookup(other), None, "{other}");
        }
    }

    /// Snapshots OpenAI prices apart from their family have their own price (they were priced
    /// as the family: gpt-4o-2024-05-13 at half its price, gpt-3.5-turbo-0613 at a third).
    #[test]
    fn snapshots_priced_apart_from_their_family() {
        let t = PriceTable::builtin();
        let io = |m: &str| t.lookup(m).map(|p| (p.input, p.output));
        for (model, price) in [
            ("gpt-4o-2024-05-13", (5.0, 15.0)),
            ("gpt-3.5-turbo-1106", (1.0, 2.0)),
            ("gpt-3.5-turbo-0613", (1.5, 2.0)),
            ("gpt-3.5-turbo-16k-0613", (3.0, 4.0)),
            ("gpt-4-0613", (30.0, 60.0)),
            ("gpt-4-32k-0613", (60.0, 120.0)),
            ("gpt-4-1106-preview", (10.0, 30.0)),
            ("gpt-4-turbo-2024-04-09", (10.0, 30.0)),
            ("gpt-3.5-turbo-0125", (0.5, 1.5)),
            ("gpt-4o-2024-08-06", (2.5, 10.0)),
        ] {
            assert_eq!(io(model), Some(price), "{model}");
        }
        // The older ones have no cached-input price of the family's.
        assert_eq!(t.lookup("gpt-4o-2024-05-13").unwrap().cached_input, None);
    }

    #[test]
    fn small_amounts_keep_their_digits() {
        assert_eq!(format_usd(12.5), "$12.50");
        assert_eq!(format_usd(5.0), "$5");
        assert_eq!(format_usd(0.0), "$0");
        assert_eq!(format_usd(0.01), "$0.01");
        assert_eq!(format_usd(0.004), "$0.004");
        assert_eq!(format_usd(0.0001), "$0.0001");
        assert_eq!(format_usd(0.0049), "$0.0049");
        assert_eq!(format_usd(0.0000001), "$0.0000001");
        assert_eq!(format_usd(2e-8), "$0.00000002");
        assert_eq!(format_usd(7.5e-7), "$0.00000075");
        assert_eq!(format_usd(12.999), "$12.999");
        assert_eq!(format_usd(0.1 + 0.2), "$0.30");
        assert_eq!(format_usd(1234.5), "$1234.50");
        assert_eq!(format_usd(-3.0), "$-3");
        assert_eq!(format_usd(1e-20), "$1e-20");
    }

    #[test]
    fn cache_writes_cost_their_own_price() {
        let p = PriceTable::builtin()
            .lookup("claude-sonnet-4-5")
            .expect("priced");
        // 1,000 fresh + 100,000 written + 50,000 read, 200 out.
        let w = |tokens, one_hour| CacheWrites { tokens, one_hour };
        let c = p.cost_with_writes(151_000, 200, 50_000, w(100_000, 0));
        let want = (1_000.0 * 3.0 + 100_000.0 * 3.75 + 50_000.0 * 0.30 + 200.0 * 15.0) / 1e6;
        assert!((c - want).abs() < 1e-12, "{c} vs {want}");
        // Of which 40,000 written for an hour: twice the input price.
        let c = p.cost_with_writes(151_000, 200, 50_000, w(100_000, 40_000));
        let want =
            (1_000.0 * 3.0 + 60_000.0 * 3.75 + 40_000.0 * 6.0 + 50_000.0 * 0.30 + 200.0 * 15.0)
                / 1e6;
        assert!((c - want).abs() < 1e-12, "{c} vs {want}");
        // Without a write price, writes cost as input; writes never exceed the prompt, nor
        // one-hour writes the writes.
        let plain = ModelPrice {
            input: 2.0,
            output: 4.0,
            cache_write_1h_input: Some(2.0),
            ..ModelPrice::default()
        };
        assert_eq!(
            plain.cost_with_writes(100, 0, 0, w(50, 0)),
            plain.cost(100, 0, 0)
        );
        assert_eq!(plain.cost_with_writes(100, 0, 60, w(500, 500)), 200.0 / 1e6);
        assert_eq!(plain.cost_with_writes(100, 0, 0, w(10, 50)), 200.0 / 1e6);
    }

    #[test]
    fn cost_counts_cached_tokens_at_their_price() {
        let p = ModelPrice {
            input: 2.5,
            output: 10.0,
            cached_input: Some(1.25),
            cache_write_input: None,
            cache_write_1h_input: None,
        };
        // 1000 prompt (400 cached) + 500 completion
        let c = p.cost(1000, 500, 400);
        let want = (600.0 * 2.5 + 400.0 * 1.25 + 500.0 * 10.0) / 1e6;
        assert!((c - want).abs() < 1e-12);
    }
}
