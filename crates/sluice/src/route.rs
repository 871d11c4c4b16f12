//! `sluice route`: explains a complexity-routing decision for a prompt, and reports what
//! complexity routing saved against always using the strongest tier.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use sluice_core::record::RecordQuery;
use sluice_gateway::complexity::Classifier;
use sluice_gateway::router::Strategy;

use crate::config::RawConfig;

/// The complexity-routed model to use: `--model`, else the only one configured.
fn complexity_model<'a>(raw: &'a RawConfig, model: Option<&str>) -> anyhow::Result<&'a str> {
    let routed: Vec<&str> = raw
        .models
        .iter()
        .filter(|(_, m)| m.strategy == Strategy::Complexity)
        .map(|(n, _)| n.as_str())
        .collect();
    match model {
        Some(m) => {
            let Some((name, cfg)) = raw.models.get_key_value(m) else {
                bail!(
                    "no model `{m}` in the configuration\nhint: models routed by complexity: {}",
                    if routed.is_empty() {
                        "(none)".to_string()
                    } else {
                        routed.join(", ")
                    }
                );
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
    crate::logs::require_log(store_url)?;
    let store = sluice_store::open(store_url, 2)
        .await
        .with_context(|| format!("opening the store at {store_url}"))?;
    let mut by_tier: BTreeMap<String, Tally> = BTreeMap::new();
    let mut before = None;
    loop {
        let page = store
            .list(&RecordQuery {
                model: model.map(str::to_string),
                since,
                before,
                limit: 1000,
                ..RecordQuery::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
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
            let t = by_tier.entry(tier).or_default();
            t.requests += 1;
            t.cost += r.cost_usd;
            t.baseline += baseline;
        }
        if page.len() < 1000 {
            break;
        }
    }
    if json {
        let mut total = Tally::default();
        let tiers: Vec<serde_json::Value> = by_tier
            .iter()
            .map(|(tier, t)| {
                total.requests += t.requests;
                total.cost += t.cost;
                total.baseline += t.baseline;
                serde_json::json!({
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
            "no completed complexity-routed requests in the log{}",
            since.map(|_| " for that period").unwrap_or("")
        );
        return Ok(());
    }
    outln!(
        "{:<16} {:>9} {:>14} {:>16} {:>14}",
        "tier",
        "requests",
        "cost (USD)",
        "strongest (USD)",
        "saved (USD)"
    );
    let mut total = Tally::default();
    for (tier, t) in &by_tier {
        outln!(
            "{:<16} {:>9} {:>14.6} {:>16.6} {:>14.6}",
            tier,
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
        "{:<16} {:>9} {:>14.6} {:>16.6} {:>14.6}  ({pct:.1}% saved)",
        "total",
        total.requests,
        total.cost,
        total.baseline,
        saved
    );
    Ok(())
}
