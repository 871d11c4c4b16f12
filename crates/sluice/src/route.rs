//! `sluice route`: explains a complexity-routing decision for a prompt, and reports what
//! complexity routing saved against always using the strongest tier.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use sluice_core::record::RecordQuery;
use sluice_gateway::complexity::Classifier;
use sluice_gateway::router::Strategy;

use crate::config::RawConfig;

/// The complexity-routed model to use: `--model`, else the only one configured.
/// The configuration's models that route by complexity.
fn routed(raw: &RawConfig) -> Vec<&str> {
    raw.models
        .iter()
        .filter(|(_, m)| m.strategy == Strategy::Complexity)
        .map(|(n, _)| n.as_str())
        .collect()
}

/// The error for a model that is not configured (`where_` says where it was looked for).
fn unknown_model(raw: &RawConfig, m: &str, where_: &str) -> anyhow::Error {
    let routed = routed(raw);
    anyhow::anyhow!(
        "no model `{m}` in the {where_}\nhint: models routed by complexity: {}",
        if routed.is_empty() {
            "(none)".to_string()
        } else {
            routed.join(", ")
        }
    )
}

fn complexity_model<'a>(raw: &'a RawConfig, model: Option<&str>) -> anyhow::Result<&'a str> {
    let routed = routed(raw);
    match model {
        Some(m) => {
            let Some((name, cfg)) = raw.models.get_key_value(m) else {
                return Err(unknown_model(raw, m, "configuration"));
            };
            if cfg.strategy != Strategy::Complexity {
                bail!(
                    "model `{m}` uses strategy \"{}\", not \"complexity\"\nhint: set strategy = \"complexity\" and a [models.\"{m}\".complexity] table with tiers (docs/configuration.md)",
                    cfg.strategy.as_str()
                );
            }
            Ok(name)
        }
        None => match routed.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no model routes by complexity in this configuration\nhint: add strategy = \"complexity\" with tiers to a model (docs/configuration.md, \"Complexity routing\"), or pass --config"
            ),
            many => bail!(
                "several models route by complexity: {}\nhint: pick one with --model",
                many.join(", ")
            ),
        },
    }
}

/// `sluice route explain "<prompt>"`.
pub fn explain(
    raw: &RawConfig,
    model: Option<&str>,
    prompt: &str,
    json: bool,
) -> anyhow::Result<()> {
    let name = complexity_model(raw, model)?;
    let cfg = raw.models[name].complexity.as_ref().with_context(|| {
        format!("models.{name}.complexity: missing (strategy \"complexity\" needs tiers)")
    })?;
    let classifier =
        Classifier::new(cfg).map_err(|e| anyhow::anyhow!("models.{name}.complexity.{e}"))?;
    let decision = classifier.classify_text(prompt);
    if json {
        outln!("{}", serde_json::to_string_pretty(&decision)?);
    } else {
        outln!("model `{name}` (strategy complexity)");
        outln!("{}", decision.explain());
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    requests: u64,
    cost: f64,
    baseline: f64,
}

/// `sluice route report`: cost of complexity-routed requests against the strongest tier.
pub async fn report(
    raw: &RawConfig,
    since: Option<&str>,
    model: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    // A model of the configuration must route by complexity; one that is not configured (any
    // more) may still be in the log.
    if let Some(m) = model
        && raw.models.contains_key(m)
    {
        complexity_model(raw, Some(m))?;
    }
    let store_url = raw.store.url.as_str();
    let since = match since {
        Some(s) => Some(
            sluice_server::admin::parse_since(s, chrono::Utc::now())
                .map_err(|e| anyhow::anyhow!("--since {e}"))?,
        ),
        None => None,
    };
    crate::logs::require_log(store_url).await?;
    let store = sluice_store::open(store_url, 2).await.with_context(|| {
        format!(
            "opening the store at {}",
            crate::display::redact_url(store_url)
        )
    })?;
    // By model and tier: tiers of different complexity models are different models.
    let mut by_tier: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut before = None;
    let mut logged = false;
    loop {
        let page = store
            .list(&RecordQuery {
                model: model.map(str::to_string),
                since,
                before,
                limit: 1000,
                without_bodies: true,
                ..RecordQuery::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        logged = true;
        before = Some(last.id);
        for r in &page {
            let Some(route) = r.route.as_ref() else {
                continue;
            };
            if route.get("strategy").and_then(|s| s.as_str()) != Some("complexity") {
                continue;
            }
            let Some(baseline) = route.get("baseline_cost_usd").and_then(|v| v.as_f64()) else {
                continue;
            };
            let tier = route
                .get("tier")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_string();
            let t = by_tier.entry((r.model.clone(), tier)).or_default();
            t.requests += 1;
            t.cost += r.cost_usd;
            t.baseline += baseline;
        }
        if page.len() < 1000 {
            break;
        }
    }
    // A model neither configured nor in the log is most likely misspelt.
    if let Some(m) = model
        && !logged
        && !raw.models.contains_key(m)
    {
        return Err(unknown_model(raw, m, "configuration or the log"));
    }
    if json {
        let mut total = Tally::default();
        let tiers: Vec<serde_json::Value> = by_tier
            .iter()
            .map(|((model, tier), t)| {
                total.requests += t.requests;
                total.cost += t.cost;
                total.baseline += t.baseline;
                serde_json::json!({
                    "model": model,
                    "tier": tier,
                    "requests": t.requests,
                    "cost_usd": t.cost,
                    "baseline_cost_usd": t.baseline,
                    "saved_usd": t.baseline - t.cost,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "object": "route_report",
                "since": since.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                "model": model,
                "tiers": tiers,
                "total": {
                    "requests": total.requests,
                    "cost_usd": total.cost,
                    "baseline_cost_usd": total.baseline,
                    "saved_usd": total.baseline - total.cost,
                },
            }))?
        );
        return Ok(());
    }
    if by_tier.is_empty() {
        outln!(
            "no complexity-routed requests in the log{}",
            since.map(|_| " for that period").unwrap_or("")
        );
        return Ok(());
    }
    let model_width = (by_tier.keys())
        .map(|(m, _)| crate::display::width(&crate::display::clean(m)))
        .max()
        .unwrap_or(0)
        .clamp(5, 32);
    outln!(
        "{} {:<16} {:>9} {:>16} {:>18} {:>16}",
        crate::display::pad("model", model_width, true),
        "tier",
        "requests",
        "cost (USD)",
        "strongest (USD)",
        "saved (USD)"
    );
    let mut total = Tally::default();
    for ((model, tier), t) in &by_tier {
        outln!(
            "{} {} {:>9} {:>16.8} {:>18.8} {:>16.8}",
            crate::display::pad(&crate::display::clip(model, model_width), model_width, true),
            crate::display::pad(&crate::display::clean(tier), 16, true),
            t.requests,
            t.cost,
            t.baseline,
            t.baseline - t.cost
        );
        total.requests += t.requests;
        total.cost += t.cost;
        total.baseline += t.baseline;
    }
    let saved = total.baseline - total.cost;
    let pct = if total.baseline > 0.0 {
        saved / total.baseline * 100.0
    } else {
        0.0
    };
    outln!(
        "{} {:<16} {:>9} {:>16.8} {:>18.8} {:>16.8}  ({pct:.1}% saved)",
        crate::display::pad("total", model_width, true),
        "",
        total.requests,
        total.cost,
        total.baseline,
        saved
    );
    Ok(())
}
