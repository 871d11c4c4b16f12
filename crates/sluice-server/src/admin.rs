//! The admin API: the request log (`GET /api/requests` with filters and paging,
//! `GET /api/requests/{id}`), the router's live state (`GET /api/deployments`) and
//! `POST /api/config/reload`.

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::record::{RecordQuery, RecordStatus};

use crate::SharedState;
use crate::error::ApiError;

/// Query parameters of `GET /api/requests`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub model: Option<String>,
    /// `ok`, `error` or `cancelled`.
    pub status: Option<String>,
    pub user: Option<String>,
    /// A virtual key's id.
    pub key: Option<String>,
    /// An RFC 3339 time, or a duration back from now: `30s`, `15m`, `2h`, `7d`.
    pub since: Option<String>,
    /// Page backwards from this record id (exclusive); use `next_before` from the last page.
    pub before: Option<String>,
    /// 1 to 1000 (default 50).
    pub limit: Option<u32>,
}

/// Parses `since`: RFC 3339, or `N{s,m,h,d}` before now.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    parse_time_or_duration(s, now, false, "15m")
}

/// Parses a time given as RFC 3339, as a date (its start, UTC), or as a duration `N{s,m,h,d}` counted from `now` backwards
/// or (`forward`) forwards. `example` is the duration the error message suggests.
pub fn parse_time_or_duration(
    s: &str,
    now: DateTime<Utc>,
    forward: bool,
    example: &str,
) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // An offset without its colon (`+0000`), or a space for the `T`.
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f%z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    // `Z` after a time without seconds, as `sluice usage` prints its period (`2026-12-01 00:00Z`).
    let s = s.strip_suffix('Z').filter(|t| t.len() == 16).unwrap_or(s);
    // A date alone: its start, UTC.
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    // A time without an offset: UTC.
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| {
        format!(
            "`{s}` is neither an RFC 3339 time, a date (2026-12-05) nor a duration like {example}"
        )
    })?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ if num.is_empty() => {
            return Err(format!(
                "`{s}` is neither an RFC 3339 time, a date (2026-12-05) nor a duration like {example}"
            ));
        }
        // Shaped like a date or a time, but not a valid one.
        _ if unit.starts_with(['-', ':', 'T']) => {
            return Err(format!(
                "`{s}` is not a valid date or time; write a date (2026-12-05), a time (2026-12-05T10:00:00, UTC unless it has an offset) or a duration like {example}"
            ));
        }
        _ if unit.starts_with('.') => {
            return Err(format!(
                "`{s}`: a duration is a whole number and a unit (s, m, h or d), like 90m"
            ));
        }
        _ => return Err(format!("`{s}`: the duration unit must be s, m, h or d")),
    };
    let delta = n
        .checked_mul(unit_secs)
        .and_then(chrono::TimeDelta::try_seconds);
    let t = if forward {
        delta.and_then(|d| now.checked_add_signed(d))
    } else {
        delta.and_then(|d| now.checked_sub_signed(d))
    };
    t.ok_or_else(|| {
        format!(
            "`{s}` is too far in the {}",
            if forward { "future" } else { "past" }
        )
    })
}

impl ListParams {
    /// The store query these parameters ask for.
    pub fn to_query(&self) -> Result<RecordQuery, Error> {
        let status = match &self.status {
            None => None,
            Some(s) => Some(RecordStatus::parse(s).ok_or_else(|| {
                Error::invalid(format!("status `{s}` is not one of ok, error, cancelled"))
                    .with_param("status")
            })?),
        };
        let since = match &self.since {
            None => None,
            Some(s) => Some(
                parse_since(s, Utc::now()).map_err(|e| Error::invalid(e).with_param("since"))?,
            ),
        };
        let before = match &self.before {
            None => None,
            Some(b) => Some(uuid::Uuid::parse_str(b).map_err(|_| {
                Error::invalid(format!("before `{b}` is not a request id")).with_param("before")
            })?),
        };
        let limit = self.limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(Error::invalid("limit must be between 1 and 1000").with_param("limit"));
        }
        Ok(RecordQuery {
            model: self.model.clone(),
            status,
            user: self.user.clone(),
            key: self.key.clone(),
            since,
            finished_since: None,
            before,
            limit,
            without_bodies: false,
        })
    }
}

pub async fn list_requests(
    State(state): State<SharedState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return ApiError::openai(crate::query_error(&e)).into_response(),
    };
    let mut q = match params.to_query() {
        Ok(q) => q,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    let limit = q.limit;
    // The window's start as a time: a client paging with a relative `since` sends this back with
    // `next_before`, so that later pages do not lose the oldest rows as `now` moves on.
    let since = q
        .since
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    // One more row tells whether another page follows; the store gives at most 1000 rows, so a
    // page of 1000 asks for the row after it separately.
    q.limit = (limit + 1).min(1000);
    let listed = match state.store.list(&q).await {
        Ok(rows) if rows.len() == limit as usize && q.limit == limit => {
            let after = RecordQuery {
                before: rows.last().map(|r| r.id),
                limit: 1,
                without_bodies: true,
                ..q.clone()
            };
            state
                .store
                .list(&after)
                .await
                .map(|more| (rows, !more.is_empty()))
        }
        Ok(rows) => Ok((rows, false)),
        Err(e) => Err(e),
    };
    match listed.map(|(rows, more)| (rows.len() > limit as usize || more, rows)) {
        Ok((has_more, mut rows)) => {
            rows.truncate(limit as usize);
            let next_before = if has_more {
                rows.last().map(|r| r.id.hyphenated().to_string())
            } else {
                None
            };
            Json(serde_json::json!({
                "object": "list",
                "data": rows,
                "has_more": has_more,
                "next_before": next_before,
                "since": since,
            }))
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "listing request records failed");
            ApiError::openai(Error::new(
                ErrorCode::Unavailable,
                "the request store is unavailable; try again",
            ))
            .into_response()
        }
    }
}

pub async fn get_request(
    State(state): State<SharedState>,
    crate::IdPath(id): crate::IdPath,
) -> Response {
    let Ok(uuid) = uuid::Uuid::parse_str(&id) else {
        return ApiError::openai(
            Error::new(ErrorCode::NotFound, format!("`{id}` is not a request id")).with_param("id"),
        )
        .into_response();
    };
    match state.store.get(uuid).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => ApiError::openai(Error::new(
            ErrorCode::NotFound,
            format!("no request `{id}` in the log (records are written within milliseconds; retry if it just finished)"),
        ))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading a request record failed");
            ApiError::openai(Error::new(ErrorCode::Unavailable, "the request store is unavailable; try again"))
                .into_response()
        }
    }
}

/// `GET /api/deployments`: every deployment's live state (in flight, latency, capacity use,
/// circuit breaker), grouped by model.
pub async fn deployments(State(state): State<SharedState>) -> Response {
    let router = state.gateway.router();
    let models: Vec<serde_json::Value> = router
        .groups()
        .map(|g| {
            // A complexity model only picks a tier: retries, timeouts and fallbacks are the
            // tiers' own (its configuration refuses them), so none are shown for it.
            let own = g.classifier.is_none();
            serde_json::json!({
                "model": g.name,
                "strategy": g.strategy.as_str(),
                "tiers": g.classifier.as_ref().map(|c| c
                    .tiers()
                    .iter()
                    .map(|t| serde_json::json!({"name": t.name, "model": t.model, "max_score": t.max_score}))
                    .collect::<Vec<_>>()),
                "fallbacks": own.then_some(&g.fallbacks),
                "retries": own.then_some(&g.retry),
                "timeouts": own.then_some(&g.timeouts),
            })
        })
        .collect();
    Json(serde_json::json!({
        "models": models,
        "deployments": router.status(),
    }))
    .into_response()
}

/// This process as `HOST:PID`: a reload changes only the replica that took it, so its answer
/// and audit entry say which one that was.
fn replica() -> &'static str {
    static REPLICA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    REPLICA.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "localhost".to_string());
        format!("{host}:{}", std::process::id())
    })
}

/// `POST /api/config/reload`: re-reads the configuration file and swaps the router; requests in
/// flight finish on the old one. An invalid file is answered 400 and changes nothing.
pub async fn reload(
    State(state): State<SharedState>,
    axum::Extension(actor): axum::Extension<sluice_core::keys::Actor>,
) -> Response {
    let Some(r) = state.reloader.clone() else {
        return ApiError::openai(Error::new(
            ErrorCode::InvalidRequest,
            "this server runs on the embedded default (no config file); there is nothing to reload",
        ))
        .into_response();
    };
    match tokio::task::spawn_blocking(move || r.reload()).await {
        Ok(Ok(summary)) => {
            crate::keys::audit(
                &state,
                &actor,
                "config.reload",
                None,
                "ok",
                serde_json::json!({ "summary": summary, "replica": replica() }),
            )
            .await;
            Json(serde_json::json!({"reloaded": true, "summary": summary, "replica": replica()}))
                .into_response()
        }
        Ok(Err(e)) => {
            crate::keys::audit(
                &state,
                &actor,
                "config.reload",
                None,
                "rejected",
                serde_json::json!({ "error": e, "replica": replica() }),
            )
            .await;
            ApiError::openai(Error::invalid(format!(
                "the configuration was not reloaded (the running one stays): {e}"
            )))
            .into_response()
        }
        Err(_) => ApiError::openai(Error::internal("the reload task failed")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_durations() {
        let now = Utc::now();
        assert_eq!(
            parse_since("15m", now).unwrap(),
            now - chrono::Duration::minutes(15)
        );
        assert_eq!(
            parse_since("2d", now).unwrap(),
            now - chrono::Duration::days(2)
        );
        assert!(parse_since("2026-01-01T00:00:00Z", now).is_ok());
        assert_eq!(
            parse_since("2026-12-05", now).unwrap(),
            "2026-12-05T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let err = parse_since("soon", now).unwrap_err();
        assert!(err.contains("a date"), "{err}");
        assert!(parse_since("5y", now).unwrap_err().contains("unit"));
        // A bad date is said to be one (it read as a wrong duration unit), a time without an
        // offset is UTC, a fraction of a unit is refused as such.
        let err = parse_since("2026-13-01", now).unwrap_err();
        assert!(err.contains("not a valid date"), "{err}");
        assert_eq!(
            parse_since("2026-12-05T10:00:00", now).unwrap(),
            "2026-12-05T10:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert!(
            parse_since("1.5h", now)
                .unwrap_err()
                .contains("whole number")
        );
        // The forms people type and that Sluice prints: minutes without seconds, `sluice
        // usage`'s own `…00:00Z`, an offset without its colon.
        let ten = "2026-12-05T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
        for s in [
            "2026-12-05 10:00",
            "2026-12-05 10:00Z",
            "2026-12-05T10:00:00+0000",
            "2026-12-05T11:00:00+0100",
            "2026-12-05 10:00:00+00:00",
        ] {
            assert_eq!(parse_since(s, now).unwrap(), ten, "{s}");
        }
    }
}
