//! Records to store, and a field-by-field comparison.

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde_json::json;
use sluice_core::record::{Attempt, RecordStatus, RequestRecord, UsageSource};
use uuid::Uuid;

/// Now, truncated to the microsecond: what both backends keep exactly.
pub fn now_us() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A record with every optional field set and awkward values everywhere.
pub fn full_record() -> RequestRecord {
    let started = now_us();
    RequestRecord {
        id: Uuid::now_v7(),
        started_at: started,
        finished_at: started + TimeDelta::microseconds(1_234_567),
        endpoint: "chat.completions".into(),
        model: "gpt-4o-mini".into(),
        provider: Some("openai-eu".into()),
        deployment: Some("gpt-4o-mini-2024-07-18".into()),
        attempts: 3,
        status: RecordStatus::Error,
        http_status: 502,
        error_code: Some("upstream_error".into()),
        error_message: Some(
            "upstream said: \"bad gateway\" — it's ünïcødé 🚀\nsecond line\t'quoted' %_".into(),
        ),
        stream: true,
        latency_ms: 1_234.567_891_234_567,
        ttft_ms: Some(87.654_321_987_654),
        prompt_tokens: 123_456,
        completion_tokens: 7_890,
        cached_tokens: 4_096,
        usage_source: UsageSource::Provider,
        cost_usd: 0.000_123_456_789_012_345,
        finish_reason: Some("length".into()),
        user: Some("user-42".into()),
        session: Some("session-abc-😀".into()),
        tags: vec!["prod".into(), "team:search".into(), "ünï code".into()],
        metadata: json!({
            "tenant": "acme",
            "empty": {},
            "nested": {
                "list": [1, 2.5, "three", null, true, {"k": []}],
                "deep": {"x": {"y": {"z": "bottom"}}},
            },
            "big": 9_007_199_254_740_993_u64,
            "negative": -17,
            "quote\"key": "value with \\ backslash",
        }),
        request_body: Some(
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello 👋"},
                ],
                "temperature": 0.7,
                "stream": true,
            })
            .into(),
        ),
        response_body: Some(
            json!({
                "id": "chatcmpl-123",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 123_456, "completion_tokens": 7_890},
            })
            .into(),
        ),
        attempt_log: vec![
            Attempt {
                group: "gpt-4o-mini".into(),
                deployment: "openai-us/gpt-4o-mini".into(),
                provider: "openai-us".into(),
                model: "gpt-4o-mini".into(),
                started_ms: 0.125,
                latency_ms: 30_000.5,
                outcome: "timeout".into(),
                error_code: Some("upstream_timeout".into()),
                error: Some("upstream timed out: no answer in 30 s — ünï".into()),
            },
            Attempt {
                group: "gpt-4o-mini".into(),
                deployment: "openai-eu/gpt-4o-mini".into(),
                provider: "openai-eu".into(),
                model: "gpt-4o-mini-2024-07-18".into(),
                started_ms: 30_001.0,
                latency_ms: 87.5,
                outcome: "ok".into(),
                error_code: None,
                error: None,
            },
        ],
        route: Some(json!({"strategy": "complexity", "tier": "small", "score": 0.125})),
        key_id: Some("0123456789abcdef".into()),
        cache: Some("hit".into()),
        cost_saved_usd: 0.000_987_654_321_012_345,
    }
}

/// Another fully set record, with the other enum variants.
pub fn full_record_cancelled() -> RequestRecord {
    RequestRecord {
        status: RecordStatus::Cancelled,
        http_status: 499,
        stream: false,
        usage_source: UsageSource::Tokenizer,
        cost_usd: 12.345_678_901_234_5,
        finish_reason: Some("stop".into()),
        tags: vec!["single".into()],
        metadata: json!([1, "two", {"three": 3}]),
        cache: Some("miss".into()),
        cost_saved_usd: 0.0,
        ..full_record()
    }
}

/// A record with every optional field `None` (and empty tags, null metadata).
pub fn minimal_record() -> RequestRecord {
    let mut r = RequestRecord::start(Uuid::now_v7(), "embeddings", false);
    r.started_at = now_us();
    r.finished_at = r.started_at;
    r.model = "text-embedding-3-small".into();
    r
}

/// A plain record of `model`, `user` and `status`.
pub fn record(model: &str, user: Option<&str>, status: RecordStatus) -> RequestRecord {
    // The time first, then the id: `since` a record's start includes the record.
    let started = now_us();
    let mut r = RequestRecord::start(Uuid::now_v7(), "chat.completions", false);
    r.started_at = started;
    r.finished_at = started + TimeDelta::milliseconds(5);
    r.model = model.into();
    r.user = user.map(str::to_owned);
    r.status = status;
    r.http_status = match status {
        RecordStatus::Ok => 200,
        RecordStatus::Error => 500,
        RecordStatus::Cancelled => 499,
    };
    r.latency_ms = 5.0;
    r.prompt_tokens = 10;
    r.completion_tokens = 20;
    r.usage_source = UsageSource::Tokenizer;
    r.metadata = json!({"k": "v"});
    r
}

/// Asserts `got == want` field by field (so a failure names the field), then as a whole.
pub fn assert_same_record(got: &RequestRecord, want: &RequestRecord) {
    macro_rules! fields {
        ($($f:ident),* $(,)?) => {
            $(
                assert_eq!(got.$f, want.$f, "field `{}` of record {}", stringify!($f), want.id);
            )*
        };
    }
    fields!(
        id,
        started_at,
        finished_at,
        endpoint,
        model,
        provider,
        deployment,
        attempts,
        status,
        http_status,
        error_code,
        error_message,
        stream,
        latency_ms,
        ttft_ms,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        usage_source,
        cost_usd,
        finish_reason,
        user,
        session,
        tags,
        metadata,
        request_body,
        response_body,
        attempt_log,
        route,
        key_id,
        cache,
        cost_saved_usd,
    );
    assert_eq!(got, want);
}

pub fn ids(records: &[RequestRecord]) -> Vec<Uuid> {
    records.iter().map(|r| r.id).collect()
}
