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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::price::{ModelPrice, PriceTable};
use sluice_core::provider::ChatProvider;
use sluice_core::record::{LogSink, RequestRecord};
use sluice_types::openai::{ChatCompletion, ChatRequest, EmbeddingRequest, EmbeddingResponse};

pub mod finisher;
pub mod metrics;
pub mod stream;
pub mod tokens;

pub use finisher::Finisher;
pub use metrics::Metrics;
pub use stream::{ChatStream, StreamItem};

/// One `[models."NAME"]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Where the model is served, tried in order.
    pub deployments: Vec<DeploymentConfig>,
}

/// One deployment of a model: a configured provider and the upstream model name, with optional
/// price overrides (USD per million tokens).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// A key of `[providers]`.
    pub provider: String,
    /// The model name the upstream knows (for Azure: the deployment name).
    pub model: String,
    #[serde(default)]
    pub input_cost_per_mtok: Option<f64>,
    #[serde(default)]
    pub output_cost_per_mtok: Option<f64>,
    #[serde(default)]
    pub cached_input_cost_per_mtok: Option<f64>,
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
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{name}: must be a non-negative number, got {v}"));
            }
        }
        let base = table.lookup(&self.model);
        let overridden = self.input_cost_per_mtok.is_some()
            || self.output_cost_per_mtok.is_some()
            || self.cached_input_cost_per_mtok.is_some();
        if !overridden {
            return Ok(base);
        }
        let b = base.unwrap_or_default();
        Ok(Some(ModelPrice {
            input: self.input_cost_per_mtok.unwrap_or(b.input),
            output: self.output_cost_per_mtok.unwrap_or(b.output),
            cached_input: self.cached_input_cost_per_mtok.or(b.cached_input),
        }))
    }
}

/// A running deployment.
pub struct Deployment {
    /// The configured provider name.
    pub provider_name: String,
    pub provider: Arc<dyn ChatProvider>,
    /// The upstream model name.
    pub model: String,
    /// `None` when neither the table nor the config knows a price: cost is then 0.
    pub price: Option<ModelPrice>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
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
}

impl RequestContext {
    pub fn new(endpoint: &str, stream: bool) -> Self {
        RequestContext {
            started: Instant::now(),
            record: RequestRecord::start(sluice_types::ids::new_request_id(), endpoint, stream),
        }
    }

    pub fn id(&self) -> uuid::Uuid {
        self.record.id
    }
}

/// The result of a chat request that did not fail before its response started.
pub enum ChatOutcome {
    /// A whole completion; its record is already written. `cost_usd` is for the response header.
    Complete {
        completion: Box<ChatCompletion>,
        cost_usd: f64,
    },
    /// A stream of chunks; its record is written when the stream ends or is dropped.
    Stream(ChatStream),
}

/// The gateway: models, their deployments, and where records go.
pub struct Gateway {
    models: BTreeMap<String, Vec<Deployment>>,
    sink: LogSink,
    metrics: Arc<Metrics>,
    bodies: BodyMode,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("models", &self.models)
            .field("bodies", &self.bodies)
            .finish()
    }
}

impl Gateway {
    pub fn new(
        models: BTreeMap<String, Vec<Deployment>>,
        sink: LogSink,
        metrics: Arc<Metrics>,
        bodies: BodyMode,
    ) -> Self {
        tokens::preload();
        Gateway {
            models,
            sink,
            metrics,
            bodies,
        }
    }

    /// The configured model names, sorted.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The deployments of a model.
    pub fn deployments(&self, model: &str) -> Option<&[Deployment]> {
        self.models.get(model).map(Vec::as_slice)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn finisher(&self, ctx: RequestContext) -> Finisher {
        let known = self.models.contains_key(&ctx.record.model);
        Finisher::new(ctx, self.sink.clone(), self.metrics.clone(), known)
    }

    fn resolve(&self, model: &str) -> Result<&[Deployment], Error> {
        match self.models.get(model) {
            Some(d) if !d.is_empty() => Ok(d),
            _ => {
                let names: Vec<&str> = self.model_names().collect();
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
        self.finisher(ctx).fail(err).await;
    }

    /// Serves a chat completion (plain or streamed).
    pub async fn chat(
        &self,
        mut ctx: RequestContext,
        req: ChatRequest,
    ) -> Result<ChatOutcome, Error> {
        ctx.record.model.clone_from(&req.model);
        ctx.record.stream = req.is_stream();
        attribute(&mut ctx.record, &req);
        if self.bodies == BodyMode::Full {
            ctx.record.request_body = serde_json::to_value(&req).ok();
        }
        let mut fin = self.finisher(ctx);
        if let Err(e) = validate(&req) {
            fin.fail(&e).await;
            return Err(e);
        }
        let deployments = match self.resolve(&req.model) {
            Ok(d) => d,
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        let stream = req.is_stream();
        let mut last_err = None;
        for (i, dep) in deployments.iter().enumerate() {
            let mut up = req.clone();
            up.model.clone_from(&dep.model);
            fin.attempt(dep);
            let result = if stream {
                dep.provider
                    .chat_stream(&up)
                    .await
                    .map(ChatOutcomeInner::Stream)
            } else {
                dep.provider
                    .chat(&up)
                    .await
                    .map(|c| ChatOutcomeInner::Complete(Box::new(c)))
            };
            match result {
                Ok(ChatOutcomeInner::Complete(completion)) => {
                    let cost = fin
                        .complete(&up, dep, &completion, self.bodies == BodyMode::Full)
                        .await;
                    return Ok(ChatOutcome::Complete {
                        completion,
                        cost_usd: cost,
                    });
                }
                Ok(ChatOutcomeInner::Stream(s)) => {
                    return Ok(ChatOutcome::Stream(ChatStream::new(
                        s,
                        fin,
                        up,
                        dep.provider_name.clone(),
                        dep.price,
                        req.wants_stream_usage(),
                        self.bodies == BodyMode::Full,
                    )));
                }
                Err(e) => {
                    let retryable = is_failover_class(&e);
                    tracing::warn!(
                        request_id = %fin.id(),
                        provider = %dep.provider_name,
                        model = %dep.model,
                        error = %e,
                        "provider call failed"
                    );
                    let err = e.to_error(&dep.provider_name);
                    if !retryable || i + 1 == deployments.len() {
                        fin.fail(&err).await;
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        let err = last_err.unwrap_or_else(|| Error::internal("no deployment was tried"));
        fin.fail(&err).await;
        Err(err)
    }

    /// Serves embeddings.
    pub async fn embed(
        &self,
        mut ctx: RequestContext,
        req: EmbeddingRequest,
    ) -> Result<(EmbeddingResponse, f64), Error> {
        ctx.record.model.clone_from(&req.model);
        ctx.record.user = ctx.record.user.take().or_else(|| req.user.clone());
        if self.bodies == BodyMode::Full {
            ctx.record.request_body = serde_json::to_value(&req).ok();
        }
        let mut fin = self.finisher(ctx);
        if req.input.is_empty() {
            let e = Error::invalid("`input` must not be empty").with_param("input");
            fin.fail(&e).await;
            return Err(e);
        }
        let deployments = match self.resolve(&req.model) {
            Ok(d) => d,
            Err(e) => {
                fin.fail(&e).await;
                return Err(e);
            }
        };
        let mut last_err = None;
        for (i, dep) in deployments.iter().enumerate() {
            let mut up = req.clone();
            up.model.clone_from(&dep.model);
            fin.attempt(dep);
            match dep.provider.embed(&up).await {
                Ok(resp) => {
                    let cost = fin.embedded(&up, dep, &resp).await;
                    return Ok((resp, cost));
                }
                Err(e) => {
                    let retryable = is_failover_class(&e);
                    let err = e.to_error(&dep.provider_name);
                    if !retryable || i + 1 == deployments.len() {
                        fin.fail(&err).await;
                        return Err(err);
                    }
                    last_err = Some(err);
                }
            }
        }
        let err = last_err.unwrap_or_else(|| Error::internal("no deployment was tried"));
        fin.fail(&err).await;
        Err(err)
    }
}

enum ChatOutcomeInner {
    Complete(Box<ChatCompletion>),
    Stream(sluice_core::provider::ChunkStream),
}

/// Errors worth trying the next deployment for: the upstream is down, slow, overloaded or broken,
/// not the request.
fn is_failover_class(e: &sluice_core::ProviderError) -> bool {
    use sluice_core::ProviderError as P;
    match e {
        P::Status { status, .. } => *status == 429 || *status >= 500,
        P::Timeout(_) | P::Connect(_) | P::Protocol(_) => true,
        P::Unsupported(_) => false,
        _ => false,
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

/// Tags from a comma-separated list.
pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}
