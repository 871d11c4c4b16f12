//! The exact cache on the request path: after the rate limits and before routing, a cacheable
//! chat request is looked up under its canonical key in its namespace. A hit is answered
//! without a provider call (a stream is replayed as one) and recorded with the cost it saved;
//! a miss carries a [`Fill`] in its finisher, which stores the answer when the request succeeds.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::error::Error;
use sluice_core::record::{RecordStatus, RequestRecord};
use sluice_core::usage::CacheEntry;
use sluice_types::openai::{ChatCompletion, ChatRequest};

use crate::cache::{self, Cache, CacheConfig, CacheControl};

/// What the cache says about a request.
pub(crate) enum Lookup {
    /// The cache is off, or the request is not cacheable.
    Off,
    /// A fresh entry and its completion.
    Hit(Arc<CacheEntry>, Box<ChatCompletion>),
    /// Not found (or not to be read); `Some`: store the answer.
    Miss(Option<Fill>),
}

/// Stores a request's answer in the cache when its record closes successfully.
pub struct Fill {
    cache: Arc<Cache>,
    config: CacheConfig,
    key: String,
    namespace: String,
    model: String,
    ttl: Option<Duration>,
    /// Whether the record keeps the response body (else it was assembled for the cache only).
    keep_body: bool,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill")
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Fill {
    /// Stores the record's answer (a successful one that ended normally, from the model group
    /// the request was routed to), with its usage and what it cost, then drops the body from the
    /// record unless bodies are kept. A fallback model's answer is not stored: it would be served
    /// for the model asked after that model recovers, and to keys that may not use the fallback.
    pub(crate) fn complete(self, r: &mut RequestRecord) {
        let fell_back =
            r.attempt_log.first().map(|a| &a.group) != r.attempt_log.last().map(|a| &a.group);
        if fell_back && r.status == RecordStatus::Ok {
            tracing::debug!(request_id = %r.id, "the answer is not cached: a fallback model served it");
        }
        if r.status == RecordStatus::Ok
            && !fell_back
            && let Some(body) = &r.response_body
        {
            match with_usage(body.get(), r) {
                Some(text) => self.cache.store(cache::entry(
                    &self.config,
                    &self.key,
                    &self.namespace,
                    &self.model,
                    text,
                    r.cost_usd,
                    self.ttl,
                )),
                None => {
                    tracing::debug!(request_id = %r.id, "the answer is not cached: not every choice finished normally")
                }
            }
        }
        if !self.keep_body {
            r.response_body = None;
        }
    }
}

/// The completion's JSON with `usage` set from the record when it has none (a stream whose
/// upstream did not report usage), so that a replay can report it; `None` unless every choice
/// finished normally (`stop`, `length`, `tool_calls`).
fn with_usage(body: &str, r: &RequestRecord) -> Option<String> {
    let mut v: serde_json::Value = serde_json::from_str(body).ok()?;
    let choices = v.get("choices")?.as_array()?;
    let finished = !choices.is_empty()
        && choices.iter().all(|c| {
            matches!(
                c.get("finish_reason").and_then(|f| f.as_str()),
                Some("stop" | "length" | "tool_calls")
            )
        });
    if !finished {
        return None;
    }
    let obj = v.as_object_mut()?;
    if obj.get("usage").is_none_or(serde_json::Value::is_null) {
        obj.insert(
            "usage".into(),
            serde_json::json!({
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens.saturating_add(r.completion_tokens),
            }),
        );
    }
    serde_json::to_string(&v).ok()
}

/// Looks `req` up. Removes the body's `cache` object from the request in any case (it is
/// Sluice's, never sent upstream). A malformed `cache` object or `Cache-Control` header is a
/// 400.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn lookup(
    cache: Option<&Arc<Cache>>,
    config: &CacheConfig,
    req: &mut ChatRequest,
    header: Option<&str>,
    key_id: Option<&str>,
    team: Option<&str>,
    keep_body: bool,
) -> Result<Lookup, Error> {
    let body = req.extra.get("cache").cloned();
    cache::strip_control(req);
    let Some(cache) = cache else {
        return Ok(Lookup::Off);
    };
    if !config.enabled || !(config.nondeterministic || cache::is_deterministic(req)) {
        return Ok(Lookup::Off);
    }
    let control = CacheControl::parse(body.as_ref(), header)?;
    let namespace = config.namespace_for(key_id, team);
    let key = cache::cache_key(&namespace, req);
    if control.may_serve()
        && let Some(e) = cache.lookup(&key).await
        && control.accepts(&e, chrono::Utc::now())
    {
        match serde_json::from_str::<ChatCompletion>(&e.body) {
            Ok(c) => return Ok(Lookup::Hit(e, Box::new(c))),
            // Not a completion (written by something else): a miss, and overwritten.
            Err(err) => {
                tracing::warn!(error = %err, "a cached answer is not a completion; ignoring it")
            }
        }
    }
    // A stream's assembled answer carries text, tool calls and usage; a streamed request that
    // asks for more (log probabilities, audio) is not stored, so that no later request is
    // answered without what it asked for.
    let complete_when_assembled = !req.is_stream()
        || !(req.extra.get("logprobs") == Some(&serde_json::Value::Bool(true))
            || req.extra.contains_key("audio")
            || req.extra.contains_key("modalities"));
    let fill = (control.may_store() && complete_when_assembled).then(|| Fill {
        cache: cache.clone(),
        config: config.clone(),
        key,
        namespace,
        model: req.model.clone(),
        ttl: control.ttl,
        keep_body,
    });
    Ok(Lookup::Miss(fill))
}
