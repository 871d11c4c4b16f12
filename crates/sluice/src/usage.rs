//! `sluice usage`: spend and tokens from the request log, straight from the store, grouped by
//! key, user, team, model and day (the same report as `GET /api/usage`).

use anyhow::Context;
use sluice_core::usage::{UsageDim, UsageRow};
use sluice_server::usage::UsageParams;

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// From this time (RFC 3339) or duration ago (7d); default: the start of this month (UTC), or
    /// of the month --until falls in.
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (RFC 3339) or duration ago; default: now.
    #[arg(long)]
    pub until: Option<String>,
    /// Group by these, comma-separated: key, user, team, model, day; or none.
    #[arg(long, short = 'g', default_value = "key")]
    pub group_by: String,
    /// Only this virtual key (its id; the whole key works too).
    #[arg(long)]
    pub key: Option<String>,
    /// Only this user (the request's user: header, body `user`, or key owner)
    #[arg(long)]
    pub user: Option<String>,
    /// Only this team: the requests of keys whose owner is in it (a request without a key has no
    /// team, whatever its metadata says)
    #[arg(long)]
    pub team: Option<String>,
    /// Only this model (as clients asked for it)
    #[arg(long)]
    pub model: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A group's value; none, or an empty one (a request refused before its model was read), is `-`.
fn cell(v: &Option<String>) -> String {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .map_or_else(|| "-".into(), |s| crate::display::clean(s).into_owned())
}

/// A period's end for the header: to the minute, or to the second when it has seconds.
fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::Timelike;
    if t.second() == 0 && t.nanosecond() == 0 {
        t.format("%Y-%m-%d %H:%MZ").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M:%SZ").to_string()
    }
}

fn table(dims: &[UsageDim], rows: &[UsageRow], total: Option<&UsageRow>) -> String {
    let mut header: Vec<String> = dims.iter().map(|d| d.as_str().to_uppercase()).collect();
    header.extend(
        [
            "REQUESTS",
            "ERRORS",
            "CACHE HITS",
            "PROMPT TOK",
            "COMPL TOK",
            "COST USD",
            "SAVED USD",
        ]
        .map(str::to_string),
    );
    let line = |group: Vec<String>, r: &UsageRow| {
        let mut v = group;
        v.extend([
            r.requests.to_string(),
            r.errors.to_string(),
            r.cache_hits.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            format!("{:.8}", r.cost_usd),
            format!("{:.8}", r.cost_saved_usd),
        ]);
        v
    };
    let mut lines: Vec<Vec<String>> = vec![header];
    for r in rows {
        lines.push(line(r.group.iter().map(cell).collect(), r));
    }
    // With no dimensions the one row is the total already.
    if let Some(t) = total.filter(|_| !dims.is_empty()) {
        let mut label = vec!["TOTAL".to_string()];
        label.extend((1..dims.len()).map(|_| String::new()));
        lines.push(line(label, t));
    }
    let cols = lines[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            lines
                .iter()
                .map(|l| l.get(c).map_or(0, |s| crate::display::width(s)))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, s)| crate::display::pad(s, widths[i], i < dims.len()))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub async fn run(url: &str, mut args: UsageArgs) -> anyhow::Result<()> {
    if let Some(k) = args.key.as_mut() {
        crate::keys::id_of(k)?;
    }
    let params = UsageParams {
        since: args.since.clone(),
        until: args.until.clone(),
        key: args.key.clone(),
        user: args.user.clone(),
        team: args.team.clone(),
        model: args.model.clone(),
        group_by: Some(args.group_by.clone()),
    };
    let q = params.to_query(chrono::Utc::now()).map_err(|e| {
        // The API's words for its parameters, as this command's flags.
        let message = ["since", "until", "key", "user", "team", "model", "group_by"]
            .iter()
            .fold(e.message.clone(), |m, p| {
                m.replace(&format!("`{p}`"), &format!("--{}", p.replace('_', "-")))
            });
        match e
            .param
            .as_deref()
            .map(|p| format!("--{}", p.replace('_', "-")))
        {
            // Not twice when the message names it already.
            Some(flag) if !message.starts_with(&flag) => anyhow::anyhow!("{flag}: {message}"),
            _ => anyhow::anyhow!("{message}"),
        }
    })?;
    crate::logs::require_log(url).await?;
    let stores = sluice_store::open_all(url, 2)
        .await
        .with_context(|| format!("opening the store at {}", crate::display::redact_url(url)))?;
    let rows = stores.usage.usage(&q).await.context("reading usage")?;
    let total = UsageRow::total(&rows);
    if args.json {
        // The shape of `GET /api/usage`.
        outln!(
            "{}",
            serde_json::to_string_pretty(&sluice_server::usage::report_json(&q, &rows))?
        );
        return Ok(());
    }
    let since = q.since.map_or_else(|| "the start".into(), when);
    let until = q.until.map_or_else(|| "now".into(), when);
    outln!("usage from {since} to {until}");
    if rows.is_empty() || total.requests == 0 {
        outln!("no requests in this period");
        return Ok(());
    }
    out!("{}", table(&q.group_by, &rows, Some(&total)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_keep_their_seconds_and_empty_groups_show_a_dash() {
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        assert_eq!(when(t("2026-12-05T23:08:00Z")), "2026-12-05 23:08Z");
        assert_eq!(when(t("2026-12-05T23:08:42Z")), "2026-12-05 23:08:42Z");
        assert_eq!(cell(&Some(String::new())), "-");
        assert_eq!(cell(&None), "-");
        assert_eq!(cell(&Some("m".into())), "m");
    }

    #[test]
    fn the_table_aligns_groups_and_sums() {
        let row = |k: &str, n: u64, cost: f64| UsageRow {
            group: vec![Some(k.into())],
            requests: n,
            errors: 0,
            cache_hits: 1,
            prompt_tokens: 10 * n,
            completion_tokens: 5 * n,
            cost_usd: cost,
            cost_saved_usd: 0.0,
        };
        let rows = [row("abc", 2, 0.5), row("a-much-longer-key", 10, 1.25)];
        let mut total = row("", 12, 1.75);
        total.group.clear();
        let t = table(&[UsageDim::Key], &rows, Some(&total));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KEY"), "{t}");
        assert!(lines[2].starts_with("a-much-longer-key"), "{t}");
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            [
                "TOTAL",
                "12",
                "0",
                "1",
                "120",
                "60",
                "1.75000000",
                "0.00000000"
            ],
            "{t}"
        );
    }
}
