//! Prometheus metrics, fed from the same [`RequestRecord`]s the log stores, so the two always
//! agree. Labels are low-cardinality: the configured model name (or `unknown`), the configured
//! provider name (or `none`), and the outcome.

use parking_lot::RwLock;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_core::record::RequestRecord;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

pub const REQUESTS: &str = "sluice_requests";
pub const ERRORS: &str = "sluice_errors";
pub const TOKENS: &str = "sluice_tokens";
pub const COST: &str = "sluice_cost_usd";
pub const LATENCY: &str = "sluice_request_duration_seconds";
pub const TTFT: &str = "sluice_time_to_first_token_seconds";
pub const ATTEMPTS: &str = "sluice_attempts";
pub const BREAKER: &str = "sluice_deployment_breaker_state";
pub const IN_FLIGHT: &str = "sluice_deployment_in_flight";
pub const LOG_QUEUE: &str = "sluice_log_queue_records";
pub const LOG_QUEUE_BYTES: &str = "sluice_log_queue_bytes";
pub const LOG_WRITTEN: &str = "sluice_log_records_written";
pub const LOG_SPILLED: &str = "sluice_log_records_spilled";
pub const LOG_REFUSED: &str = "sluice_log_records_refused";
pub const LOG_SLOW: &str = "sluice_log_slow_batches";

/// A label value. The encoder writes values as they are, so this escapes what the exposition
/// format requires (`\\`, `"` and line feeds): a model named `a"b` in the configuration would
/// otherwise make the whole scrape unparseable.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Lv(String);

impl Lv {
    fn new(s: &str) -> Self {
        Lv(s.to_string())
    }
}

impl EncodeLabelValue for Lv {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    model: Lv,
    deployment: Lv,
    outcome: Lv,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    model: Lv,
    deployment: Lv,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    model: Lv,
    provider: Lv,
    endpoint: Lv,
    status: Lv,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    model: Lv,
    provider: Lv,
    code: Lv,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: Lv,
    provider: Lv,
    kind: Lv,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    model: Lv,
    provider: Lv,
}

/// The `kind` label of the tokens counter, by index into [`RouteHandles::tokens`].
const TOKEN_KINDS: [&str; 3] = ["prompt", "completion", "cached"];

/// The metric handles of one (model, provider) pair. Observing a request through them clones no
/// label strings and hashes no label sets: the metric families are only touched the first time a
/// series is used. The series that may never be used (tokens of a kind, cost, time to first
/// token) are made on first use, so the exposition shows the same series as before.
struct RouteHandles {
    labels: Route,
    /// Requests by (endpoint, status); a handful per route.
    outcomes: RwLock<Vec<(String, &'static str, Counter)>>,
    tokens: [OnceLock<Counter>; 3],
    cost: OnceLock<Counter<f64, AtomicU64>>,
    latency: Histogram,
    ttft: OnceLock<Histogram>,
}

impl RouteHandles {
    fn outcome(&self, metrics: &Metrics, endpoint: &str, status: &'static str) -> Counter {
        let find = |v: &Vec<(String, &'static str, Counter)>| {
            v.iter()
                .find(|(e, s, _)| e == endpoint && *s == status)
                .map(|(_, _, c)| c.clone())
        };
        if let Some(c) = find(&self.outcomes.read()) {
            return c;
        }
        let c = metrics
            .requests
            .get_or_create(&Outcome {
                model: self.labels.model.clone(),
                provider: self.labels.provider.clone(),
                endpoint: Lv::new(endpoint),
                status: Lv::new(status),
            })
            .clone();
        let mut outcomes = self.outcomes.write();
        if find(&outcomes).is_none() {
            outcomes.push((endpoint.to_string(), status, c.clone()));
        }
        c
    }
}

/// Handles by model, then provider (nested so that lookups borrow the record's strings).
type RouteMap = HashMap<String, HashMap<String, Arc<RouteHandles>>>;
/// Attempts counters by group, then deployment, then outcome.
type AttemptMap = HashMap<String, HashMap<String, Vec<(String, Counter)>>>;

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
    log_queue: Gauge,
    log_queue_bytes: Gauge,
    log_written: Counter,
    log_spilled: Counter,
    log_refused: Counter,
    log_slow: Counter,
    routes: RwLock<RouteMap>,
    attempt_handles: RwLock<AttemptMap>,
    /// The deployments whose gauges are exposed (see [`Metrics::deployment_states`]).
    deployments_shown: parking_lot::Mutex<HashSet<DeploymentLabels>>,
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
        let log_queue = Gauge::default();
        registry.register(
            LOG_QUEUE,
            "Request records queued for the log writer (requests wait when the queue is full)",
            log_queue.clone(),
        );
        let log_queue_bytes = Gauge::default();
        registry.register(
            LOG_QUEUE_BYTES,
            "Bytes of request records queued for the log writer or being written (1 KiB per record plus its bodies; requests wait when store.queue_bytes is reached)",
            log_queue_bytes.clone(),
        );
        let log_written = Counter::default();
        registry.register(
            LOG_WRITTEN,
            "Request records written to the store",
            log_written.clone(),
        );
        let log_spilled = Counter::default();
        registry.register(
            LOG_SPILLED,
            "Request records put in the spill file while the store could not take them (written back when it answers)",
            log_spilled.clone(),
        );
        let log_refused = Counter::default();
        registry.register(
            LOG_REFUSED,
            "Request records the store refused as data (kept in the spill file's .rejected file)",
            log_refused.clone(),
        );
        let log_slow = Counter::default();
        registry.register(
            LOG_SLOW,
            "Batches of request records that took over a second to write",
            log_slow.clone(),
        );
        Metrics {
            attempts,
            breaker,
            in_flight,
            log_queue,
            log_queue_bytes,
            log_written,
            log_spilled,
            log_refused,
            log_slow,
            registry,
            requests,
            errors,
            tokens,
            cost,
            latency,
            ttft,
            routes: RwLock::default(),
            attempt_handles: RwLock::default(),
            deployments_shown: parking_lot::Mutex::default(),
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
        let h = self.route(model, provider);
        h.outcome(self, &rec.endpoint, rec.status.as_str()).inc();
        if let Some(code) = &rec.error_code {
            self.errors
                .get_or_create(&ErrorLabels {
                    model: Lv::new(model),
                    provider: Lv::new(provider),
                    code: Lv::new(code),
                })
                .inc();
        }
        for (i, n) in [rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens]
            .into_iter()
            .enumerate()
        {
            if n > 0 {
                h.tokens[i]
                    .get_or_init(|| {
                        self.tokens
                            .get_or_create(&TokenLabels {
                                model: Lv::new(model),
                                provider: Lv::new(provider),
                                kind: Lv::new(TOKEN_KINDS[i]),
                            })
                            .clone()
                    })
                    .inc_by(n);
            }
        }
        if rec.cost_usd > 0.0 {
            h.cost
                .get_or_init(|| self.cost.get_or_create(&h.labels).clone())
                .inc_by(rec.cost_usd);
        }
        h.latency.observe(rec.latency_ms / 1000.0);
        if let Some(t) = rec.ttft_ms {
            h.ttft
                .get_or_init(|| self.ttft.get_or_create(&h.labels).clone())
                .observe(t / 1000.0);
        }
        for a in &rec.attempt_log {
            self.attempt(&a.group, &a.deployment, &a.outcome).inc();
        }
    }

    /// The handles of a (model, provider) pair, made on first use.
    fn route(&self, model: &str, provider: &str) -> Arc<RouteHandles> {
        if let Some(h) = self
            .routes
            .read()
            .get(model)
            .and_then(|by_provider| by_provider.get(provider))
        {
            return Arc::clone(h);
        }
        let labels = Route {
            model: Lv::new(model),
            provider: Lv::new(provider),
        };
        let made = Arc::new(RouteHandles {
            latency: self.latency.get_or_create(&labels).clone(),
            labels,
            outcomes: RwLock::new(Vec::new()),
            tokens: Default::default(),
            cost: OnceLock::new(),
            ttft: OnceLock::new(),
        });
        let mut routes = self.routes.write();
        let slot = routes
            .entry(model.to_string())
            .or_default()
            .entry(provider.to_string())
            .or_insert(made);
        Arc::clone(slot)
    }

    /// The attempts counter of a (group, deployment, outcome), made on first use.
    fn attempt(&self, group: &str, deployment: &str, outcome: &str) -> Counter {
        let find = |v: &Vec<(String, Counter)>| {
            v.iter().find(|(o, _)| o == outcome).map(|(_, c)| c.clone())
        };
        if let Some(c) = self
            .attempt_handles
            .read()
            .get(group)
            .and_then(|by_dep| by_dep.get(deployment))
            .and_then(find)
        {
            return c;
        }
        let c = self
            .attempts
            .get_or_create(&AttemptLabels {
                model: Lv::new(group),
                deployment: Lv::new(deployment),
                outcome: Lv::new(outcome),
            })
            .clone();
        let mut handles = self.attempt_handles.write();
        let v = handles
            .entry(group.to_string())
            .or_default()
            .entry(deployment.to_string())
            .or_default();
        if find(v).is_none() {
            v.push((outcome.to_string(), c.clone()));
        }
        c
    }

    /// Sets the breaker-state and in-flight gauges of every deployment configured now, given by
    /// `states` as (model group, deployment id, breaker gauge value, requests in flight), and
    /// drops the series of deployments no longer configured (after a reload), so that a removed
    /// deployment's open breaker does not stay exposed. `states` is read while concurrent
    /// refreshes wait, so that one that read an older configuration cannot bring its
    /// deployments back after a newer one dropped them.
    pub fn deployment_states(&self, states: impl FnOnce() -> Vec<(String, String, i64, u32)>) {
        let mut shown = self.deployments_shown.lock();
        let states = states();
        let mut now = HashSet::with_capacity(shown.len());
        for (model, deployment, breaker, in_flight) in states {
            let labels = DeploymentLabels {
                model: Lv(model),
                deployment: Lv(deployment),
            };
            self.breaker.get_or_create(&labels).set(breaker);
            self.in_flight
                .get_or_create(&labels)
                .set(i64::from(in_flight));
            now.insert(labels);
        }
        for gone in shown.difference(&now) {
            self.breaker.remove(gone);
            self.in_flight.remove(gone);
        }
        *shown = now;
    }

    /// How many request records wait for the log writer, and their bytes.
    pub fn log_queue(&self, records: usize, bytes: u64) {
        self.log_queue
            .set(i64::try_from(records).unwrap_or(i64::MAX));
        self.log_queue_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
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

impl sluice_core::record::WriterObserver for Metrics {
    fn written(&self, records: u64) {
        self.log_written.inc_by(records);
    }
    fn spilled(&self, records: u64) {
        self.log_spilled.inc_by(records);
    }
    fn refused(&self, records: u64) {
        self.log_refused.inc_by(records);
    }
    fn slow_batch(&self) {
        self.log_slow.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::RecordStatus;

    fn record(model: &str, status: RecordStatus, completion: u64) -> RequestRecord {
        let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
        r.model = model.into();
        r.provider = Some("p".into());
        r.status = status;
        r.completion_tokens = completion;
        r.latency_ms = 5.0;
        r
    }

    #[test]
    fn cached_handles_count_into_the_exposed_series() {
        let m = Metrics::new();
        m.observe(&record("a", RecordStatus::Ok, 3), true);
        m.observe(&record("a", RecordStatus::Ok, 4), true);
        m.observe(&record("a", RecordStatus::Error, 0), true);
        m.observe(&record("secret-name", RecordStatus::Ok, 0), false);
        let text = m.encode();
        for line in [
            r#"sluice_requests_total{model="a",provider="p",endpoint="chat.completions",status="ok"} 2"#,
            r#"sluice_requests_total{model="a",provider="p",endpoint="chat.completions",status="error"} 1"#,
            r#"sluice_requests_total{model="unknown",provider="p",endpoint="chat.completions",status="ok"} 1"#,
            r#"sluice_tokens_total{model="a",provider="p",kind="completion"} 7"#,
            r#"sluice_request_duration_seconds_count{model="a",provider="p"} 3"#,
        ] {
            assert!(text.contains(line), "missing `{line}` in\n{text}");
        }
        // Series never used are not exposed.
        assert!(!text.contains(r#"kind="prompt""#), "{text}");
        assert!(!text.contains("secret-name"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        let mut r = record("fast \"v2\"\\x\ny", RecordStatus::Ok, 1);
        r.provider = Some("p".into());
        m.observe(&r, true);
        m.deployment_states(|| vec![("a\"b".into(), "up/m\\1".into(), 1, 0)]);
        let text = m.encode();
        assert!(
            text.contains(r#"sluice_requests_total{model="fast \"v2\"\\x\ny",provider="p","#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sluice_deployment_breaker_state{model="a\"b",deployment="up/m\\1"} 1"#
            ),
            "{text}"
        );
        // Every sample line is one line with balanced quotes.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let unescaped_quotes = line
                .replace("\\\\", "")
                .replace("\\\"", "")
                .matches('"')
                .count();
            assert_eq!(unescaped_quotes % 2, 0, "{line}");
        }
    }

    #[test]
    fn gauges_of_deployments_gone_are_dropped() {
        let m = Metrics::new();
        m.deployment_states(|| {
            vec![
                ("g".into(), "up/a".into(), 1, 2),
                ("g".into(), "up/b".into(), 0, 0),
            ]
        });
        let text = m.encode();
        assert!(text.contains(r#"sluice_deployment_breaker_state{model="g",deployment="up/a"} 1"#));
        assert!(text.contains(r#"sluice_deployment_in_flight{model="g",deployment="up/a"} 2"#));
        // Reloaded without up/a.
        m.deployment_states(|| vec![("g".into(), "up/b".into(), 2, 1)]);
        let text = m.encode();
        assert!(!text.contains("up/a"), "{text}");
        assert!(text.contains(r#"sluice_deployment_breaker_state{model="g",deployment="up/b"} 2"#));
        assert!(text.contains(r#"sluice_deployment_in_flight{model="g",deployment="up/b"} 1"#));
    }
}
