//! Sluice's request path.
//!
//! [`Gateway`] takes a parsed request and a [`RequestContext`], resolves the asked model to its
//! deployments ([`Deployment`]: a provider plus an upstream model and price), calls the provider
//! (failing over to the next deployment on errors that happen before any byte reached the
//! client), and turns the outcome into one [`RequestRecord`] that goes to the metrics and, through
//! the [`LogSink`], to the store.
//!
//! Streams are the ordinary case: [`ChatOutcome::Stream`] forwards each upstream chunk as it
//! arrives; its [`Finisher`](finisher::Finisher) completes the record when the stream ends, fails,
//! or is dropped because the client went away (which also drops, and so cancels, the upstream
//! call). Later stages (limits, prompts, RAG, guardrails, cache) plug in around
//! [`Gateway::chat`] in the order `docs/architecture.md` gives.

use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use futures::StreamExt;
use parking_lot::RwLock;
use serde::Deserialize;
use sluice_core::ProviderError;
use sluice_core::error::{Error, ErrorClass, ErrorCode};
use sluice_core::price::{ModelPrice, PriceTable};
use sluice_core::provider::ChatProvider;
use sluice_core::provider::ChunkStream;
use sluice_core::record::{LogSink, RawJson, RequestRecord};
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, EmbeddingRequest, EmbeddingResponse,
};

use router::{DeploymentState, Group};

pub mod breaker;
pub mod budget;
pub mod cache;
pub mod caching;
pub mod complexity;
pub mod finisher;
pub mod late_costs;
pub mod limits;
pub mod metrics;
pub mod router;
pub mod shared;
pub mod state;
pub mod stream;
pub mod tokens;
pub mod window;

pub use finisher::Finisher;
pub use metrics::Metrics;
pub use stream::{ChatStream, StreamItem};

pub use router::{ModelConfig, Router, Strategy};

/// One deployment of a model: a configured provider and the upstream model name, with its share
/// of traffic, optional capacity, tags, LoRA adapter and price overrides (USD per million
/// tokens).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// A key of `[providers]`.
    pub provider: String,
    /// The model name the upstream knows (for Azure: the deployment name; with an adapter, the
    /// base model).
    pub model: String,
    /// A name for the deployment within its model (default `PROVIDER/MODEL`, plus `+ADAPTER`).
    #[serde(default)]
    pub id: Option<String>,
    /// Share of traffic under the `weighted` strategy (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// Requests per minute this deployment may take; at the limit it is skipped.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt estimate + max tokens before the call, the real count after).
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// A LoRA adapter served by a vLLM-style upstream under this name (`NAME` or
    /// `NAME@VERSION`); requests are sent with it as the model.
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default)]
    pub input_cost_per_mtok: Option<f64>,
    #[serde(default)]
    pub output_cost_per_mtok: Option<f64>,
    #[serde(default)]
    pub cached_input_cost_per_mtok: Option<f64>,
    #[serde(default)]
    pub cache_write_cost_per_mtok: Option<f64>,
    /// Prompt tokens written to a one-hour cache (Anthropic's `ttl: "1h"`; default twice the
    /// input price).
    #[serde(default)]
    pub cache_write_1h_cost_per_mtok: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl DeploymentConfig {
    /// The price of this deployment: the shipped table's entry for its upstream model, with this
    /// deployment's overrides applied.
    pub fn price(&self, table: &PriceTable) -> Result<Option<ModelPrice>, String> {
        for (name, v) in [
            ("input_cost_per_mtok", self.input_cost_per_mtok),
            ("output_cost_per_mtok", self.output_cost_per_mtok),
            (
                "cached_input_cost_per_mtok",
                self.cached_input_cost_per_mtok,
            ),
            ("cache_write_cost_per_mtok", self.cache_write_cost_per_mtok),
            (
                "cache_write_1h_cost_per_mtok",
                self.cache_write_1h_cost_per_mtok,
            ),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{name}: must be a non-negative number, got {v}"));
            }
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(format!(
                "weight: must be a non-negative number, got {}",
                self.weight
            ));
        }
        if self.rpm == Some(0) || self.tpm == Some(0) {
            return Err(
                "rpm/tpm: a capacity must be at least 1 (leave it out for no limit)".into(),
            );
        }
        if let Some(a) = &self.adapter {
            check_adapter(a).map_err(|e| format!("adapter: {e}"))?;
        }
        let base = table.lookup(&self.model);
        let overridden = self.input_cost_per_mtok.is_some()
            || self.output_cost_per_mtok.is_some()
            || self.cached_input_cost_per_mtok.is_some()
            || self.cache_write_cost_per_mtok.is_some()
            || self.cache_write_1h_cost_per_mtok.is_some();
        if !overridden {
            return Ok(base);
        }
        let b = base.unwrap_or_default();
        // A new input price carries the table's cache prices along in proportion (a cache read
        // at 50 % or 10 % of input stays so), unless they are given too: kept as they were, a
        // lower input price made cache reads dearer than plain input.
        let along = |table: Option<f64>| match self.input_cost_per_mtok {
            Some(input) if b.input > 0.0 => table.map(|p| p * input / b.input),
            _ => table,
        };
        Ok(Some(ModelPrice {
            input: self.input_cost_per_mtok.unwrap_or(b.input),
            output: self.output_cost_per_mtok.unwrap_or(b.output),
            cached_input: self.cached_input_cost_per_mtok.or(along(b.cached_input)),
            cache_write_input: self
                .cache_write_cost_per_mtok
                .or(along(b.cache_write_input)),
            cache_write_1h_input: (self.cache_write_1h_cost_per_mtok)
                .or(along(b.cache_write_1h_input)),
        }))
    }

    /// The deployment's id: the configured one, else `PROVIDER/MODEL` (plus `+ADAPTER`).
    pub fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| match &self.adapter {
            Some(a) => format!("{}/{}+{a}", self.provider, self.model),
            None => format!("{}/{}", self.provider, self.model),
        })
    }

    /// Builds the running deployment.
    pub fn build(&self, provider: Arc<dyn ChatProvider>, price: Option<ModelPrice>) -> Deployment {
        Deployment {
            id: self.id(),
            provider_name: self.provider.clone(),
            provider,
            model: self.model.clone(),
            price,
            weight: self.weight,
            rpm: self.rpm,
            tpm: self.tpm,
            tags: self.tags.clone(),
            adapter: self.adapter.clone(),
            fingerprint: format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{:?}\u{1f}{}\u{1f}{}",
                self.provider,
                self.model,
                self.id(),
                self.adapter,
                self.rpm.is_some(),
                self.tpm.is_some()
            ),
            config: format!("{self:?}"),
        }
    }
}

/// An adapter name: `NAME` or `NAME@VERSION`, both non-empty, no whitespace.
fn check_adapter(a: &str) -> Result<(), String> {
    let (name, version) = match a.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (a, None),
    };
    if name.is_empty() || version.is_some_and(str::is_empty) || a.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{a}` is not an adapter name; write NAME or NAME@VERSION, e.g. \"support-bot@v3\""
        ));
    }
    Ok(())
}

/// A running deployment.
pub struct Deployment {
    /// Unique within its model group.
    pub id: String,
    /// The configured provider name.
    pub provider_name: String,
    pub provider: Arc<dyn ChatProvider>,
    /// The upstream (base) model name.
    pub model: String,
    /// `None` when neither the table nor the config knows a price: cost is then 0.
    pub price: Option<ModelPrice>,
    pub weight: f64,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub tags: Vec<String>,
    pub adapter: Option<String>,
    /// What makes it the same deployment across a reload (provider, model, id, adapter, and
    /// which capacities it has), so that it keeps its live state when only its weight, tags,
    /// prices or capacity figures change.
    pub fingerprint: String,
    /// The whole configuration it was built from.
    pub config: String,
}

impl Deployment {
    /// The model name sent upstream: the adapter when there is one.
    pub fn upstream_model(&self) -> &str {
        self.adapter.as_deref().unwrap_or(&self.model)
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("id", &self.id)
            .field("provider", &self.provider_name)
            .field("kind", &self.provider.kind())
            .field("model", &self.model)
            .field("price", &self.price)
            .finish()
    }
}

/// Whether request and response bodies are kept on records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyMode {
    /// Store both bodies as JSON.
    #[default]
    Full,
    /// Store no bodies.
    None,
}

/// What a request carries besides its body: its id, when it started, and the attribution the
/// server read from headers (user, session, tags, metadata).
#[derive(Debug)]
pub struct RequestContext {
    pub started: Instant,
    pub record: RequestRecord,
    /// The virtual key the request was made with.
    pub key: Option<Arc<sluice_core::keys::VirtualKey>>,
    /// The request's `Cache-Control` header.
    pub cache_control: Option<String>,
}

impl RequestContext {
    pub fn new(endpoint: &str, stream: bool) -> Self {
        RequestContext {
            started: Instant::now(),
            record: RequestRecord::start(sluice_types::ids::new_request_id(), endpoint, stream),
            key: None,
            cache_control: None,
        }
    }

    /// Notes the virtual key: its id on the record, its owner as the user unless a header or
    /// the body names one, and its team and project in the metadata.
    pub fn attribute_key(&mut self, key: Arc<sluice_core::keys::VirtualKey>) {
        self.record.key_id = Some(key.id.clone());
        for (k, v) in [("team", &key.owner.team), ("project", &key.owner.project)] {
            if let Some(v) = v {
                if !self.record.metadata.is_object() {
                    self.record.metadata = serde_json::Value::Object(Default::default());
                }
                if let serde_json::Value::Object(m) = &mut self.record.metadata {
                    m.entry(k.to_string())
                        .or_insert_with(|| serde_json::Value::String(v.clone()));
                }
            }
        }
        self.key = Some(key);
    }

    pub fn id(&self) -> uuid::Uuid {
        self.record.id
    }
}

/// The result of a chat request that did not fail before its response started.
pub enum ChatOutcome {
    /// A whole completion; its record is already written. `cost_usd` is for the response header,
    /// `route` for `x-sluice-route`.
    Complete {
        completion: Box<ChatCompletion>,
        /// The completion serialized, as stored on the record (the OpenAI route answers it as is).
        raw: Option<RawJson>,
        cost_usd: f64,
        route: String,
        /// `x-ratelimit-*` for a rate-limited key.
        headers: Vec<(&'static str, String)>,
    },
    /// A stream of chunks; its record is written when the stream ends or is dropped.
    Stream(ChatStream),
}

/// A successful attempt: the value, and what stays held until the request's record closes.
struct Served<T> {
    value: T,
    group: Arc<Group>,
    dep: Arc<DeploymentState>,
    /// When the serving attempt started (a stream's total timeout counts from it).
    started: Instant,
    /// For a stream, whose outcome is reported when it ends: how long it took to open, and
    /// whether the attempt was its breaker's half-open probe.
    opened_in: Duration,
    probe: Option<breaker::Probe>,
}

/// The gateway: the router (swapped whole on reload), where records go, and metrics.
pub struct Gateway {
    router: RwLock<Arc<Router>>,
    limits: limits::KeyLimits,
    budgets: budget::Budgets,
    shared: Option<Arc<state::Shared>>,
    cache: Option<Arc<cache::Cache>>,
    sink: LogSink,
    metrics: Arc<Metrics>,
    bodies: BodyMode,
    /// Set by [`Gateway::end_calls`] at shutdown.
    aborting: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("router", &*self.router.read())
            .field("bodies", &self.bodies)
            .finish()
    }
}

impl Gateway {
    pub fn new(router: Router, sink: LogSink, metrics: Arc<Metrics>, bodies: BodyMode) -> Self {
        router.start_health_checks();
        Gateway {
            router: RwLock::new(Arc::new(router)),
            limits: limits::KeyLimits::default(),
            budgets: budget::Budgets::new(None, None),
            shared: None,
            cache: None,
            sink,
            metrics,
            bodies,
            aborting: Arc::default(),
        }
    }

    /// Shares rate limits and budget ledgers with other replicas through Redis, and reads the
    /// budgets' starting spend from `usage` (the request log).
    pub fn with_state(
        mut self,
        usage: Option<Arc<dyn sluice_core::usage::UsageStore>>,
        shared: Option<Arc<state::Shared>>,
    ) -> Self {
        self.budgets = budget::Budgets::new(usage, shared.clone());
        self.shared = shared;
        self
    }

    /// Serves repeated requests from `cache` when `[cache] enabled` is set.
    pub fn with_cache(mut self, cache: Arc<cache::Cache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The exact cache, when there is one.
    pub fn cache(&self) -> Option<&Arc<cache::Cache>> {
        self.cache.as_ref()
    }

    /// The current router. Requests keep the one they started with until they finish.
    pub fn router(&self) -> Arc<Router> {
        self.router.read().clone()
    }

    /// The prompt tokens of a request as Sluice's tokenizer counts them for the model's first
    /// deployment (no upstream is asked): a `/v1/messages` stream's `message_start`, before
    /// the upstream reports its count.
    pub fn estimate_prompt_tokens(&self, req: &ChatRequest) -> u64 {
        let router = self.router();
        let model = router
            .group(&req.model)
            .and_then(|g| g.deployments.first())
            .map_or(req.model.as_str(), |d| d.dep.upstream_model());
        tokens::estimate_prompt(model, req)
    }

    /// The prompt tokens of a request (`/v1/messages/count_tokens`), for a key allowed the model.
    pub async fn count_prompt_tokens(
        &self,
        key: Option<&sluice_core::keys::VirtualKey>,
        req: &ChatRequest,
    ) -> Result<u64, Error> {
        allowed(key, &req.model)?;
        let router = self.router();
        let group = Self::resolve(&router, &req.model)?;
        let Some(first) = group.deployments.first() else {
            return Ok(tokens::estimate_prompt(&req.model, req));
        };
        // The upstream's own count where it has one (Anthropic's counts what a local tokenizer
        // cannot: tools, images, its own framing); else the tokenizer of its model.
        let up = addressed(req, first);
        let limit = group
            .timeouts
            .total()
            .or(group.timeouts.first_token())
            .unwrap_or(COUNT_WAIT)
            .min(COUNT_WAIT);
        match with_timeout(Some(limit), first.dep.provider.count_tokens(&up)).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Ok(tokens::estimate_prompt(first.dep.upstream_model(), req)),
            // A request the upstream refuses as it stands is the client's to hear about (a count
            // would say a prompt fits that it would refuse).
            Err(e) if matches!(e.status(), Some(400 | 413 | 422)) => {
                Err(e.to_error(&first.dep.provider_name))
            }
            Err(e) => {
                tracing::warn!(deployment = %first.dep.id, error = %e, "the upstream could not count the prompt; counting it here");
                Ok(tokens::estimate_prompt(first.dep.upstream_model(), req))
            }
        }
    }

    /// Replaces the router atomically; in-flight requests finish on the old one.
    pub fn swap_router(&self, router: Router) {
        router.start_health_checks();
        *self.router.write() = Arc::new(router);
    }

    /// The configured model names, sorted.
    pub fn model_names(&self) -> Vec<String> {
        self.router().names().map(str::to_string).collect()
    }

    /// Whether a model is configured.
    pub fn has_model(&self, model: &str) -> bool {
        self.router().group(model).is_some()
    }

    /// Puts the request body on the record when bodies are kept: the bytes the server read if it
    /// set them, else the parsed request serialized.
    fn keep_request_body(&self, ctx: &mut RequestContext, req: &impl serde::Serialize) {
        match self.bodies {
            BodyMode::Full if ctx.record.request_body.is_none() => {
                ctx.record.request_body = RawJson::of(req);
            }
            BodyMode::Full => {}
            BodyMode::None => ctx.record.request_body = None,
        }
    }

    /// Whether records keep request and response bodies.
    pub fn stores_bodies(&self) -> bool {
        self.bodies == BodyMode::Full
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Refreshes the gauges read at a scrape: deployments (breaker state, in-flight) and the log
    /// queue.
    pub fn refresh_gauges(&self) {
        self.metrics
            .log_queue(self.sink.queued(), self.sink.queued_bytes());
        self.metrics.deployment_states(|| {
            let router = self.router();
            let now = Instant::now();
            router
                .groups()
                .flat_map(|g| {
                    g.deployments.iter().map(move |d| {
                        (
                            g.name.clone(),
                            d.dep.id.clone(),
                            d.breaker_state(now).gauge(),
                            d.in_flight(),
                        )
                    })
                })
                .collect()
        });
    }

    fn finisher(&self, router: &Router, ctx: RequestContext) -> Finisher {
        let known = router.group(&ctx.record.model).is_some();
        Finisher::new(ctx, self.sink.clone(), self.metrics.clone(), known)
            .with_abort_flag(self.aborting.clone())
    }

    /// The state shared with other replicas (Redis), when configured.
    pub fn shared(&self) -> Option<&Arc<state::Shared>> {
        self.shared.as_ref()
    }

    /// Notes that the server is ending the calls still running (the shutdown grace period is
    /// over): their records say so (503 `service_unavailable`, cancelled), not that their
    /// clients left.
    pub fn end_calls(&self) {
        self.aborting
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn resolve(router: &Router, model: &str) -> Result<Arc<Group>, Error> {
        match router.group(model) {
            Some(g) => Ok(g.clone()),
            None => {
                let names: Vec<&str> = router.names().collect();
                Err(Error::new(
                    ErrorCode::ModelNotFound,
                    format!(
                        "model `{model}` is not configured; configured models: {}",
                        if names.is_empty() {
                            "(none)".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                )
                .with_param("model"))
            }
        }
    }

    /// Records a request that failed before it reached the gateway proper (a body that did not
    /// parse, a missing key): it still becomes a record.
    pub async fn reject(&self, mut ctx: RequestContext, model: Option<&str>, err: &Error) {
        if let Some(m) = model {
            ctx.record.model = m.to_string();
        }
        pin_key_owner(&mut ctx.record, ctx.key.as_deref());
        let router = self.router();
        self.finisher(&router, ctx).fail(err).await;
    }

    /// Counts in the metrics a request refused before it reached the gateway proper, without
    /// writing its record (one of a flood of them).
    pub fn reject_unlogged(&self, mut ctx: RequestContext, err: &Error) {
        pin_key_owner(&mut ctx.record, ctx.key.as_deref());
        let router = self.router();
        self.finisher(&router, ctx).fail_unlogged(err);
    }

    /// Serves a chat completion (plain or streamed).
    pub async fn chat(
        &self,
        mut ctx: RequestContext,
        mut req: ChatRequest,
    ) -> Result<ChatOutcome, Error> {
        let router = self.router();
        ctx.record.model.clone_from(&req.model);
        ctx.record.stream = req.is_stream();
        attribute(&mut ctx.record, &req);
        // What the request names is bounded; a key's own user is the key's business.
        let attribution = attribution_error(&mut ctx.record);
        pin_key_owner(&mut ctx.record, ctx.key.as_deref());
        self.keep_request_body(&mut ctx, &req);
        let key = ctx.key.clone();
        let cache_header = ctx.cache_control.take();
        let mut fin = self.finisher(&router, ctx);
        if let Err(e) = attribution
            .map_or(Ok(()), Err)
            .and_then(|()| validate(&req))
            .and_then(|()| allowed(key.as_deref(), &req.model))
        {
            fin.fail(&e).await;
            return Err(e);
        }
        let limit_headers = match self
            .admit(&router, key.as_deref(), &req.model, &mut fin, || {
                limit_estimate(&req)
            })
            .await
        {
            Ok(h) => h,
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        let mut limit_headers = limit_headers;
        // Before the cache: a model the configuration no longer has answers 404, not what it
        // answered before.
        let mut group = match Self::resolve(&router, &req.model) {
            Ok(g) => g,
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        let looked = caching::lookup(
            self.cache.as_ref(),
            &router.cache,
            &mut req,
            cache_header.as_deref(),
            key.as_deref().map(|k| k.id.as_str()),
            key.as_deref().and_then(|k| k.owner.team.as_deref()),
            self.bodies == BodyMode::Full,
        )
        .await;
        match looked {
            Ok(caching::Lookup::Off) => {}
            Ok(caching::Lookup::Hit(entry, completion)) => {
                return Ok(self
                    .serve_hit(fin, &req, &entry, completion, limit_headers)
                    .await);
            }
            Ok(caching::Lookup::Miss(fill)) => {
                limit_headers.push(("x-sluice-cache", "miss".into()));
                fin.set_cache("miss", 0.0);
                if let Some(f) = fill {
                    fin.fill_cache(f);
                }
            }
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        }
        let mut route = String::new();
        if let Some(classifier) = &group.classifier {
            let decision = classifier.classify(&req);
            let tiers = classifier.tiers();
            // The strongest tier is the baseline the savings are measured against.
            let baseline = tiers
                .last()
                .map(|t| finisher::Baseline {
                    group: t.model.clone(),
                    price: router.group(&t.model).and_then(|g| tier_price(g)),
                })
                .unwrap_or_default();
            fin.set_route(
                serde_json::json!({
                    "strategy": "complexity",
                    "tier": decision.tier,
                    "model": decision.model,
                    "score": decision.score,
                    "heuristic_score": decision.heuristic_score,
                    "knn_score": decision.knn_score,
                    "knn_weight": decision.knn_weight,
                    "features": decision.features,
                    "baseline_model": tiers.last().map(|t| t.model.clone()),
                }),
                baseline,
            );
            route = decision.header_value();
            group = match router.group(&decision.model) {
                Some(g) => g.clone(),
                None => {
                    let e = Error::internal(format!(
                        "complexity tier model `{}` is not configured",
                        decision.model
                    ));
                    fin.fail(&e).await;
                    return Err(e);
                }
            };
        }
        if let Err(e) = self
            .reserve_budget(&router, key.as_deref(), &mut fin, || {
                worst_chat_cost(
                    &req,
                    &router,
                    &group,
                    key.as_deref(),
                    router.budgets.default_max_tokens,
                )
            })
            .await
        {
            fin.give_back_limits().await;
            fin.fail(&e).await;
            return Err(e);
        }
        let stream = req.is_stream();
        // Estimated for every request: a fallback group may have tokens-per-minute limits
        // even when the first has none.
        let tokens = estimate_tokens(&req);
        let key = Caller {
            key: key.as_deref(),
            asked: &req.model,
        };
        if stream {
            let served = self
                .attempts(&router, group, &mut fin, key, tokens, &StreamCall(&req))
                .await;
            match served {
                Ok(s) => {
                    let (pending, upstream) = s.value;
                    let wants_usage = req.wants_stream_usage();
                    // The stream keeps the request (for the tokenizer fallback), addressed to
                    // the deployment that serves it.
                    let mut up = req;
                    up.model = s.dep.dep.upstream_model().to_string();
                    let header = route_header(&route, &s.group.name, &s.dep.dep.id, fin.attempts());
                    let assemble = self.bodies == BodyMode::Full || fin.fills_cache();
                    Ok(ChatOutcome::Stream(
                        ChatStream::new(
                            stream::Upstream {
                                pending,
                                rest: upstream,
                                idle: s.group.timeouts.stream_idle(),
                                // The whole attempt, opening included, is within `total`.
                                deadline: s.group.timeouts.total().map(|t| s.started + t),
                            },
                            fin,
                            up,
                            stream::Serving {
                                dep: s.dep.clone(),
                                opened_in: s.opened_in,
                                probe: s.probe,
                            },
                            wants_usage,
                            assemble,
                            header,
                        )
                        .with_headers(limit_headers),
                    ))
                }
                Err(e) => {
                    fin.fail(&e).await;
                    Err(e)
                }
            }
        } else {
            let served = self
                .attempts(&router, group, &mut fin, key, tokens, &ChatCall(&req))
                .await;
            match served {
                Ok(s) => {
                    let header = route_header(&route, &s.group.name, &s.dep.dep.id, fin.attempts());
                    let mut completion = Box::new(s.value);
                    // Serialized once: for the record and, as is, for the response.
                    let mut raw = RawJson::of(&*completion);
                    let stored = if self.bodies == BodyMode::Full || fin.fills_cache() {
                        raw.clone()
                    } else {
                        None
                    };
                    let (cost, counted) = fin.complete(&req, &s.dep.dep, &completion, stored).await;
                    if let Some(usage) = counted {
                        // The upstream reported no usage: the client gets Sluice's count, as
                        // the record has it.
                        completion.usage = Some(usage);
                        raw = RawJson::of(&*completion);
                    }
                    Ok(ChatOutcome::Complete {
                        completion,
                        raw,
                        cost_usd: cost,
                        route: header,
                        headers: limit_headers,
                    })
                }
                Err(e) => {
                    fin.fail(&e).await;
                    Err(e)
                }
            }
        }
    }

    /// Answers a request from the cache: no provider call, no cost; the record notes the hit
    /// and what the answer cost when it was made.
    async fn serve_hit(
        &self,
        mut fin: Finisher,
        req: &ChatRequest,
        entry: &sluice_core::usage::CacheEntry,
        completion: Box<ChatCompletion>,
        mut headers: Vec<(&'static str, String)>,
    ) -> ChatOutcome {
        headers.push(("x-sluice-cache", "hit".into()));
        fin.set_cache("hit", entry.cost_usd);
        let finish_reason = completion
            .choices
            .first()
            .and_then(|c| c.finish_reason.clone());
        // An answer of its own: a fresh id and time (clients keep or deduplicate answers by id).
        let mut completion = completion;
        completion.id = format!("chatcmpl-{}", fin.id().simple());
        completion.created = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
        let raw = RawJson::of(&*completion);
        let kept = if self.bodies == BodyMode::Full {
            raw.clone()
        } else {
            None
        };
        let route = "cache=hit".to_string();
        if req.is_stream() {
            fin.first_token();
            fin.cached(finish_reason, kept).await;
            let chunks = cache::replay(&completion, req.wants_stream_usage());
            ChatOutcome::Stream(ChatStream::replayed(chunks, route).with_headers(headers))
        } else {
            fin.cached(finish_reason, kept).await;
            ChatOutcome::Complete {
                completion,
                raw,
                cost_usd: 0.0,
                route,
                headers,
            }
        }
    }

    /// Serves embeddings.
    pub async fn embed(
        &self,
        mut ctx: RequestContext,
        req: EmbeddingRequest,
    ) -> Result<(EmbeddingResponse, f64, Vec<(&'static str, String)>), Error> {
        let router = self.router();
        ctx.record.model.clone_from(&req.model);
        ctx.record.user = ctx.record.user.take().or_else(|| req.user.clone());
        let attribution = attribution_error(&mut ctx.record);
        pin_key_owner(&mut ctx.record, ctx.key.as_deref());
        self.keep_request_body(&mut ctx, &req);
        let key = ctx.key.clone();
        let mut fin = self.finisher(&router, ctx);
        if let Some(e) = attribution.or_else(|| embed_request_error(&req)) {
            fin.fail(&e).await;
            return Err(e);
        }
        if let Err(e) = allowed(key.as_deref(), &req.model) {
            fin.fail(&e).await;
            return Err(e);
        }
        let headers = match self
            .admit(&router, key.as_deref(), &req.model, &mut fin, || {
                embed_estimate(&req)
            })
            .await
        {
            Ok(h) => h,
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        let group = match Self::resolve(&router, &req.model) {
            Ok(g) if g.classifier.is_none() => g,
            Ok(_) => {
                let e = Error::invalid(format!(
                    "model `{}` routes chat requests by complexity; ask one of its tiers' models for embeddings",
                    req.model
                ))
                .with_param("model");
                fin.fail(&e).await;
                return Err(e);
            }
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        if let Err(e) = self
            .reserve_budget(&router, key.as_deref(), &mut fin, || {
                // Every byte of text a token at most, and every token id given one.
                let bytes: usize = req.input.texts().iter().map(|t| t.len()).sum();
                let (input, _, _) = dearest(
                    &router,
                    &group,
                    Caller {
                        key: key.as_deref(),
                        asked: &req.model,
                    },
                );
                (bytes as u64 + req.input.token_ids()) as f64 * input / 1e6
            })
            .await
        {
            fin.give_back_limits().await;
            fin.fail(&e).await;
            return Err(e);
        }
        let served = self
            .attempts(
                &router,
                group,
                &mut fin,
                Caller {
                    key: key.as_deref(),
                    asked: &req.model,
                },
                embed_estimate(&req),
                &EmbedCall(&req),
            )
            .await;
        match served {
            Ok(s) => {
                let mut resp = s.value;
                let (cost, counted) = fin.embedded(&req, &s.dep.dep, &resp).await;
                if let Some(usage) = counted {
                    // The upstream reported none: the client gets Sluice's count, as the record
                    // has it.
                    resp.usage = usage;
                }
                Ok((resp, cost, headers))
            }
            Err(e) => {
                fin.fail(&e).await;
                Err(e)
            }
        }
    }

    /// Applies the rate limits that cover the request — its virtual key's, its user's, its
    /// model's and the global ones; the admissions are held by the finisher until the record
    /// closes. Returns the `x-ratelimit-*` headers of the most specific limit.
    async fn admit(
        &self,
        router: &Router,
        key: Option<&sluice_core::keys::VirtualKey>,
        model: &str,
        fin: &mut Finisher,
        tokens: impl FnOnce() -> u64,
    ) -> Result<Vec<(&'static str, String)>, Error> {
        use limits::{KeyLimits, Subject};
        let cfg = &router.limits;
        let mut subjects = Vec::new();
        if let Some(k) = key
            && (k.rpm.is_some() || k.tpm.is_some() || k.max_parallel.is_some())
        {
            subjects.push(KeyLimits::key_subject(k));
        }
        if !cfg.per_user.is_empty()
            && let Some(u) = fin.user()
        {
            subjects.push(Subject {
                id: format!("user:{u}"),
                label: format!("user `{u}`"),
                spec: cfg.per_user,
            });
        }
        if let Some(spec) = cfg.models.get(model) {
            subjects.push(Subject {
                id: format!("model:{model}"),
                label: format!("model `{model}`"),
                spec: *spec,
            });
        }
        if !cfg.global.is_empty() {
            subjects.push(Subject {
                id: "global".into(),
                label: "this gateway".into(),
                spec: cfg.global,
            });
        }
        // Subjects are only built for limits that exist: nothing is allocated when none apply.
        subjects.retain(|s| !s.spec.is_empty());
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        let estimate = if subjects.iter().any(|s| s.spec.tpm.is_some()) {
            tokens()
        } else {
            0
        };
        // A request larger than a whole minute's tokens would never fit: refused outright, not
        // let through whenever a window happens to be empty.
        if let Some(s) = subjects
            .iter()
            .find(|s| s.spec.tpm.is_some_and(|t| estimate > t))
        {
            return Err(limits::too_large(s, estimate));
        }
        if let Some(shared) = &self.shared
            && shared.bypass("rate limits").transpose()?.is_none()
        {
            match limits::admit_shared(shared, &subjects, estimate).await {
                Ok(Ok((admitted, headers))) => {
                    fin.hold_shared_limits(admitted);
                    return Ok(headers);
                }
                Ok(Err(refused)) => return Err(refused),
                // Fail open: the in-process limits below; fail closed: 503.
                Err(e) => shared.on_failure("rate limits", &e)?,
            }
        }
        let admitted = self.limits.admit_all(&subjects, estimate)?;
        let headers = admitted
            .iter()
            .find(|a| !a.headers.is_empty())
            .map(|a| a.headers.clone())
            .unwrap_or_default();
        fin.hold_limits(admitted);
        Ok(headers)
    }

    /// Reserves the request's worst-case cost on every budget that covers it (its key's, its
    /// user's, its team's); the reservation is settled with the real cost when the record closes.
    async fn reserve_budget(
        &self,
        router: &Router,
        key: Option<&sluice_core::keys::VirtualKey>,
        fin: &mut Finisher,
        worst: impl FnOnce() -> f64,
    ) -> Result<(), Error> {
        let team = key.and_then(|k| k.owner.team.as_deref());
        let limits = budget::limits_for(&router.budgets, key, fin.user(), team);
        if limits.is_empty() {
            return Ok(());
        }
        let r = self.budgets.reserve(&limits, worst()).await?;
        fin.hold_budget(r);
        Ok(())
    }

    /// Runs the attempts of a request: the group's deployments by its strategy, with retries
    /// and backoff, then the fallback groups for the class of the error that ended them. Every
    /// attempt goes on the record.
    ///
    /// A fallback model the request's virtual key may not use is skipped: a key limited to some
    /// models is never served by another.
    async fn attempts<T>(
        &self,
        router: &Router,
        first: Arc<Group>,
        fin: &mut Finisher,
        key: Caller<'_>,
        tokens: u64,
        call: &dyn Call<T>,
    ) -> Result<Served<T>, Error> {
        let mut visited = vec![first.name.clone()];
        let mut queue = std::collections::VecDeque::from([first]);
        let mut last = None;
        // A fallback group this request may still go to: not tried, allowed to its key, not a
        // complexity model, within the groups a request may visit.
        let usable = |visited: &[String], name: &String| {
            (visited.len() < MAX_GROUPS_PER_REQUEST && !visited.contains(name))
                .then(|| router.group(name))
                .flatten()
                .filter(|g| g.classifier.is_none() && key.may_use(router, name))
        };
        while let Some(group) = queue.pop_front() {
            // Whether a failure of `class` here would have somewhere else to go now: a group
            // queued or a fallback for the class that some deployment could take the request
            // at (one whose deployments are all blocked is no reason to stop waiting here).
            let elsewhere = |class: ErrorClass| {
                let now = Instant::now();
                queue.iter().any(|g| g.open_now(now, tokens))
                    || (group.fallbacks.for_class(class).iter())
                        .filter_map(|name| usable(&visited, name))
                        .any(|g| g.open_now(now, tokens))
            };
            match self.try_group(&group, fin, tokens, call, &elsewhere).await {
                Ok(s) => return Ok(s),
                Err((err, class, sent)) => {
                    if class == ErrorClass::ClientError {
                        return Err(err);
                    }
                    for name in group.fallbacks.for_class(class) {
                        if let Some(g) = usable(&visited, name) {
                            let g = g.clone();
                            visited.push(name.clone());
                            queue.push_back(g);
                        }
                    }
                    if !queue.is_empty() {
                        tracing::info!(
                            request_id = %fin.id(),
                            group = %group.name,
                            class = class.as_str(),
                            next = %queue.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(","),
                            "falling back"
                        );
                    }
                    // A fallback group that sent nothing upstream (every deployment blocked, or
                    // refusing the request before sending it) does not hide what the upstreams
                    // answered: the client hears the last real failure, with its own status and
                    // `Retry-After`.
                    if sent || last.is_none() {
                        last = Some(err);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::internal("no deployment was tried")))
    }

    /// The attempts within one group. `elsewhere` says whether a failure of a class has another
    /// group to go to (then a blocked group is left at once rather than waited for).
    async fn try_group<T>(
        &self,
        group: &Arc<Group>,
        fin: &mut Finisher,
        tokens: u64,
        call: &dyn Call<T>,
        elsewhere: &(dyn Fn(ErrorClass) -> bool + Sync),
    ) -> Result<Served<T>, (Error, ErrorClass, bool)> {
        let n = group.deployments.len();
        let mut tried = vec![false; n];
        // Deployments that refused the request before sending it (a feature they lack, such as
        // tools on a local model): never picked again for it, and their refusals cost no retry.
        let mut refused = vec![false; n];
        let mut refusal: Option<(Error, ErrorClass)> = None;
        let max_attempts = 1 + group.retry.retries;
        let mut made = 0;
        let mut repeats = 0;
        let mut waited = Duration::ZERO;
        // The attempt count at which the last backoff was taken.
        let mut backed_off_before = 0;
        let mut last: Option<(Error, ErrorClass)> = None;
        while made < max_attempts {
            if refused.iter().all(|&r| r) {
                // No deployment of the group can serve it: the client hears why.
                break;
            }
            // A retry of a deployment already tried backs off first (below, once the pick shows
            // there is one to retry: when every deployment is blocked beyond the wait allowed,
            // the fallbacks come at once, not after a backoff).
            let (dep, probe, in_flight, rpm, reservation) =
                match group.pick_among(Instant::now(), &tried, &refused, tokens) {
                    router::Pick::Go {
                        dep,
                        probe,
                        in_flight,
                        rpm,
                        tokens,
                    } => (dep, probe, in_flight, rpm, tokens),
                    router::Pick::Wait {
                        after,
                        rate_limited,
                        breakers_open,
                    } => {
                        let budget = group.max_wait().saturating_sub(waited);
                        // With a fallback for what the request would fail with, it goes there
                        // now rather than waiting for a cool-down or a capacity window.
                        let class = match &last {
                            Some((_, class)) => *class,
                            None => blocked_class(rate_limited),
                        };
                        let fallback = elsewhere(class);
                        match after {
                            Some(d) if d <= budget && !fallback => {
                                // Wake just after the blocker clears; the wait is the backoff.
                                let d = d + Duration::from_millis(5);
                                tokio::time::sleep(d).await;
                                waited += d;
                                backed_off_before = made;
                                continue;
                            }
                            _ => {
                                let (err, class) = last.unwrap_or_else(|| {
                                    no_deployment(group, after, rate_limited, breakers_open)
                                });
                                return Err((err, class, made > 0));
                            }
                        }
                    }
                };
            let index = group
                .deployments
                .iter()
                .position(|d| Arc::ptr_eq(d, &dep))
                .unwrap_or(0);
            if tried[index] && backed_off_before != made {
                // A retry: back off now, having given back what the pick took (the wait holds no
                // in-flight slot, capacity or probe), and pick again.
                dep.unpick(probe, rpm, reservation);
                drop(in_flight);
                repeats += 1;
                tokio::time::sleep(group.backoff(repeats)).await;
                backed_off_before = made;
                continue;
            }
            tried[index] = true;
            made += 1;
            let started = Instant::now();
            fin.attempt(&group.name, &dep.dep, started);
            let result = {
                // If the request is dropped during the call (the client left), the upstream has
                // the prompt: the record and the ledgers are charged for it.
                let mut open = OpenAttempt {
                    fin: &mut *fin,
                    call,
                    dep: &dep,
                    probe,
                    started,
                    armed: true,
                };
                let result = call.call(group, &dep).await;
                open.armed = false;
                result
            };
            let elapsed = started.elapsed();
            match result {
                Ok(value) => {
                    let mut probe = probe;
                    if !call.reports_at_end() {
                        dep.report(Instant::now(), elapsed, None, probe);
                    } else if let Some(p) = probe {
                        // A trial stream that opened has shown the deployment answers: its
                        // probe slot is settled now rather than when the stream ends (a long
                        // stream would outlast the slot). Its end is then reported as any other
                        // request's.
                        dep.probe_answered(Instant::now(), p);
                        probe = None;
                    }
                    fin.log_attempt(elapsed, None);
                    fin.hold(in_flight, reservation);
                    return Ok(Served {
                        value,
                        group: group.clone(),
                        dep,
                        started,
                        opened_in: elapsed,
                        probe,
                    });
                }
                Err(e @ ProviderError::Unsupported(_)) => {
                    // Refused before anything was sent: the deployment's health, latency and
                    // capacity are untouched, and another deployment may serve the request.
                    let err = e.to_error(&dep.dep.provider_name);
                    tracing::info!(
                        request_id = %fin.id(),
                        group = %group.name,
                        deployment = %dep.dep.id,
                        error = %e,
                        "deployment cannot serve the request"
                    );
                    dep.unpick(probe, rpm, reservation);
                    drop(in_flight);
                    fin.log_attempt(elapsed, Some((ErrorClass::ClientError, &err)));
                    refused[index] = true;
                    made -= 1;
                    refusal.get_or_insert((err, ErrorClass::ClientError));
                }
                Err(e) => {
                    let class = e.class();
                    dep.report(
                        Instant::now(),
                        elapsed,
                        Some((class, e.retry_after())),
                        probe,
                    );
                    if let Some(r) = reservation {
                        r.settle(0);
                    }
                    drop(in_flight);
                    let err = e.to_error(&dep.dep.provider_name);
                    tracing::warn!(
                        request_id = %fin.id(),
                        group = %group.name,
                        deployment = %dep.dep.id,
                        class = class.as_str(),
                        error = %e,
                        "provider call failed"
                    );
                    fin.log_attempt(elapsed, Some((class, &err)));
                    if !class.is_transient() {
                        return Err((err, class, true));
                    }
                    last = Some((err, class));
                }
            }
        }
        let (err, class) = last
            .or(refusal)
            .unwrap_or_else(|| no_deployment(group, None, false, true));
        Err((err, class, made > 0))
    }
}

/// One provider call of a request, made for each attempt.
trait Call<T>: Sync {
    fn call<'a>(
        &'a self,
        g: &'a Group,
        d: &'a DeploymentState,
    ) -> futures::future::BoxFuture<'a, Result<T, ProviderError>>;

    /// Whether a successful call's outcome is reported to the deployment (breaker, latency) only
    /// when what it opened ends: a stream can still fail after it started.
    fn reports_at_end(&self) -> bool {
        false
    }

    /// The prompt's tokens estimated from its size, for a call cut short by the client.
    fn prompt_estimate(&self) -> u64;
}

/// A provider call under way. Dropped while armed, the request went away mid-call: the prompt
/// was sent, so the record is charged for it (the provider bills it) before it closes as
/// cancelled. A half-open probe cancelled within the deployment's usual time showed nothing
/// about it, and its slot is given back for the next request; one cancelled later keeps its slot
/// until the cooldown (see [`DeploymentState::probe_patience`]).
struct OpenAttempt<'a, T> {
    fin: &'a mut Finisher,
    call: &'a dyn Call<T>,
    dep: &'a DeploymentState,
    probe: Option<breaker::Probe>,
    started: Instant,
    armed: bool,
}

impl<T> Drop for OpenAttempt<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            let tokens = self.call.prompt_estimate();
            self.fin.charge_prompt(tokens, self.dep.dep.price);
            if self.started.elapsed() < self.dep.probe_patience() {
                self.dep.release_probe(self.probe);
            }
        }
    }
}

struct ChatCall<'r>(&'r ChatRequest);

impl Call<ChatCompletion> for ChatCall<'_> {
    fn call<'a>(
        &'a self,
        g: &'a Group,
        d: &'a DeploymentState,
    ) -> futures::future::BoxFuture<'a, Result<ChatCompletion, ProviderError>> {
        Box::pin(async move {
            let up = addressed(self.0, d);
            with_timeout(
                g.timeouts.total().or(g.timeouts.first_token()),
                d.dep.provider.chat(&up),
            )
            .await
        })
    }

    fn prompt_estimate(&self) -> u64 {
        tokens::estimate_prompt_by_size(self.0)
    }
}

type Opened = (Vec<ChatCompletionChunk>, Option<ChunkStream>);

struct StreamCall<'r>(&'r ChatRequest);

impl Call<Opened> for StreamCall<'_> {
    fn call<'a>(
        &'a self,
        g: &'a Group,
        d: &'a DeploymentState,
    ) -> futures::future::BoxFuture<'a, Result<Opened, ProviderError>> {
        Box::pin(async move {
            let up = addressed(self.0, d);
            open_stream(d, &up, &g.timeouts).await
        })
    }

    fn reports_at_end(&self) -> bool {
        true
    }

    fn prompt_estimate(&self) -> u64 {
        tokens::estimate_prompt_by_size(self.0)
    }
}

struct EmbedCall<'r>(&'r EmbeddingRequest);

impl Call<EmbeddingResponse> for EmbedCall<'_> {
    fn call<'a>(
        &'a self,
        g: &'a Group,
        d: &'a DeploymentState,
    ) -> futures::future::BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(async move {
            let mut up = self.0.clone();
            up.model = d.dep.upstream_model().to_string();
            with_timeout(
                g.timeouts.total().or(g.timeouts.first_token()),
                d.dep.provider.embed(&up),
            )
            .await
        })
    }

    fn prompt_estimate(&self) -> u64 {
        embed_estimate(self.0)
    }
}

/// At most this many model groups (the asked one and its fallbacks) serve one request.
const MAX_GROUPS_PER_REQUEST: usize = 8;

/// The error when no deployment of a group can take a request now: a 429 when capacity or a 429
/// blocks any of them (the group takes requests again soon), else a 503.
/// The class of the error [`no_deployment`] answers with.
fn blocked_class(rate_limited: bool) -> ErrorClass {
    if rate_limited {
        ErrorClass::RateLimited
    } else {
        ErrorClass::ServerError
    }
}

fn no_deployment(
    group: &Group,
    after: Option<Duration>,
    rate_limited: bool,
    breakers_open: bool,
) -> (Error, ErrorClass) {
    let wait = after.map(|d| Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64));
    if rate_limited {
        let mut e = Error::new(
            ErrorCode::RateLimited,
            format!(
                "every deployment of model `{}` is at its capacity or waiting out its upstream's Retry-After (after a 429 or a 503){}; retry later",
                group.name,
                if breakers_open {
                    ", or has its circuit breaker open"
                } else {
                    ""
                }
            ),
        );
        e.retry_after = wait.or(Some(Duration::from_secs(1)));
        (e, blocked_class(true))
    } else {
        let mut e = Error::new(
            ErrorCode::NoHealthyDeployment,
            format!(
                "no healthy deployment of model `{}`: every circuit breaker is open or has its trial request under way (see /api/deployments)",
                group.name
            ),
        );
        // A breaker whose trial is under way has no cool-down left to name: the trial answers
        // soon.
        e.retry_after = wait.or(Some(Duration::from_secs(1)));
        (e, blocked_class(false))
    }
}

/// `x-sluice-route`: the complexity decision (when there was one), then where it went.
fn route_header(decision: &str, group: &str, deployment: &str, attempts: u32) -> String {
    // Header values are visible ASCII, and `;` and `=` separate its fields: names are written
    // as the complexity decision writes them (anything else as `_`).
    let served = format!(
        "group={}; deployment={}; attempts={attempts}",
        complexity::header_safe(group),
        complexity::header_safe(deployment)
    );
    if decision.is_empty() {
        served
    } else {
        format!("{decision}; {served}")
    }
}

/// The request as sent to a deployment.
fn addressed(req: &ChatRequest, d: &DeploymentState) -> ChatRequest {
    let mut up = req.clone();
    up.model = d.dep.upstream_model().to_string();
    up
}

/// The longest wait for an upstream's count of a prompt before counting it here.
const COUNT_WAIT: Duration = Duration::from_secs(10);

async fn with_timeout<T>(
    limit: Option<Duration>,
    fut: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    match limit {
        Some(d) => tokio::time::timeout(d, fut).await.unwrap_or_else(|_| {
            Err(ProviderError::Timeout(format!(
                "no answer within {:.3} s (the model's timeouts)",
                d.as_secs_f64()
            )))
        }),
        None => fut.await,
    }
}

/// Opens a stream and reads it up to its first generated content, so that a stream that fails
/// before anything reached the client can still fail over invisibly.
async fn open_stream(
    d: &DeploymentState,
    up: &ChatRequest,
    t: &router::TimeoutConfig,
) -> Result<Opened, ProviderError> {
    let read = async {
        let mut s = d.dep.provider.chat_stream(up).await?;
        let mut pending = Vec::new();
        loop {
            // Gaps between chunks before the first content (after the role chunk, say) are
            // within the model's `stream_idle_secs` too; the wait for the first chunk is the
            // first-token limit's.
            let next = match t.stream_idle().filter(|_| !pending.is_empty()) {
                Some(idle) => tokio::time::timeout(idle, s.next()).await.map_err(|_| {
                    ProviderError::Timeout(
                        "the stream stalled longer than the model's timeouts.stream_idle_secs"
                            .to_string(),
                    )
                })?,
                None => s.next().await,
            };
            match next {
                Some(Ok(c)) => {
                    let started = c.has_content()
                        || c.usage.is_some()
                        || c.choices.iter().any(|ch| ch.finish_reason.is_some());
                    pending.push(c);
                    if started || pending.len() >= 16 {
                        return Ok((pending, Some(s)));
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Ok((pending, None)),
            }
        }
    };
    with_timeout(t.opening(), read).await
}

/// A request's size in tokens for tokens-per-minute capacity: the prompt (about four bytes a
/// token: messages, tool calls, tool definitions, media) plus the most it may generate, for each
/// of its `n` choices.
fn estimate_tokens(req: &ChatRequest) -> u64 {
    let completion = req
        .max_completion_tokens
        .or(req.max_tokens)
        .map_or(DEFAULT_COMPLETION_ESTIMATE, u64::from)
        .saturating_mul(u64::from(req.n.unwrap_or(1).max(1)));
    tokens::estimate_prompt_by_size(req).saturating_add(completion)
}

/// What a model group charges, for the savings of complexity routing: under the `cost` strategy
/// its cheapest deployment (an unpriced one is free), else its priced deployment of the largest
/// weight (the one that serves the most).
fn tier_price(group: &Group) -> Option<ModelPrice> {
    let deps = group.deployments.iter().map(|d| &d.dep);
    if group.strategy == router::Strategy::Cost {
        return deps
            .map(|d| d.price.unwrap_or_default())
            .min_by(|a, b| (a.input + a.output).total_cmp(&(b.input + b.output)));
    }
    deps.filter_map(|d| d.price.map(|p| (d.weight, p)))
        .reduce(|best, next| if next.0 > best.0 { next } else { best })
        .map(|(_, p)| p)
}

/// The dearest input and output prices (USD per million tokens) among the deployments that may
/// serve a request to `group`: its own and those of the groups it falls back to (the ones `key`
/// may use); and whether one of them is an Anthropic deployment (which is sent a `max_tokens` of
/// its own when the request sets none).
fn dearest(router: &Router, group: &Group, key: Caller<'_>) -> (f64, f64, bool) {
    let mut seen: Vec<&str> = vec![group.name.as_str()];
    let mut queue = vec![group];
    let (mut input, mut output, mut anthropic) = (0.0f64, 0.0f64, false);
    while let Some(g) = queue.pop() {
        for d in &g.deployments {
            if let Some(p) = d.dep.price {
                input = input.max(p.input);
                output = output.max(p.output);
            }
            anthropic |= d.dep.provider.kind() == "anthropic";
        }
        for (_, name) in g.fallbacks.all() {
            if seen.len() < MAX_GROUPS_PER_REQUEST
                && !seen.contains(&name.as_str())
                && key.may_use(router, name)
                && let Some(next) = router.group(name)
            {
                seen.push(name.as_str());
                queue.push(next);
            }
        }
    }
    (input, output, anthropic)
}

/// Prompt tokens assumed per message besides its text (role and separators), and per non-text
/// part (an image) for the worst case.
const WORST_TOKENS_PER_MESSAGE: u64 = 8;
const WORST_TOKENS_PER_PART: u64 = 2_000;

/// The most a chat request can cost: every byte of its messages, tools, `response_format` and
/// fields passed on as they are a token (a tokenizer never makes a token of less than one
/// byte), plus a few per message and a generous
/// allowance per image, plus its maximum completion (`max_completion_tokens`, `max_tokens`, else
/// `default_max_tokens`) for each of its `n` choices, at the dearest prices it may be served at.
fn worst_chat_cost(
    req: &ChatRequest,
    router: &Router,
    group: &Group,
    key: Option<&sluice_core::keys::VirtualKey>,
    default_max: u32,
) -> f64 {
    let key = Caller {
        key,
        asked: &req.model,
    };
    let (input, output, anthropic) = dearest(router, group, key);
    if input == 0.0 && output == 0.0 {
        return 0.0;
    }
    let mut prompt: u64 = 0;
    for m in &req.messages {
        prompt += m.text_len() as u64 + WORST_TOKENS_PER_MESSAGE;
        if let Some(sluice_types::openai::Content::Parts(parts)) = &m.content {
            prompt +=
                parts.iter().filter(|p| p.text.is_none()).count() as u64 * WORST_TOKENS_PER_PART;
        }
        if let Some(calls) = &m.tool_calls {
            prompt += serde_json::to_string(calls).map_or(0, |s| s.len() as u64);
        }
    }
    if let Some(tools) = &req.tools {
        prompt += tokens::json_len(tools) as u64;
    }
    // A structured-output schema is prompt, and so may be any field passed on as it is (the
    // legacy `functions` list, say).
    if let Some(format) = &req.response_format {
        prompt += tokens::json_len(format) as u64;
    }
    if !req.extra.is_empty() {
        prompt += tokens::json_len(&req.extra) as u64;
    }
    // Without a cap, a Claude deployment asked to think generates up to its thinking budget on
    // top of the default.
    let mut uncapped =
        sluice_types::anthropic::thinking_cap(req).map_or(default_max, |c| c.max(default_max));
    // An Anthropic deployment is sent its own cap when the request sets none.
    if anthropic {
        uncapped = uncapped.max(sluice_types::anthropic::DEFAULT_MAX_TOKENS);
    }
    let completion = u64::from(
        req.max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(uncapped),
    ) * u64::from(req.n.unwrap_or(1).max(1));
    (prompt as f64 * input + completion as f64 * output) / 1e6
}

/// What is wrong with an embeddings request whatever serves it, if anything.
fn embed_request_error(req: &EmbeddingRequest) -> Option<Error> {
    let n = req.input.len();
    if n == 0 {
        return Some(Error::invalid("`input` must not be empty").with_param("input"));
    }
    if n > MAX_EMBEDDING_INPUTS {
        return Some(
            Error::invalid(format!(
                "`input` holds {n} inputs; at most {MAX_EMBEDDING_INPUTS} per request: split it into several requests"
            ))
            .with_param("input"),
        );
    }
    if let Some(f) = req.encoding_format.as_deref()
        && f != "float"
        && f != "base64"
    {
        return Some(
            Error::invalid(format!(
                "`encoding_format` must be `float` or `base64`, got `{f}`"
            ))
            .with_param("encoding_format"),
        );
    }
    (req.dimensions == Some(0))
        .then(|| Error::invalid("`dimensions` must be at least 1").with_param("dimensions"))
}

/// The most inputs one embeddings request may hold (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// An embedding request's tokens before the call: a quarter of each text's bytes, plus the token
/// ids it gives as such; at least one token an input (a model wraps even an empty one in its
/// special tokens).
fn embed_estimate(req: &EmbeddingRequest) -> u64 {
    let texts: u64 = req
        .input
        .texts()
        .iter()
        .map(|t| (t.len() as u64).div_ceil(4).max(1))
        .sum();
    let ids = match &req.input {
        sluice_types::openai::EmbeddingInput::TokenLists(lists) => {
            lists.iter().map(|l| (l.len() as u64).max(1)).sum()
        }
        other => other.token_ids(),
    };
    texts + ids
}

/// A request's tokens for the tokens-per-minute rate limits: its prompt counted with the
/// model's tokenizer, plus the most it may generate (replaced by the real count after the call).
fn limit_estimate(req: &ChatRequest) -> u64 {
    let completion = req
        .max_completion_tokens
        .or(req.max_tokens)
        .map_or(DEFAULT_COMPLETION_ESTIMATE, u64::from)
        * u64::from(req.n.unwrap_or(1).max(1));
    tokens::estimate_prompt(&req.model, req) + completion
}

/// The most choices a request may ask for (OpenAI's limit).
const MAX_N: u32 = 128;

/// Completion tokens assumed for capacity when a request sets no maximum.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Who a request is served for: its virtual key, and the model it asked for.
#[derive(Clone, Copy)]
struct Caller<'a> {
    key: Option<&'a sluice_core::keys::VirtualKey>,
    asked: &'a str,
}

impl Caller<'_> {
    /// Whether model group `name` may serve the request: with no key, or one whose list names
    /// it, or a tier of the complexity model asked for (a key allowed that model may be served by
    /// any of its tiers).
    fn may_use(&self, router: &Router, name: &str) -> bool {
        self.key.is_none_or(|k| {
            k.allows_model(name)
                || router
                    .group(self.asked)
                    .and_then(|g| g.classifier.as_ref())
                    .is_some_and(|c| c.tiers().iter().any(|t| t.model == name))
        })
    }
}

/// Whether the request's virtual key may use `model`.
fn allowed(key: Option<&sluice_core::keys::VirtualKey>, model: &str) -> Result<(), Error> {
    match key {
        Some(k) if !k.allows_model(model) => Err(Error::new(
            ErrorCode::ModelNotAllowed,
            format!(
                "this API key (`{}`) may not use model `{model}`; it may use: {}",
                k.name,
                k.models.join(", ")
            ),
        )
        .with_param("model")),
        _ => Ok(()),
    }
}

fn validate(req: &ChatRequest) -> Result<(), Error> {
    if req.model.trim().is_empty() {
        return Err(Error::invalid("`model` must not be empty").with_param("model"));
    }
    if req.messages.is_empty() {
        return Err(
            Error::invalid("`messages` must contain at least one message").with_param("messages"),
        );
    }
    if req.n == Some(0) {
        return Err(Error::invalid("`n` must be at least 1").with_param("n"));
    }
    if req.n.is_some_and(|n| n > MAX_N) {
        return Err(Error::invalid(format!("`n` must be at most {MAX_N}")).with_param("n"));
    }
    Ok(())
}

/// Fills user, session, tags and metadata from the body where headers did not set them.
fn attribute(rec: &mut RequestRecord, req: &ChatRequest) {
    if rec.user.is_none() {
        rec.user.clone_from(&req.user);
    }
    let Some(meta) = &req.metadata else { return };
    if rec.session.is_none() {
        rec.session = ["session_id", "session"]
            .iter()
            .find_map(|k| meta.get(*k).and_then(|v| v.as_str()))
            .map(str::to_string);
    }
    if rec.user.is_none() {
        rec.user = ["user_id", "user"]
            .iter()
            .find_map(|k| meta.get(*k).and_then(|v| v.as_str()))
            .map(str::to_string);
    }
    if rec.tags.is_empty() {
        rec.tags = match meta.get("tags") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(s)) => split_tags(s),
            _ => Vec::new(),
        };
    }
    match &mut rec.metadata {
        serde_json::Value::Object(existing) => {
            for (k, v) in meta {
                existing.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        other => *other = serde_json::Value::Object(meta.clone()),
    }
}

/// With a virtual key, the record's `team` and `project` are the key owner's, whatever the
/// request's metadata said: team budgets and usage by team read them, so a client cannot move
/// its spend to another team or off its own.
fn pin_key_owner(rec: &mut RequestRecord, key: Option<&sluice_core::keys::VirtualKey>) {
    let Some(k) = key else { return };
    // A key that belongs to a user speaks for that user: a request cannot name another (it
    // spent that user's budget and rate limit). A key with no user leaves the user the request
    // names (header, then body), an application's end user.
    if k.owner.user.is_some() {
        rec.user.clone_from(&k.owner.user);
    }
    for (name, value) in [("team", &k.owner.team), ("project", &k.owner.project)] {
        match (value, &mut rec.metadata) {
            (Some(v), serde_json::Value::Object(m)) => {
                m.insert(name.into(), serde_json::Value::String(v.clone()));
            }
            (Some(v), other) => {
                let mut m = serde_json::Map::new();
                m.insert(name.into(), serde_json::Value::String(v.clone()));
                *other = serde_json::Value::Object(m);
            }
            (None, serde_json::Value::Object(m)) => {
                m.remove(name);
            }
            (None, _) => {}
        }
    }
}

/// The longest user, session id or tag a request may name, in bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 256;
/// The most tags a request may carry.
pub const MAX_TAGS: usize = 64;

/// Refuses a request whose user, session or tags are too long or too many (each becomes a
/// limiter, a budget ledger, an index entry: a client naming megabyte-long users grew memory by
/// hundreds of megabytes). The record keeps them cut to size.
fn attribution_error(rec: &mut RequestRecord) -> Option<Error> {
    let mut what = None;
    for (name, value) in [("user", &mut rec.user), ("session", &mut rec.session)] {
        if let Some(v) = value
            && v.len() > MAX_ATTRIBUTE_BYTES
        {
            what.get_or_insert(format!(
                "{name}: at most {MAX_ATTRIBUTE_BYTES} bytes, got {}",
                v.len()
            ));
            cut(v);
        }
    }
    if rec.tags.len() > MAX_TAGS {
        what.get_or_insert(format!("tags: at most {MAX_TAGS}, got {}", rec.tags.len()));
        rec.tags.truncate(MAX_TAGS);
    }
    for t in &mut rec.tags {
        if t.len() > MAX_ATTRIBUTE_BYTES {
            what.get_or_insert(format!(
                "tags: each at most {MAX_ATTRIBUTE_BYTES} bytes, got one of {}",
                t.len()
            ));
            cut(t);
        }
    }
    what.map(Error::invalid)
}

/// Cuts `s` to [`MAX_ATTRIBUTE_BYTES`] at a character boundary.
fn cut(s: &mut String) {
    let mut end = MAX_ATTRIBUTE_BYTES.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

/// Tags from a comma-separated list.
pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocked deployments: the client is told when to come back, a breaker's trial under way
    /// included (it named no time, so SDKs retried at once or not at all).
    #[test]
    fn a_blocked_group_always_names_a_retry_after() {
        let g = Group::new(
            "g".into(),
            router::Strategy::Weighted,
            Vec::new(),
            router::RetryConfig::default(),
            router::FallbackConfig::default(),
            router::TimeoutConfig::default(),
            None,
        );
        let (e, _) = no_deployment(&g, None, false, true);
        assert_eq!(e.code, ErrorCode::NoHealthyDeployment);
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        assert!(
            e.message.contains("trial request under way"),
            "{}",
            e.message
        );
        let (e, _) = no_deployment(&g, Some(Duration::from_millis(20_300)), false, true);
        assert_eq!(e.retry_after, Some(Duration::from_secs(21)));
        let (e, _) = no_deployment(&g, Some(Duration::from_secs(20)), true, false);
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.message.contains("Retry-After"), "{}", e.message);
    }

    /// A key that belongs to a user speaks for that user whatever the request names; a key
    /// without one leaves the request's (an application's end user).
    #[test]
    fn a_users_key_cannot_name_another_user() {
        let key = |user: Option<&str>| {
            sluice_core::keys::KeySpec {
                name: "k".into(),
                owner: sluice_core::keys::Owner {
                    user: user.map(str::to_string),
                    ..Default::default()
                },
                ..Default::default()
            }
            .issue(chrono::Utc::now())
            .unwrap()
            .0
        };
        let mut rec = RequestContext::new("chat.completions", false).record;
        rec.user = Some("alice".into());
        pin_key_owner(&mut rec, Some(&key(Some("mallory"))));
        assert_eq!(rec.user.as_deref(), Some("mallory"));
        let mut rec = RequestContext::new("chat.completions", false).record;
        rec.user = Some("end-user-7".into());
        pin_key_owner(&mut rec, Some(&key(None)));
        assert_eq!(rec.user.as_deref(), Some("end-user-7"));
    }

    /// Users, sessions and tags are bounded: over the bound the request is refused and the
    /// record keeps them cut (at a character boundary).
    #[test]
    fn long_users_sessions_and_tags_are_refused() {
        let mut rec = RequestContext::new("chat.completions", false).record;
        rec.user = Some("u".repeat(256));
        rec.tags = vec!["t".into(); 64];
        assert!(attribution_error(&mut rec).is_none());
        rec.user = Some("é".repeat(200));
        let e = attribution_error(&mut rec).expect("refused");
        assert!(e.message.starts_with("user: at most 256 bytes"), "{e}");
        assert_eq!(rec.user.as_deref().map(str::len), Some(256));
        rec.session = Some("s".repeat(1_000));
        rec.tags.push("one too many".into());
        let e = attribution_error(&mut rec).expect("refused");
        assert!(e.message.starts_with("session:"), "{e}");
        assert_eq!(rec.tags.len(), 64);
    }

    /// Names that are not header-safe are written as the complexity part writes them: a model
    /// `café; x=1` made a value no parser could split (and a `?` for each non-ASCII letter).
    #[test]
    fn the_route_header_keeps_its_fields_apart() {
        assert_eq!(
            route_header("", "chat", "openai/gpt-4o+support@v3", 2),
            "group=chat; deployment=openai/gpt-4o+support@v3; attempts=2"
        );
        assert_eq!(
            route_header(
                "tier=small; model=s; score=0.100",
                "café; x=1",
                "dé ploy",
                1
            ),
            "tier=small; model=s; score=0.100; group=caf___x_1; deployment=d__ploy; attempts=1"
        );
    }
}
