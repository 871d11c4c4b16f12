//! `GET /api/usage`: spend and tokens from the request log, grouped by key, user, team, model
//! and day; and `DELETE /api/cache`: empties the exact cache (or one namespace of it).

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::usage::{UsageDim, UsageQuery, UsageRow};

use crate::SharedState;
use crate::admin::parse_since;
use crate::error::ApiError;

/// Query parameters of `GET /api/usage`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// RFC 3339 or a duration back from now (`7d`); default: the start of the current month, or
    /// of the month `until` falls in.
    pub since: Option<String>,
    /// RFC 3339 or a duration back from now; default: now.
    pub until: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub team: Option<String>,
    pub model: Option<String>,
    /// Comma-separated: `key`, `user`, `team`, `model`, `day` (default `key`); `none` for one
    /// total.
    pub group_by: Option<String>,
}

/// The first instant of the current UTC month.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{Datelike, TimeZone};
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(now)
}

/// Parses a `group_by` list.
pub fn parse_group_by(s: &str) -> Result<Vec<UsageDim>, String> {
    if s.trim() == "none" || s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut dims = Vec::new();
    for part in s.split(',') {
        let d = UsageDim::parse(part).ok_or_else(|| {
            format!(
                "`{}` is not a usage dimension; use key, user, team, model or day (comma-separated), or none",
                part.trim()
            )
        })?;
        if !dims.contains(&d) {
            dims.push(d);
        }
    }
    Ok(dims)
}

impl UsageParams {
    /// The store query these parameters ask for.
    pub fn to_query(&self, now: DateTime<Utc>) -> Result<UsageQuery, Error> {
        let until = match &self.until {
            Some(s) => {
                Some(parse_since(s, now).map_err(|e| Error::invalid(e).with_param("until"))?)
            }
            None => None,
        };
        let since = match &self.since {
            Some(s) => parse_since(s, now).map_err(|e| Error::invalid(e).with_param("since"))?,
            // The month `until` falls in (the month before, when it is a month's first
            // instant); this month without `until`.
            None => match until {
                Some(u) => month_start(
                    u.checked_sub_signed(chrono::TimeDelta::microseconds(1))
                        .unwrap_or(u),
                ),
                None => month_start(now),
            },
        };
        if until.is_some_and(|u| u <= since) {
            return Err(Error::invalid("`until` must be after `since`").with_param("until"));
        }
        // Without `until` the period ends now.
        if until.is_none() && since > now {
            return Err(Error::invalid(
                "`since` is in the future: the period up to now would be empty",
            )
            .with_param("since"));
        }
        let group_by = parse_group_by(self.group_by.as_deref().unwrap_or("key"))
            .map_err(|e| Error::invalid(e).with_param("group_by"))?;
        Ok(UsageQuery {
            since: Some(since),
            until,
            key: self.key.clone(),
            user: self.user.clone(),
            team: self.team.clone(),
            model: self.model.clone(),
            group_by,
        })
    }
}

/// A usage row as JSON: the group's dimensions as named fields, then the sums.
pub fn row_json(dims: &[UsageDim], row: &UsageRow) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (d, v) in dims.iter().zip(&row.group) {
        m.insert(d.as_str().to_string(), v.clone().into());
    }
    m.insert("requests".into(), row.requests.into());
    m.insert("errors".into(), row.errors.into());
    m.insert("cache_hits".into(), row.cache_hits.into());
    m.insert("prompt_tokens".into(), row.prompt_tokens.into());
    m.insert("completion_tokens".into(), row.completion_tokens.into());
    m.insert("cost_usd".into(), usd(row.cost_usd).into());
    m.insert("cost_saved_usd".into(), usd(row.cost_saved_usd).into());
    serde_json::Value::Object(m)
}

/// A sum of dollars as it is printed: to a tenth of a nano-dollar, without the noise of adding
/// binary fractions (`0.018000000000000002` is `0.018`).
fn usd(x: f64) -> f64 {
    // Past ~$900,000 the scaled value would lose digits: kept as it is.
    if x.abs() < 9.0e5 {
        (x * 1e10).round() / 1e10 + 0.0
    } else {
        x
    }
}

fn unavailable(what: &str) -> Response {
    ApiError::openai(Error::new(
        ErrorCode::Unavailable,
        format!("the store is unavailable ({what}); try again"),
    ))
    .into_response()
}

/// `GET /api/usage`.
pub async fn usage(
    State(state): State<SharedState>,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return ApiError::openai(crate::query_error(&e)).into_response(),
    };
    let q = match params.to_query(Utc::now()) {
        Ok(q) => q,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    let Some(store) = &state.usage else {
        return ApiError::openai(Error::new(
            ErrorCode::Unavailable,
            "this server has no usage store",
        ))
        .into_response();
    };
    let rows = match store.usage(&q).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reading usage failed");
            return unavailable("reading usage");
        }
    };
    Json(report_json(&q, &rows)).into_response()
}

/// The usage report as `GET /api/usage` answers it (and `sluice usage --json` prints it).
pub fn report_json(q: &UsageQuery, rows: &[UsageRow]) -> serde_json::Value {
    serde_json::json!({
        "object": "usage",
        "since": q.since,
        "until": q.until,
        "group_by": q.group_by.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "data": rows.iter().map(|r| row_json(&q.group_by, r)).collect::<Vec<_>>(),
        "total": row_json(&[], &UsageRow::total(rows)),
    })
}

/// Query parameters of `DELETE /api/cache`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearParams {
    /// `global`, `key:ID` or `team:NAME`; default: everything.
    pub namespace: Option<String>,
}

/// `DELETE /api/cache`: empties the cache (every tier), or one namespace.
pub async fn clear_cache(
    State(state): State<SharedState>,
    axum::Extension(actor): axum::Extension<sluice_core::keys::Actor>,
    params: Result<Query<ClearParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return ApiError::openai(crate::query_error(&e)).into_response(),
    };
    let Some(cache) = state.gateway.cache() else {
        return ApiError::openai(Error::invalid(
            "the cache is off; set `[cache] enabled = true` in sluice.toml",
        ))
        .into_response();
    };
    if let Some(ns) = params.namespace.as_deref()
        && !(ns == "global"
            || ns.strip_prefix("key:").is_some_and(|k| !k.is_empty())
            || ns.strip_prefix("team:").is_some_and(|t| !t.is_empty()))
    {
        return ApiError::openai(
            Error::invalid(format!(
                "namespace `{ns}` is not one: write `global`, `key:KEY_ID` or `team:TEAM`"
            ))
            .with_param("namespace"),
        )
        .into_response();
    }
    let cleared = cache.clear(params.namespace.as_deref()).await;
    let (outcome, detail) = match &cleared {
        Ok(removed) => ("ok", serde_json::json!({ "removed": removed })),
        Err(e) => ("failed", serde_json::json!({ "error": e })),
    };
    let ns = params.namespace.as_deref();
    crate::keys::audit(&state, &actor, "cache.clear", ns, outcome, detail).await;
    match cleared {
        Ok(removed) => {
            Json(serde_json::json!({"cleared": true, "namespace": ns, "removed": removed}))
                .into_response()
        }
        Err(e) => ApiError::openai(Error::new(
            ErrorCode::Unavailable,
            format!("the shared cache tier could not be cleared ({e}); its answers would still be served, so try again"),
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_sums_print_without_binary_noise() {
        let row = UsageRow {
            group: vec![],
            requests: 3,
            errors: 0,
            cache_hits: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.006 + 0.006 + 0.006,
            cost_saved_usd: 0.1 + 0.2,
        };
        assert_ne!(row.cost_usd, 0.018);
        let text = row_json(&[], &row).to_string();
        assert!(
            text.contains("\"cost_usd\":0.018,") && text.contains("\"cost_saved_usd\":0.3}"),
            "{text}"
        );
        // A tenth of a nano-dollar is kept.
        assert_eq!(usd(0.000_000_012_3), 0.000_000_012_3);
    }

    #[test]
    fn group_by_lists_are_parsed_and_checked() {
        assert_eq!(
            parse_group_by("model, day").unwrap(),
            vec![UsageDim::Model, UsageDim::Day]
        );
        assert!(parse_group_by("none").unwrap().is_empty());
        assert!(parse_group_by("key,week").unwrap_err().contains("`week`"));
    }

    #[test]
    fn usage_defaults_to_this_month_by_key() {
        let now = DateTime::parse_from_rfc3339("2026-12-17T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let q = UsageParams::default().to_query(now).unwrap();
        assert_eq!(q.group_by, vec![UsageDim::Key]);
        assert_eq!(q.since.unwrap().to_rfc3339(), "2026-12-01T00:00:00+00:00");
        let bad = UsageParams {
            since: Some("1d".into()),
            until: Some("2d".into()),
            ..UsageParams::default()
        };
        assert_eq!(
            bad.to_query(now).unwrap_err().param.as_deref(),
            Some("until")
        );
        // `until` alone: the month it falls in, not an empty range before this month.
        let until = |u: &str| {
            let q = UsageParams {
                until: Some(u.into()),
                ..UsageParams::default()
            }
            .to_query(now)
            .unwrap();
            q.since.unwrap().to_rfc3339()
        };
        assert_eq!(until("2026-03-10T00:00:00Z"), "2026-03-01T00:00:00+00:00");
        assert_eq!(until("2026-03-01T00:00:00Z"), "2026-02-01T00:00:00+00:00");
        assert_eq!(until("40d"), "2026-11-01T00:00:00+00:00");
    }
}
