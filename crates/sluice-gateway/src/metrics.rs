//! Prometheus metrics, fed from the same [`RequestRecord`]s the log stores, so the two always
//! agree. Labels are low-cardinality: the configured model name (or `unknown`), the configured
//! provider name (or `none`), and the outcome.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_core::record::RequestRecord;
use std::sync::atomic::AtomicU64;

pub const REQUESTS: &str = "sluice_requests";
pub const ERRORS: &str = "sluice_errors";
pub const TOKENS: &str = "sluice_tokens";
pub const COST: &str = "sluice_cost_usd";
pub const LATENCY: &str = "sluice_request_duration_seconds";
pub const TTFT: &str = "sluice_time_to_first_token_seconds";
pub const ATTEMPTS: &str = "sluice_attempts";
pub const BREAKER: &str = "sluice_deployment_breaker_state";
pub const IN_FLIGHT: &str = "sluice_deployment_in_flight";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    model: String,
    deployment: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    model: String,
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    model: String,
    provider: String,
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: String,
    provider: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    provider: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    model: String,
    provider: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0,
    ])
}

/// The gateway's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    errors: Family<ErrorLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<Route, Counter<f64, AtomicU64>>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    ttft: Family<Route, Histogram, fn() -> Histogram>,
    attempts: Family<AttemptLabels, Counter>,
    breaker: Family<DeploymentLabels, Gauge>,
    in_flight: Family<DeploymentLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Outcome, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let cost = Family::<Route, Counter<f64, AtomicU64>>::default();
        let latency = Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let ttft = Family::<Route, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            REQUESTS,
            "Requests by model, provider, endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            ERRORS,
            "Errors by model, provider and error code",
            errors.clone(),
        );
        registry.register(
            TOKENS,
            "Tokens by model, provider and kind (prompt, completion, cached)",
            tokens.clone(),
        );
        registry.register(COST, "Cost in USD by model and provider", cost.clone());
        registry.register(
            LATENCY,
            "Request latency in seconds, start to last byte",
            latency.clone(),
        );
        registry.register(
            TTFT,
            "Time to first token in seconds (streams)",
            ttft.clone(),
        );
        let attempts = Family::<AttemptLabels, Counter>::default();
        let breaker = Family::<DeploymentLabels, Gauge>::default();
        let in_flight = Family::<DeploymentLabels, Gauge>::default();
        registry.register(
            ATTEMPTS,
            "Provider calls by model group, deployment and outcome (ok or the error class)",
            attempts.clone(),
        );
        registry.register(
            BREAKER,
            "Circuit breaker state per deployment: 0 closed, 1 open, 2 half-open",
            breaker.clone(),
        );
        registry.register(
            IN_FLIGHT,
            "Requests in flight per deployment",
            in_flight.clone(),
        );
        Metrics {
            attempts,
            breaker,
            in_flight,
            registry,
            requests,
            errors,
            tokens,
            cost,
            latency,
            ttft,
        }
    }

    /// Counts one finished request. `model_known` says whether the asked model is configured;
    /// unknown names are folded into `unknown` to keep label cardinality bounded.
    pub fn observe(&self, rec: &RequestRecord, model_known: bool) {
        let model = if model_known {
            rec.model.as_str()
        } else {
            "unknown"
        };
        let provider = rec.provider.as_deref().unwrap_or("none");
        let route = Route {
            model: model.to_string(),
            provider: provider.to_string(),
        };
        self.requests
            .get_or_create(&Outcome {
                model: route.model.clone(),
                provider: route.provider.clone(),
                endpoint: rec.endpoint.clone(),
                status: rec.status.as_str().to_string(),
            })
            .inc();
        if let Some(code) = &rec.error_code {
            self.errors
                .get_or_create(&ErrorLabels {
                    model: route.model.clone(),
                    provider: route.provider.clone(),
                    code: code.clone(),
                })
                .inc();
        }
        for (kind, n) in [
            ("prompt", rec.prompt_tokens),
            ("completion", rec.completion_tokens),
            ("cached", rec.cached_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: route.model.clone(),
                        provider: route.provider.clone(),
                        kind: kind.to_string(),
                    })
                    .inc_by(n);
            }
        }
        if rec.cost_usd > 0.0 {
            self.cost.get_or_create(&route).inc_by(rec.cost_usd);
        }
        self.latency
            .get_or_create(&route)
            .observe(rec.latency_ms / 1000.0);
        if let Some(t) = rec.ttft_ms {
            self.ttft.get_or_create(&route).observe(t / 1000.0);
        }
        for a in &rec.attempt_log {
            self.attempts
                .get_or_create(&AttemptLabels {
                    model: a.group.clone(),
                    deployment: a.deployment.clone(),
                    outcome: a.outcome.clone(),
                })
                .inc();
        }
    }

    /// Sets a deployment's breaker-state and in-flight gauges.
    pub fn deployment_state(&self, model: &str, deployment: &str, breaker: i64, in_flight: u32) {
        let labels = DeploymentLabels {
            model: model.to_string(),
            deployment: deployment.to_string(),
        };
        self.breaker.get_or_create(&labels).set(breaker);
        self.in_flight
            .get_or_create(&labels)
            .set(i64::from(in_flight));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
