//! Completes a request's record exactly once, whatever happens: success, error, or the client
//! going away (then `Drop` records it as cancelled).

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::price::{CacheWrites, ModelPrice};
use sluice_core::record::{LogSink, RawJson, RecordStatus, RequestRecord, UsageSource};
use sluice_types::openai::{
    ChatCompletion, ChatRequest, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, Usage,
};

use crate::router::{InFlight, TokenReservation};
use crate::{Deployment, RequestContext, metrics::Metrics, tokens};

/// What a complexity-routed request is measured against: the strongest tier, by its model group
/// and what it charges (`None`: no price known). A request that group served saves nothing,
/// whichever of its deployments served it; one served by another (a lower tier, or a fallback)
/// is measured against the price.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    pub group: String,
    pub price: Option<ModelPrice>,
}

/// Owns a request's record until it is complete.
pub struct Finisher {
    started: Instant,
    record: Option<RequestRecord>,
    sink: LogSink,
    metrics: Arc<Metrics>,
    model_known: bool,
    /// When the attempt under way started (until [`log_attempt`](Self::log_attempt) ends it).
    attempt_open: Option<Instant>,
    /// The serving deployment's in-flight slot, released when the record closes.
    in_flight: Option<InFlight>,
    /// Its tokens-per-minute reservation, settled with the real count when the record closes.
    tokens: Option<TokenReservation>,
    /// For complexity routing: the strongest tier's price, to report the cost saved.
    baseline: Baseline,
    /// Prompt tokens the provider reported writing to its cache (priced for the baseline too).
    cache_writes: CacheWrites,
    /// The rate-limit admissions, settled with the real tokens at the end.
    limit: Vec<crate::limits::Admitted>,
    /// The admission by the limits kept in Redis.
    shared_limit: Option<crate::limits::SharedAdmission>,
    /// That admission once the record closed, its in-flight slots still to give back: the
    /// async ends give them back before the client has its answer (see [`Self::let_go`]),
    /// `Drop` in the background.
    closing_limit: Option<crate::limits::SharedAdmission>,
    /// The budgets' reservation, settled with the real cost at the end.
    budget: Option<crate::budget::Reservation>,
    /// Where to put the answer in the cache when the request succeeds.
    fill: Option<crate::caching::Fill>,
    /// Set when the gateway ends the calls still running at shutdown: a record closed unfinished
    /// then says so, not that the client left.
    aborting: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Finisher {
    pub fn new(
        ctx: RequestContext,
        sink: LogSink,
        metrics: Arc<Metrics>,
        model_known: bool,
    ) -> Self {
        Finisher {
            started: ctx.started,
            record: Some(ctx.record),
            sink,
            metrics,
            model_known,
            attempt_open: None,
            in_flight: None,
            tokens: None,
            baseline: Baseline::default(),
            cache_writes: CacheWrites::default(),
            limit: Vec::new(),
            shared_limit: None,
            closing_limit: None,
            budget: None,
            fill: None,
            aborting: None,
        }
    }

    /// Records a call left unfinished while `flag` is set as ended by the shutdown.
    pub fn with_abort_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.aborting = Some(flag);
        self
    }

    /// Keeps an admission by the limits kept in Redis until the record closes.
    pub fn hold_shared_limits(&mut self, admitted: crate::limits::SharedAdmission) {
        self.shared_limit = Some(admitted);
    }

    /// Keeps the budgets' reservation until the record closes.
    pub fn hold_budget(&mut self, r: Option<crate::budget::Reservation>) {
        self.budget = r;
    }

    /// Puts the answer in the cache if the request succeeds.
    pub fn fill_cache(&mut self, fill: crate::caching::Fill) {
        self.fill = Some(fill);
    }

    /// Whether the answer goes to the cache (then a stream assembles its body).
    pub fn fills_cache(&self) -> bool {
        self.fill.is_some()
    }

    /// Notes the cache's part on the record.
    pub fn set_cache(&mut self, outcome: &'static str, saved_usd: f64) {
        if let Some(r) = self.rec() {
            r.cache = Some(outcome.to_string());
            r.cost_saved_usd = saved_usd;
        }
    }

    /// The request's user, as attributed so far.
    pub fn user(&self) -> Option<&str> {
        self.record.as_ref().and_then(|r| r.user.as_deref())
    }

    /// Provider calls made so far.
    pub fn attempts(&self) -> u32 {
        self.record.as_ref().map_or(0, |r| r.attempts)
    }

    /// Keeps the serving deployment's in-flight slot and token reservation until the end.
    pub fn hold(&mut self, in_flight: InFlight, tokens: Option<TokenReservation>) {
        self.in_flight = Some(in_flight);
        self.tokens = tokens;
    }

    /// Keeps a virtual key's rate-limit admission until the record closes.
    pub fn hold_limits(&mut self, admitted: Vec<crate::limits::Admitted>) {
        self.limit = admitted;
    }

    /// Gives back what the rate limits counted for this request (a budget refused it before it
    /// went anywhere): it counts against no `rpm` or `tpm`. Waits a moment for Redis to take it
    /// (a client retrying at once would find it still counted), then goes on in the background.
    pub async fn give_back_limits(&mut self) {
        for l in std::mem::take(&mut self.limit) {
            l.cancel();
        }
        if let Some(l) = self.shared_limit.as_mut()
            && let Some(done) = l.cancel()
        {
            let _ = tokio::time::timeout(RELEASE_WAIT, done).await;
        }
    }

    /// Notes how the router chose; with a baseline, the record also gets what the strongest tier
    /// would have cost and the difference.
    pub fn set_route(&mut self, route: serde_json::Value, baseline: Baseline) {
        if let Some(r) = self.rec() {
            r.route = Some(route);
        }
        self.baseline = baseline;
    }

    /// Appends one provider call to the record's attempt log.
    /// Completes the attempt that [`attempt`](Self::attempt) opened: how long it took and, when it
    /// failed, its class and error.
    pub fn log_attempt(
        &mut self,
        took: std::time::Duration,
        failure: Option<(sluice_core::error::ErrorClass, &Error)>,
    ) {
        self.attempt_open = None;
        if let Some(a) = self.rec().and_then(|r| r.attempt_log.last_mut()) {
            a.latency_ms = round3(took.as_secs_f64() * 1000.0);
        }
        self.set_attempt_outcome(failure);
    }

    /// Marks the serving attempt failed after all: its stream broke after it started.
    pub fn fail_served_attempt(&mut self, class: sluice_core::error::ErrorClass, err: &Error) {
        self.end_served_attempt();
        self.set_attempt_outcome(Some((class, err)));
    }

    /// The serving attempt's stream ended (whole, broken or left by its client): its latency is
    /// its whole time, not the time to the stream's opening noted when it opened.
    fn end_served_attempt(&mut self) {
        let now = self.started.elapsed().as_secs_f64() * 1000.0;
        if let Some(a) = self.rec().and_then(|r| r.attempt_log.last_mut()) {
            a.latency_ms = round3((now - a.started_ms).max(0.0));
        }
    }

    /// Marks the serving attempt cancelled: its client left while the stream was still under
    /// way (for the deployment's breaker it succeeded; on the record it did not finish).
    pub fn cancel_served_attempt(&mut self) {
        self.end_served_attempt();
        if let Some(a) = self.rec().and_then(|r| r.attempt_log.last_mut()) {
            a.outcome = "cancelled".to_string();
            a.error_code = None;
            a.error = None;
        }
    }

    /// The latest attempt's outcome: `ok`, or the failure's class and error.
    fn set_attempt_outcome(&mut self, failure: Option<(sluice_core::error::ErrorClass, &Error)>) {
        if let Some(a) = self.rec().and_then(|r| r.attempt_log.last_mut()) {
            a.outcome = failure.map_or("ok", |(c, _)| c.as_str()).to_string();
            a.error_code = failure.map(|(_, e)| e.code.as_str().to_string());
            a.error = failure.map(|(_, e)| e.message.clone());
        }
    }

    pub fn id(&self) -> uuid::Uuid {
        self.record.as_ref().map(|r| r.id).unwrap_or_default()
    }

    fn rec(&mut self) -> Option<&mut RequestRecord> {
        self.record.as_mut()
    }

    /// Notes a provider call to `dep`.
    pub fn attempt(&mut self, group: &str, dep: &Deployment, started: Instant) {
        let offset = started
            .saturating_duration_since(self.started)
            .as_secs_f64()
            * 1000.0;
        self.attempt_open = Some(started);
        if let Some(r) = self.rec() {
            r.attempts += 1;
            r.provider = Some(dep.provider_name.clone());
            r.deployment = Some(dep.upstream_model().to_string());
            // On the record from its start: an attempt the client's disconnect cuts short stays
            // on it as `cancelled`.
            r.attempt_log.push(sluice_core::record::Attempt {
                group: group.to_string(),
                deployment: dep.id.clone(),
                provider: dep.provider_name.clone(),
                model: dep.upstream_model().to_string(),
                started_ms: round3(offset),
                latency_ms: 0.0,
                outcome: "cancelled".to_string(),
                error_code: None,
                error: None,
            });
        }
    }

    /// Notes the moment the first generated content was handed to the client.
    pub fn first_token(&mut self) {
        let ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if let Some(r) = self.rec()
            && r.ttft_ms.is_none()
        {
            r.ttft_ms = Some(round3(ms));
        }
    }

    /// Takes the record out, stamping its end time and latency, and counts it.
    fn close(&mut self) -> Option<RequestRecord> {
        let mut r = self.record.take()?;
        r.finished_at = Utc::now();
        r.latency_ms = round3(self.started.elapsed().as_secs_f64() * 1000.0);
        self.in_flight = None;
        let tokens = r.prompt_tokens.saturating_add(r.completion_tokens);
        if let Some(t) = self.tokens.take() {
            t.settle(tokens);
        }
        for mut l in std::mem::take(&mut self.limit) {
            l.settle(tokens);
        }
        if let Some(mut l) = self.shared_limit.take() {
            l.settle(tokens);
            self.closing_limit = Some(l);
        }
        if let Some(b) = self.budget.take() {
            b.settle(r.cost_usd);
        }
        if let Some(fill) = self.fill.take() {
            fill.complete(&mut r);
        }
        // Answered, or charged all the same (a stream its client left): what the strongest tier
        // would have cost for those tokens.
        if let Some(serde_json::Value::Object(route)) = r.route.as_mut()
            && (r.status == RecordStatus::Ok || r.cost_usd > 0.0)
            && !self.baseline.group.is_empty()
            && let Some(base) = if r
                .attempt_log
                .last()
                .is_some_and(|a| a.group == self.baseline.group)
            {
                Some(r.cost_usd)
            } else {
                self.baseline.price.map(|p| {
                    p.cost_with_writes(
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.cached_tokens,
                        self.cache_writes,
                    )
                })
            }
        {
            route.insert("baseline_cost_usd".into(), base.into());
            route.insert("saved_usd".into(), (base - r.cost_usd).into());
        }
        self.metrics.observe(&r, self.model_known);
        Some(r)
    }

    /// Gives back the request's in-flight slots kept in Redis, waiting a moment for Redis to
    /// take them: a client that sends its next request as soon as it has this answer would
    /// otherwise find its `max_parallel` still full. A release that takes longer (Redis slow or
    /// down) goes on in the background. Called after the record is handed to the log: a request
    /// dropped during the wait (its client gone) loses nothing.
    async fn let_go(&mut self) {
        if let Some(l) = self.closing_limit.take() {
            l.release_within(RELEASE_WAIT).await;
        }
    }

    fn set_error(r: &mut RequestRecord, err: &Error) {
        r.status = if err.code == ErrorCode::ClientClosed {
            RecordStatus::Cancelled
        } else {
            RecordStatus::Error
        };
        // The status the client got: Anthropic's clients get 529 for an overloaded upstream.
        r.http_status = err.code.status_on(&r.endpoint);
        r.error_code = Some(err.code.as_str().to_string());
        r.error_message = Some(err.message.clone());
    }

    /// Completes the record as failed with `err`.
    /// Like [`fail`](Self::fail), but the record only counts in the metrics: it is not written
    /// (a refusal among a flood of them).
    pub fn fail_unlogged(&mut self, err: &Error) {
        if let Some(r) = self.rec() {
            Self::set_error(r, err);
        }
        let _ = self.close();
    }

    pub async fn fail(&mut self, err: &Error) {
        if let Some(r) = self.rec() {
            Self::set_error(r, err);
        }
        if let Some(r) = self.close() {
            self.sink.send(r).await;
            self.let_go().await;
        }
    }

    /// Completes the record of a whole chat completion; returns its cost, and the usage counted
    /// with the deployment's model's tokenizer when the upstream reported none (the client is
    /// then given that). `req` is the client's request.
    pub async fn complete(
        &mut self,
        req: &ChatRequest,
        dep: &Deployment,
        completion: &ChatCompletion,
        body: Option<RawJson>,
    ) -> (f64, Option<Usage>) {
        if self.record.is_none() {
            return (0.0, None);
        }
        // The tokenizer's counts, when the upstream reported none.
        let counts = match completion.usage {
            Some(_) => None,
            None => {
                let output = completion.output_text();
                let long = tokens::counting_is_long(req, output.len());
                let (model, req) = (dep.upstream_model().to_string(), req.clone());
                let count = move || {
                    Usage::new(
                        tokens::count_prompt_and_media(&model, &req),
                        tokens::count_text(&model, &output),
                        0,
                    )
                };
                Some(if long {
                    tokens::off_thread(count).await
                } else {
                    count()
                })
            }
        };
        let counted = {
            let Some(r) = self.record.as_mut() else {
                return (0.0, None);
            };
            let usage = completion.usage.clone();
            self.cache_writes = apply_usage(r, usage, dep.price, || counts.unwrap_or_default());
            r.finish_reason = completion
                .choices
                .first()
                .and_then(|c| c.finish_reason.clone());
            r.response_body = body;
            let counted = (r.usage_source == UsageSource::Tokenizer)
                .then(|| Usage::new(r.prompt_tokens, r.completion_tokens, 0));
            (r.cost_usd, counted)
        };
        if let Some(r) = self.close() {
            self.sink.send(r).await;
            self.let_go().await;
        }
        counted
    }

    /// Completes the record of a request answered from the cache.
    pub async fn cached(&mut self, finish_reason: Option<String>, body: Option<RawJson>) {
        if let Some(r) = self.rec() {
            r.finish_reason = finish_reason;
            r.response_body = body;
        }
        if let Some(r) = self.close() {
            self.sink.send(r).await;
            self.let_go().await;
        }
    }

    /// Completes the record of an embeddings call; returns its cost.
    /// Completes the record of an embeddings call; returns its cost, and the usage Sluice
    /// counted when the upstream reported none (for the client's answer).
    pub async fn embedded(
        &mut self,
        req: &EmbeddingRequest,
        dep: &Deployment,
        resp: &EmbeddingResponse,
    ) -> (f64, Option<EmbeddingUsage>) {
        if self.record.is_none() {
            return (0.0, None);
        }
        // Some OpenAI-shaped APIs report only the total (all of it input).
        let reported = match resp.usage.prompt_tokens {
            0 => resp.usage.total_tokens,
            n => n,
        };
        // The tokenizer's count, when the upstream reported none.
        let counts = match reported {
            0 => {
                let texts: Vec<String> =
                    req.input.texts().into_iter().map(str::to_string).collect();
                let long =
                    texts.iter().map(String::len).sum::<usize>() > tokens::TOKENIZE_MAX_BYTES;
                let (model, ids) = (dep.upstream_model().to_string(), req.input.token_ids());
                let count = move || {
                    let n: u64 = texts.iter().map(|t| tokens::count_text(&model, t)).sum();
                    Usage::new(n + ids, 0, 0)
                };
                Some(if long {
                    tokens::off_thread(count).await
                } else {
                    count()
                })
            }
            _ => None,
        };
        let (cost, counted) = {
            let Some(r) = self.record.as_mut() else {
                return (0.0, None);
            };
            let usage = (reported > 0).then(|| Usage::new(reported, 0, 0));
            apply_usage(r, usage, dep.price, || counts.unwrap_or_default());
            // The client gets the usage recorded whenever the upstream's lacked its prompt
            // count (a total alone gave the client `prompt_tokens: 0`).
            let counted = (resp.usage.prompt_tokens == 0).then_some(EmbeddingUsage {
                prompt_tokens: r.prompt_tokens,
                total_tokens: r.prompt_tokens,
            });
            (r.cost_usd, counted)
        };
        if let Some(r) = self.close() {
            self.sink.send(r).await;
            self.let_go().await;
        }
        (cost, counted)
    }

    /// Completes the record of a stream. `error` is set when the stream failed after it started.
    pub async fn finish_stream(
        &mut self,
        usage: Option<Usage>,
        price: Option<ModelPrice>,
        count: impl FnOnce() -> Usage,
        finish_reason: Option<String>,
        response_body: Option<RawJson>,
        error: Option<&Error>,
    ) {
        self.end_served_attempt();
        if let Some(r) = self.record.as_mut() {
            self.cache_writes = apply_usage(r, usage, price, count);
            r.finish_reason = finish_reason;
            r.response_body = response_body;
            if let Some(e) = error {
                Self::set_error(r, e);
                // The client already got 200 and the stream; the record keeps the error code.
                r.http_status = 200;
            }
        }
        if let Some(r) = self.close() {
            self.sink.send(r).await;
            self.let_go().await;
        }
    }

    /// Charges the prompt of a provider call the client's departure cut short (when nothing
    /// was counted yet), estimated from its size: the upstream received it and bills it. `Drop`
    /// then writes the record as cancelled, and the ledgers settle with this cost. (An estimate,
    /// not the tokenizer: the first cancellation would otherwise load tens of megabytes of
    /// encodings that a gateway whose upstreams report usage never needs.)
    pub fn charge_prompt(&mut self, prompt_tokens: u64, price: Option<ModelPrice>) {
        if let Some(r) = self.record.as_mut()
            && r.usage_source == UsageSource::None
        {
            apply_usage(r, None, price, || Usage::new(prompt_tokens, 0, 0));
            r.usage_source = UsageSource::Estimate;
        }
    }

    /// Records what a cancelled stream produced so far; `Drop` then writes it as cancelled.
    /// Without the upstream's usage, `estimate` gives the counts from sizes (the record says
    /// `estimate`).
    pub fn note_partial(
        &mut self,
        usage: Option<Usage>,
        price: Option<ModelPrice>,
        estimate: impl FnOnce() -> Usage,
        response_body: Option<RawJson>,
    ) {
        if let Some(r) = self.record.as_mut() {
            let estimated = usage.is_none();
            self.cache_writes = apply_usage(r, usage, price, estimate);
            if estimated {
                r.usage_source = UsageSource::Estimate;
            }
            r.response_body = response_body;
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        let open = self.attempt_open.take();
        let shutdown = self
            .aborting
            .as_ref()
            .is_some_and(|a| a.load(std::sync::atomic::Ordering::Acquire));
        if let Some(r) = self.rec() {
            if let Some(started) = open
                && let Some(a) = r.attempt_log.last_mut()
            {
                a.latency_ms = round3(started.elapsed().as_secs_f64() * 1000.0);
            }
            r.status = RecordStatus::Cancelled;
            let (code, message) = if shutdown {
                (
                    ErrorCode::Unavailable,
                    "the gateway ended this call at shutdown, when its grace period was over",
                )
            } else {
                (
                    ErrorCode::ClientClosed,
                    "the client closed the connection before the response was complete",
                )
            };
            r.http_status = code.status();
            r.error_code = Some(code.as_str().to_string());
            r.error_message = Some(message.into());
        }
        if let Some(r) = self.close() {
            self.sink.send_detached(r);
        }
    }
}

/// How long an answer waits for Redis to take back its in-flight slots.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The most tokens a record counts per field (as the store keeps them): far beyond any real
/// request; a broken upstream may report anything.
const MAX_TOKENS: u64 = 1 << 40;

/// Milliseconds to the microsecond (what a clock reading means; no binary-fraction noise).
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Sets tokens, their source and cost: the provider's usage when it reported one, else the
/// tokenizer's count (with the prompt's cache reads and writes when the provider told them
/// before it stopped). Returns the prompt tokens the provider wrote to its cache.
fn apply_usage(
    r: &mut RequestRecord,
    usage: Option<Usage>,
    price: Option<ModelPrice>,
    count: impl FnOnce() -> Usage,
) -> CacheWrites {
    // A broken upstream's absurd counts are priced as they are stored, not as sent.
    let clamp = |n: u64| n.min(MAX_TOKENS);
    let (u, source) = match usage {
        Some(u) => (u, UsageSource::Provider),
        None => (count(), UsageSource::Tokenizer),
    };
    r.prompt_tokens = clamp(u.prompt_tokens);
    r.completion_tokens = clamp(u.completion_tokens);
    // Cached prompt tokens are prompt tokens: an upstream that reports more is held to those,
    // as the cost already was.
    r.cached_tokens = clamp(u.cached_tokens()).min(r.prompt_tokens);
    let writes = CacheWrites {
        tokens: clamp(u.cache_write_tokens()),
        one_hour: clamp(u.cache_write_1h_tokens()),
    };
    r.usage_source = source;
    r.cost_usd = price
        .map(|p| {
            p.cost_with_writes(
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_tokens,
                writes,
            )
        })
        .unwrap_or(0.0);
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_cache_writes_are_charged_at_their_price() {
        let price = ModelPrice {
            input: 3.0,
            output: 15.0,
            cached_input: Some(0.30),
            cache_write_input: Some(3.75),
            cache_write_1h_input: None,
        };
        let mut usage = Usage::new(151_000, 200, 50_000);
        usage.set_cache_write_tokens(100_000);
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        apply_usage(&mut r, Some(usage), Some(price), || unreachable!());
        assert_eq!((r.prompt_tokens, r.cached_tokens), (151_000, 50_000));
        let want = (1_000.0 * 3.0 + 100_000.0 * 3.75 + 50_000.0 * 0.30 + 200.0 * 15.0) / 1e6;
        assert!(
            (r.cost_usd - want).abs() < 1e-12,
            "{} vs {want}",
            r.cost_usd
        );
        // A quarter of them written for an hour: those at twice the input price.
        let mut usage = Usage::new(151_000, 200, 50_000);
        usage.set_cache_write_tokens(100_000);
        usage.set_cache_write_1h_tokens(25_000);
        apply_usage(&mut r, Some(usage), Some(price), || unreachable!());
        let want =
            (1_000.0 * 3.0 + 75_000.0 * 3.75 + 25_000.0 * 6.0 + 50_000.0 * 0.30 + 200.0 * 15.0)
                / 1e6;
        assert!(
            (r.cost_usd - want).abs() < 1e-12,
            "{} vs {want}",
            r.cost_usd
        );
    }

    #[test]
    fn cached_tokens_are_never_more_than_the_prompt() {
        let price = ModelPrice {
            input: 1.0,
            output: 2.0,
            cached_input: Some(0.1),
            cache_write_input: None,
            cache_write_1h_input: None,
        };
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        apply_usage(
            &mut r,
            Some(Usage::new(100, 10, 300)),
            Some(price),
            || unreachable!(),
        );
        assert_eq!((r.prompt_tokens, r.cached_tokens), (100, 100));
        let want = (100.0 * 0.1 + 10.0 * 2.0) / 1e6;
        assert!((r.cost_usd - want).abs() < 1e-15, "{}", r.cost_usd);
    }

    /// A deployment of a mock provider at `price`.
    fn deployment(price: Option<ModelPrice>) -> Deployment {
        let provider = Arc::new(
            sluice_providers::mock::Mock::new(&sluice_providers::mock::MockConfig::default())
                .unwrap(),
        );
        crate::DeploymentConfig {
            provider: "p".into(),
            model: "m".into(),
            id: None,
            weight: 1.0,
            rpm: None,
            tpm: None,
            tags: Vec::new(),
            adapter: None,
            input_cost_per_mtok: None,
            output_cost_per_mtok: None,
            cached_input_cost_per_mtok: None,
            cache_write_cost_per_mtok: None,
            cache_write_1h_cost_per_mtok: None,
        }
        .build(provider, price)
    }

    /// Embedding usage: an upstream that reports only `total_tokens` is taken at its word (it
    /// was recorded as 0 tokens, $0); one that reports nothing is counted, and the count goes
    /// back to the client.
    #[tokio::test]
    async fn embedding_usage_from_the_total_or_counted() {
        let dep = deployment(Some(ModelPrice {
            input: 1.0,
            ..ModelPrice::default()
        }));
        let req: EmbeddingRequest = serde_json::from_value(serde_json::json!({
            "model": "e", "input": ["one two three", "four"]
        }))
        .unwrap();
        let answer = |usage: serde_json::Value| -> EmbeddingResponse {
            serde_json::from_value(serde_json::json!({
                "object": "list", "model": "e", "usage": usage,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5]},
                         {"object": "embedding", "index": 1, "embedding": [0.5]}]
            }))
            .unwrap()
        };
        for (usage, tokens, counted) in [
            (serde_json::json!({"total_tokens": 7}), Some(7), true),
            (
                serde_json::json!({"prompt_tokens": 5, "total_tokens": 5}),
                Some(5),
                false,
            ),
            (serde_json::Value::Null, None, true),
        ] {
            let (sink, mut rx) = LogSink::channel(4);
            let ctx = crate::RequestContext::new("embeddings", false);
            let mut f = Finisher::new(ctx, sink, Arc::new(Metrics::new()), true);
            let (cost, back) = f.embedded(&req, &dep, &answer(usage.clone())).await;
            let r = rx.recv().await.unwrap();
            if let Some(t) = tokens {
                assert_eq!(r.prompt_tokens, t, "{usage}");
            }
            assert!(r.prompt_tokens > 0, "{usage}");
            assert!(
                (cost - r.prompt_tokens as f64 / 1e6).abs() < 1e-15,
                "{usage}"
            );
            assert_eq!(
                back.map(|u| u.prompt_tokens),
                counted.then_some(r.prompt_tokens),
                "{usage}"
            );
        }
    }

    #[tokio::test]
    async fn the_baseline_prices_the_same_cache_writes() {
        let price = ModelPrice {
            input: 3.0,
            output: 15.0,
            cached_input: Some(0.30),
            cache_write_input: Some(3.75),
            cache_write_1h_input: None,
        };
        let cheap = ModelPrice {
            input: 1.0,
            output: 5.0,
            cached_input: Some(0.10),
            cache_write_input: Some(1.25),
            cache_write_1h_input: None,
        };
        // (the price served at, the group that served, what was saved): the strongest tier's
        // group saves nothing whichever of its deployments served (a cheaper one too); any other
        // group (a lower tier, a fallback) is measured against the strongest tier's price.
        // The last: a stream its client left, charged all the same, is measured too.
        let left = sluice_core::error::Error::new(
            sluice_core::error::ErrorCode::ClientClosed,
            "the client closed the connection",
        );
        for (served, group, saved, error) in [
            (price, None, 0.0, None),
            (cheap, None, 0.264, None),
            (cheap, Some("strong"), 0.0, None),
            (cheap, Some("fallback"), 0.264, None),
            (cheap, None, 0.264, Some(&left)),
        ] {
            let (sink, mut rx) = LogSink::channel(4);
            let ctx = crate::RequestContext::new("chat.completions", true);
            let mut f = Finisher::new(ctx, sink, Arc::new(Metrics::new()), true);
            if let Some(g) = group {
                f.attempt(g, &deployment(Some(served)), Instant::now());
            }
            f.set_route(
                serde_json::json!({"tier": "t"}),
                Baseline {
                    group: "strong".into(),
                    price: Some(price),
                },
            );
            let mut usage = Usage::new(151_000, 200, 50_000);
            usage.set_cache_write_tokens(100_000);
            f.finish_stream(
                Some(usage),
                Some(served),
                || unreachable!(),
                None,
                None,
                error,
            )
            .await;
            let r = rx.recv().await.unwrap();
            assert_eq!(r.status == RecordStatus::Ok, error.is_none());
            let route = r.route.unwrap();
            let got = route["saved_usd"].as_f64().unwrap();
            assert!((got - saved).abs() < 1e-9, "{route}");
        }
    }
}
