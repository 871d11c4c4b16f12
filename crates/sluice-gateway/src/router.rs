//! The router: model groups, their deployments' live state, and the choice of deployment for each
//! attempt.
//!
//! A model name maps to a [`Group`]: deployments (provider + upstream model + weight + optional
//! rpm/tpm capacity + tags + optional LoRA adapter), a [`Strategy`], a retry policy, fallbacks by
//! error class, per-attempt timeouts and a circuit breaker per deployment. [`Group::pick`] chooses
//! the deployment for one attempt among those that are admissible now (breaker not open, not
//! cooling down after a 429, under capacity); the attempt loop that calls it lives in
//! `crate::Gateway`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_core::error::{ErrorClass, MAX_RETRY_AFTER};
use sluice_core::price::ModelPrice;

use crate::Deployment;
use crate::breaker::{Admission, Breaker, BreakerConfig, BreakerSnapshot, BreakerState, Probe};
use crate::complexity::{Classifier, ComplexityConfig};
use crate::window::{Charge, Ewma, RateWindow};

/// How a group spreads requests over its deployments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random, proportional to each deployment's `weight`.
    #[default]
    Weighted,
    /// In turn.
    RoundRobin,
    /// The deployment with the fewest requests in flight.
    LeastBusy,
    /// Power of two choices over each deployment's latency EWMA.
    Latency,
    /// The cheapest deployment (input + output price per token); unpriced counts as free.
    Cost,
    /// A tier of other model groups chosen by the request's complexity.
    Complexity,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Weighted => "weighted",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastBusy => "least_busy",
            Strategy::Latency => "latency",
            Strategy::Cost => "cost",
            Strategy::Complexity => "complexity",
        }
    }
}

/// `[models.NAME.retries]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts after the first, within the group (another deployment when one is left, else the
    /// same one after a backoff).
    pub retries: u32,
    /// First backoff; doubles per retry of a deployment already tried, with full jitter.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// The longest Sluice waits for a `Retry-After`, a cool-down or free capacity before it gives
    /// up on the group (and falls back, or answers 429/503 with `Retry-After`).
    pub max_wait_secs: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            retries: 2,
            backoff_ms: 100,
            backoff_max_ms: 5_000,
            max_wait_secs: 10.0,
        }
    }
}

/// `[models.NAME.fallbacks]`: other model groups to try, by the class of the error that ended
/// this group's attempts. `default` applies to every class without its own list except
/// `client_error`, which never falls back.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    pub rate_limited: Vec<String>,
    pub context_window_exceeded: Vec<String>,
    pub content_policy: Vec<String>,
    pub server_error: Vec<String>,
    pub timeout: Vec<String>,
    pub default: Vec<String>,
}

impl FallbackConfig {
    pub fn for_class(&self, class: ErrorClass) -> &[String] {
        let own = match class {
            ErrorClass::RateLimited => &self.rate_limited,
            ErrorClass::ContextWindowExceeded => &self.context_window_exceeded,
            ErrorClass::ContentPolicy => &self.content_policy,
            ErrorClass::ServerError => &self.server_error,
            ErrorClass::Timeout => &self.timeout,
            ErrorClass::ClientError => return &[],
        };
        if own.is_empty() { &self.default } else { own }
    }

    /// Every fallback target, with the class it is for.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [
            ("rate_limited", &self.rate_limited),
            ("context_window_exceeded", &self.context_window_exceeded),
            ("content_policy", &self.content_policy),
            ("server_error", &self.server_error),
            ("timeout", &self.timeout),
            ("default", &self.default),
        ]
        .into_iter()
        .flat_map(|(k, v)| v.iter().map(move |m| (k, m)))
    }
}

/// `[models.NAME.timeouts]`: limits per attempt. (Connecting is limited per provider, under
/// `[providers.NAME.timeouts]`.)
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// From sending the request to the first generated content (streams) or the whole answer
    /// (plain requests, when `total_secs` is not set).
    pub first_token_secs: Option<f64>,
    /// The whole attempt, to its last byte.
    pub total_secs: Option<f64>,
    /// The longest gap between two chunks of a stream.
    pub stream_idle_secs: Option<f64>,
}

impl TimeoutConfig {
    fn validate(&self) -> Result<(), String> {
        for (k, v) in [
            ("first_token_secs", self.first_token_secs),
            ("total_secs", self.total_secs),
            ("stream_idle_secs", self.stream_idle_secs),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0 && v <= 86_400.0)
            {
                return Err(format!(
                    "timeouts.{k}: must be a number of seconds in (0, 86400], got {v}"
                ));
            }
        }
        Ok(())
    }

    pub fn first_token(&self) -> Option<Duration> {
        self.first_token_secs.map(Duration::from_secs_f64)
    }

    pub fn total(&self) -> Option<Duration> {
        self.total_secs.map(Duration::from_secs_f64)
    }

    /// How long a stream may take to open (up to its first content): the first-token timeout,
    /// but never past the attempt's total.
    pub fn opening(&self) -> Option<Duration> {
        match (self.first_token(), self.total()) {
            (Some(f), Some(t)) => Some(f.min(t)),
            (f, t) => f.or(t),
        }
    }

    pub fn stream_idle(&self) -> Option<Duration> {
        self.stream_idle_secs.map(Duration::from_secs_f64)
    }
}

/// `[models.NAME.health_check]`: probe each deployment in the background (for OpenAI-compatible
/// and Anthropic upstreams: list the models; no tokens are spent). Failures count against the
/// deployment's circuit breaker like failed requests' (server errors and timeouts do; a 429 or a
/// client error does not), and once the breaker's cool-down has passed
/// a successful check is its half-open probe, so a recovered deployment closes without a user
/// request risking it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between checks of one deployment.
    #[serde(default = "default_health_interval")]
    pub interval_secs: f64,
    /// Seconds a check may take.
    #[serde(default = "default_health_timeout")]
    pub timeout_secs: f64,
}

fn default_health_interval() -> f64 {
    30.0
}
fn default_health_timeout() -> f64 {
    5.0
}

impl HealthConfig {
    fn validate(&self) -> Result<(), String> {
        if !(self.interval_secs.is_finite() && (0.05..=86_400.0).contains(&self.interval_secs)) {
            return Err(format!(
                "health_check.interval_secs: must be in [0.05, 86400], got {}",
                self.interval_secs
            ));
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0 && self.timeout_secs <= 600.0)
        {
            return Err(format!(
                "health_check.timeout_secs: must be in (0, 600], got {}",
                self.timeout_secs
            ));
        }
        Ok(())
    }
}

/// The last active health check of a deployment.
#[derive(Debug, Clone, Serialize)]
pub struct HealthStatus {
    pub ok: bool,
    /// Seconds since the check.
    pub checked_secs_ago: f64,
    pub error: Option<String>,
    pub checks: u64,
    pub failures: u64,
}

/// One `[models."NAME"]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Where the model is served.
    #[serde(default)]
    pub deployments: Vec<crate::DeploymentConfig>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub fallbacks: FallbackConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// For `strategy = "complexity"`: the tiers and the classifier's examples.
    #[serde(default)]
    pub complexity: Option<ComplexityConfig>,
    /// Active health checks (off when absent).
    #[serde(default)]
    pub health_check: Option<HealthConfig>,
}

/// A deployment and its live state.
pub struct DeploymentState {
    pub dep: Deployment,
    /// Shared with the deployment's state in the router before a reload (and after the next)
    /// while the deployment stays the same.
    live: Arc<Live>,
    /// Whether a health-check loop runs for this state.
    health_running: std::sync::atomic::AtomicBool,
}

/// What a deployment has learnt and holds: in-flight calls, latency, capacity, breaker,
/// cool-down, health.
struct Live {
    in_flight: AtomicU32,
    latency: Ewma,
    /// When `latency` last took a sample, in milliseconds past `epoch` plus one (0: never).
    latency_at_ms: AtomicU64,
    /// When the last latency sample came (same clock; 0: never). Unlike `latency_at_ms`, not
    /// moved by a re-measurement that has not answered yet.
    sampled_at_ms: AtomicU64,
    /// A request went to re-measure a forgotten average: its sample starts the average afresh.
    remeasuring: std::sync::atomic::AtomicBool,
    /// When a request went to take the first sample of a deployment never measured (as
    /// `latency_at_ms`; 0: none): until it answers, or for [`LATENCY_MEMORY`] at most, the others
    /// do not go there too.
    measuring_since_ms: AtomicU64,
    /// The average of answers alone (failures count as slow in `latency`, not here): how long a
    /// half-open probe may take before its cancelled client says nothing.
    answer_latency: Ewma,
    rpm: Option<RateWindow>,
    tpm: Option<RateWindow>,
    breaker: Breaker,
    /// After a 429: not picked before this many milliseconds past `epoch`.
    cooling_until_ms: AtomicU64,
    epoch: Instant,
    requests: AtomicU64,
    failures: AtomicU64,
    health: parking_lot::Mutex<Option<(Instant, Result<(), String>)>>,
    health_checks: AtomicU64,
    health_failures: AtomicU64,
    /// The generation of the health-check loop that is current (see `start_health_checks`).
    health_loop: AtomicU64,
}

impl std::fmt::Debug for DeploymentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentState")
            .field("dep", &self.dep)
            .finish_non_exhaustive()
    }
}

/// Holds one in-flight slot of a deployment until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<DeploymentState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.live.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tokens-per-minute reservation made before a call, settled with the real count after it; one
/// dropped unsettled (its client left during the call) is given back.
#[derive(Debug)]
pub struct TokenReservation {
    dep: Arc<DeploymentState>,
    reserved: u64,
    charge: Charge,
    settled: bool,
}

impl TokenReservation {
    /// Replaces the estimate with the real count.
    pub fn settle(mut self, actual: u64) {
        self.settle_with(actual);
    }

    fn settle_with(&mut self, actual: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(w) = &self.dep.live.tpm {
            let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                - i64::try_from(self.reserved).unwrap_or(i64::MAX);
            if delta != 0 {
                w.reconcile(self.charge, Instant::now(), delta);
            }
        }
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        self.settle_with(0);
    }
}

impl DeploymentState {
    pub fn new(dep: Deployment, breaker: BreakerConfig) -> Self {
        DeploymentState {
            live: Arc::new(Live {
                rpm: dep.rpm.map(RateWindow::new),
                tpm: dep.tpm.map(RateWindow::new),
                in_flight: AtomicU32::new(0),
                latency: Ewma::new(0.2),
                latency_at_ms: AtomicU64::new(0),
                sampled_at_ms: AtomicU64::new(0),
                measuring_since_ms: AtomicU64::new(0),
                remeasuring: std::sync::atomic::AtomicBool::new(false),
                answer_latency: Ewma::new(0.2),
                breaker: Breaker::new(breaker),
                cooling_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                health: parking_lot::Mutex::new(None),
                health_checks: AtomicU64::new(0),
                health_failures: AtomicU64::new(0),
                health_loop: AtomicU64::new(0),
            }),
            dep,
            health_running: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The same deployment served through `dep` (a rebuilt provider, new weight, prices or
    /// capacity figures), keeping what `previous` has learnt and holds: breaker, latency, capacity
    /// windows, cool-down, in-flight calls and health. The caller checks that the deployment's
    /// identity (its fingerprint), its provider's configuration and its breaker settings are
    /// unchanged. Its capacity figures apply to the windows it shares with `previous` once the
    /// new configuration is taken: [`apply_capacity`](Self::apply_capacity).
    pub fn carry_over(previous: &DeploymentState, dep: Deployment) -> Self {
        DeploymentState {
            dep,
            live: previous.live.clone(),
            health_running: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sets the deployment's rpm/tpm figures on its windows, keeping what they counted: for a
    /// state carried over a reload, once the new configuration has been taken whole (a reload
    /// refused later must leave the running windows as they were).
    pub fn apply_capacity(&self) {
        for (w, limit) in [
            (&self.live.rpm, self.dep.rpm),
            (&self.live.tpm, self.dep.tpm),
        ] {
            if let (Some(w), Some(limit)) = (w, limit) {
                w.set_limit(limit);
            }
        }
    }

    /// Gives back what a [`Pick::Go`] took for an attempt that is not made: its probe slot, its
    /// request in the rpm window and its token reservation (the in-flight slot goes with its
    /// guard).
    pub fn unpick(
        &self,
        probe: Option<Probe>,
        rpm: Option<Charge>,
        tokens: Option<TokenReservation>,
    ) {
        self.release_probe(probe);
        if let (Some(w), Some(c)) = (&self.live.rpm, rpm) {
            w.reconcile(c, Instant::now(), -1);
        }
        if let Some(t) = tokens {
            t.settle(0);
        }
    }

    /// Runs one active health check, unless the breaker is open and still cooling down. Returns
    /// `false` when the provider has no health check (the caller stops checking).
    pub async fn check_health(&self, timeout: Duration) -> bool {
        let now = Instant::now();
        let probe = match self.live.breaker.admit(now) {
            Admission::Rejected => return true,
            a => a.probe(),
        };
        let result = match tokio::time::timeout(timeout, self.dep.provider.health()).await {
            Ok(Err(sluice_core::ProviderError::Unsupported(_))) => {
                // Nothing was learnt: the probe slot goes back for a request to use.
                self.release_probe(probe);
                return false;
            }
            Ok(r) => r.map_err(|e| (e.class().is_deployment_fault(), e.to_string())),
            Err(_) => Err((
                true,
                format!("no answer within {:.1} s", timeout.as_secs_f64()),
            )),
        };
        self.live.health_checks.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.live.health_failures.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            // As the half-open probe, an answer shows the deployment is back. While closed, a
            // passing check counts nothing: the check (listing models) does not exercise the
            // path requests take, so it must not end a run of failed requests (a retired model
            // answering 404 to every request, behind a models list that still answers, would
            // then never open the breaker).
            Ok(()) if probe.is_some() => self.live.breaker.record(Instant::now(), true, probe),
            Ok(()) => {}
            Err((true, _)) => self.live.breaker.record(Instant::now(), false, probe),
            // A 429 or a client error counts as a request's would: the deployment answered
            // (health, for a probe), and nothing otherwise.
            Err((false, _)) if probe.is_some() => {
                self.live.breaker.record(Instant::now(), true, probe)
            }
            Err((false, _)) => {}
        }
        let result = result.map_err(|(_, e)| e);
        *self.live.health.lock() = Some((Instant::now(), result));
        true
    }

    fn health_status(&self, now: Instant) -> Option<HealthStatus> {
        let h = self.live.health.lock();
        h.as_ref().map(|(at, r)| HealthStatus {
            ok: r.is_ok(),
            checked_secs_ago: (now.saturating_duration_since(*at).as_secs_f64() * 1000.0).round()
                / 1000.0,
            error: r.as_ref().err().cloned(),
            checks: self.live.health_checks.load(Ordering::Relaxed),
            failures: self.live.health_failures.load(Ordering::Relaxed),
        })
    }

    fn ms_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.live.epoch).as_millis())
            .unwrap_or(u64::MAX)
    }

    /// Adds a latency sample; an average older than [`LATENCY_MEMORY`] is forgotten, so the
    /// sample starts it afresh.
    fn observe_latency(&self, now: Instant, ms: f64) {
        let at = self.latency_stamp(now);
        self.live.sampled_at_ms.store(at, Ordering::Relaxed);
        let last = self.live.latency_at_ms.swap(at, Ordering::Relaxed);
        let remeasured = self.live.remeasuring.swap(false, Ordering::Relaxed);
        if remeasured || forgotten(last, at) {
            self.live.latency.reset(ms);
        } else {
            self.live.latency.observe(ms);
        }
    }

    /// The latency average, in milliseconds; `None` before the first sample or when the last is
    /// older than [`LATENCY_MEMORY`] (the deployment counts as not measured, and is tried again).
    pub fn latency_ms(&self, now: Instant) -> Option<f64> {
        let last = self.live.latency_at_ms.load(Ordering::Relaxed);
        if forgotten(last, self.latency_stamp(now)) {
            return None;
        }
        self.live.latency.get()
    }

    /// `now` as a latency sample's time: milliseconds past `epoch`, plus one (0 is "never").
    fn latency_stamp(&self, now: Instant) -> u64 {
        self.ms_since_epoch(now).saturating_add(1)
    }

    /// Notes that a request goes to re-measure a forgotten average: until it answers, the old
    /// average stands (so the others are not all sent here meanwhile), and its sample then
    /// starts the average afresh.
    fn remeasure(&self, now: Instant) {
        if self.live.latency.get().is_none() {
            let at = self.latency_stamp(now);
            self.live.measuring_since_ms.store(at, Ordering::Relaxed);
        } else if self.latency_ms(now).is_none() {
            self.live.remeasuring.store(true, Ordering::Relaxed);
            let at = self.latency_stamp(now);
            self.live.latency_at_ms.store(at, Ordering::Relaxed);
        }
    }

    /// What the `latency` strategy compares: the average; none (0) for a deployment to be
    /// measured; and for one never measured whose first request has not answered yet, last
    /// place (the others are not all sent there meanwhile, for as long as its first answer
    /// takes).
    fn latency_rank(&self, now: Instant) -> f64 {
        if let Some(ms) = self.latency_ms(now) {
            return ms;
        }
        let since = self.live.measuring_since_ms.load(Ordering::Relaxed);
        if self.live.latency.get().is_none() && !forgotten(since, self.latency_stamp(now)) {
            f64::INFINITY
        } else {
            0.0
        }
    }

    /// How long the deployment still cools down after a 429 (or a failure with `Retry-After`).
    fn cooling(&self, now: Instant) -> Option<Duration> {
        let until = self.live.cooling_until_ms.load(Ordering::Relaxed);
        let at = self.ms_since_epoch(now);
        (until > at).then(|| Duration::from_millis(until - at))
    }

    /// Whether the deployment cannot take a request now: how long until it might, and whether
    /// capacity or a 429 blocks it (`true`) rather than its open breaker.
    fn blocked(&self, now: Instant, tokens: u64) -> Option<(Option<Duration>, bool)> {
        if let Some(d) = self.cooling(now) {
            return Some((Some(d), true));
        }
        if self.live.breaker.state(now) == BreakerState::Open {
            return Some((
                self.live
                    .breaker
                    .snapshot(now)
                    .retry_in_secs
                    .map(Duration::from_secs_f64),
                false,
            ));
        }
        if let Some(w) = &self.live.rpm
            && w.used(now) + 1 > w.limit()
        {
            return Some((w.wait_for(now, 1), true));
        }
        if let Some(w) = &self.live.tpm
            && tokens > 0
            && w.used(now) > 0
            && w.used(now) + tokens > w.limit()
        {
            return Some((w.wait_for(now, tokens), true));
        }
        None
    }

    pub fn breaker_config(&self) -> &BreakerConfig {
        self.live.breaker.config()
    }

    pub fn in_flight(&self) -> u32 {
        self.live.in_flight.load(Ordering::Relaxed)
    }

    /// Notes an attempt's outcome: latency, breaker, cool-down.
    pub fn report(
        &self,
        now: Instant,
        latency: Duration,
        failure: Option<(ErrorClass, Option<Duration>)>,
        probe: Option<Probe>,
    ) {
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        match failure {
            None => {
                let ms = latency.as_secs_f64() * 1000.0;
                self.observe_latency(now, ms);
                self.live.answer_latency.observe(ms);
                self.live.breaker.record(now, true, probe);
            }
            Some((class, retry_after)) => {
                // A 429 cools the deployment down for its `Retry-After` (1 s without one); any
                // other failure that names a `Retry-After` (a 503, say) for that long, at most
                // MAX_RETRY_AFTER whichever provider set it; the sum cannot overflow.
                let pause = match (class, retry_after) {
                    (_, Some(d)) => Some(d.min(MAX_RETRY_AFTER)),
                    (ErrorClass::RateLimited, None) => Some(Duration::from_secs(1)),
                    _ => None,
                };
                if let Some(pause) = pause {
                    let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
                    let until = self.ms_since_epoch(now).saturating_add(pause_ms);
                    self.live
                        .cooling_until_ms
                        .fetch_max(until, Ordering::Relaxed);
                }
                if class.is_deployment_fault() {
                    self.live.failures.fetch_add(1, Ordering::Relaxed);
                    // A failure cost its client at least as long as an answer would have: it
                    // counts as a sample of twice the longer of its own time and the average,
                    // and at least FAILURE_SAMPLE_MS, so that a deployment that times out or
                    // fails often looks slow, not fast (one that fails at once looked fastest).
                    let ms = latency.as_secs_f64() * 1000.0;
                    let slow =
                        (ms.max(self.latency_ms(now).unwrap_or(0.0)) * 2.0).max(FAILURE_SAMPLE_MS);
                    self.observe_latency(now, slow.min(MAX_LATENCY_SAMPLE_MS));
                    self.live.breaker.record(now, false, probe);
                } else if probe.is_some() {
                    // The deployment answered: as a probe, that is health.
                    self.live.breaker.record(now, true, probe);
                }
                // Otherwise (a 429, a client error) the answer says nothing about the
                // deployment's health: it neither counts in the breaker's window nor ends a run
                // of failures.
            }
        }
    }

    /// Settles a half-open probe as a success without reporting an attempt (a stream that
    /// opened; its attempt is reported when it ends).
    pub fn probe_answered(&self, now: Instant, probe: Probe) {
        self.live.breaker.record(now, true, Some(probe));
    }

    /// Gives back the slot of a probe whose call taught nothing: not made, or cancelled by the
    /// client mid-call.
    pub fn release_probe(&self, probe: Option<Probe>) {
        if let Some(p) = probe {
            self.live.breaker.release_probe(p);
        }
    }

    /// How long a call may run and still be said to have taught nothing when its client leaves:
    /// twice the deployment's usual latency, at least [`PROBE_PATIENCE_FLOOR`]. A trial cancelled
    /// later than that may well be hanging: its slot stays taken until the cooldown, so that the
    /// next requests are not sent to the same hang one after another.
    pub fn probe_patience(&self) -> Duration {
        let usual = self
            .live
            .answer_latency
            .get()
            .filter(|ms| ms.is_finite() && *ms > 0.0)
            .map_or(Duration::ZERO, |ms| {
                Duration::from_secs_f64((2.0 * ms / 1000.0).min(3600.0))
            });
        usual.max(PROBE_PATIENCE_FLOOR)
    }

    pub fn breaker_state(&self, now: Instant) -> BreakerState {
        self.live.breaker.state(now)
    }

    /// What `/api/deployments` shows.
    pub fn status(&self, group: &str, now: Instant) -> DeploymentStatus {
        DeploymentStatus {
            group: group.to_string(),
            id: self.dep.id.clone(),
            provider: self.dep.provider_name.clone(),
            provider_type: self.dep.provider.kind(),
            model: self.dep.model.clone(),
            adapter: self.dep.adapter.clone(),
            weight: self.dep.weight,
            tags: self.dep.tags.clone(),
            in_flight: self.in_flight(),
            requests: self.live.requests.load(Ordering::Relaxed),
            failures: self.live.failures.load(Ordering::Relaxed),
            // The last average however old (the strategy forgets one older than 30 s, and so
            // tries the deployment again), with its age.
            latency_ewma_ms: (self.live.sampled_at_ms.load(Ordering::Relaxed) != 0)
                .then(|| self.live.latency.get())
                .flatten()
                .map(|v| (v * 1000.0).round() / 1000.0),
            latency_sampled_secs_ago: match self.live.sampled_at_ms.load(Ordering::Relaxed) {
                0 => None,
                last => Some(self.latency_stamp(now).saturating_sub(last) / 1000),
            },
            rpm: self.live.rpm.as_ref().map(|w| Capacity {
                limit: w.limit(),
                used: w.used(now),
            }),
            tpm: self.live.tpm.as_ref().map(|w| Capacity {
                limit: w.limit(),
                used: w.used(now),
            }),
            cooling_secs: self.cooling(now).map(|d| d.as_secs_f64()),
            breaker: self.live.breaker.snapshot(now),
            health: self.health_status(now),
            price: self.dep.price,
        }
    }
}

/// A capacity and its use over the last minute.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub limit: u64,
    pub used: u64,
}

/// A deployment's live status.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentStatus {
    pub group: String,
    pub id: String,
    pub provider: String,
    pub provider_type: &'static str,
    pub model: String,
    pub adapter: Option<String>,
    pub weight: f64,
    pub tags: Vec<String>,
    pub in_flight: u32,
    pub requests: u64,
    pub failures: u64,
    pub latency_ewma_ms: Option<f64>,
    /// How long ago the last latency sample was taken (the latency strategy forgets an average
    /// older than 30 s).
    pub latency_sampled_secs_ago: Option<u64>,
    pub rpm: Option<Capacity>,
    pub tpm: Option<Capacity>,
    pub cooling_secs: Option<f64>,
    pub breaker: BreakerSnapshot,
    pub health: Option<HealthStatus>,
    pub price: Option<ModelPrice>,
}

/// A model group.
pub struct Group {
    pub name: String,
    pub strategy: Strategy,
    pub deployments: Vec<Arc<DeploymentState>>,
    pub retry: RetryConfig,
    pub fallbacks: FallbackConfig,
    pub timeouts: TimeoutConfig,
    pub classifier: Option<Classifier>,
    /// Whether any deployment has a tokens-per-minute capacity (then requests are estimated).
    pub has_tpm: bool,
    pub health_check: Option<HealthConfig>,
    rr: AtomicUsize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("deployments", &self.deployments)
            .finish_non_exhaustive()
    }
}

/// How long a deployment's latency average lasts without a sample: past it the deployment counts
/// as not measured (the `latency` strategy tries it again) and its next sample starts afresh.
pub const LATENCY_MEMORY: Duration = Duration::from_secs(30);
const LATENCY_MEMORY_MS: u64 = LATENCY_MEMORY.as_millis() as u64;
/// Whether a latency average last sampled at `last` is forgotten at `at` (never sampled, or
/// longer ago than [`LATENCY_MEMORY`]).
fn forgotten(last: u64, at: u64) -> bool {
    last == 0 || at.saturating_sub(last) > LATENCY_MEMORY_MS
}

/// The largest latency sample, in milliseconds (an hour).
const MAX_LATENCY_SAMPLE_MS: f64 = 3_600_000.0;

/// The least latency sample a failed attempt counts as, in milliseconds.
const FAILURE_SAMPLE_MS: f64 = 10_000.0;

/// The least [`DeploymentState::probe_patience`].
pub const PROBE_PATIENCE_FLOOR: Duration = Duration::from_secs(1);

/// The outcome of choosing a deployment for one attempt.
#[derive(Debug)]
pub enum Pick {
    /// Call this deployment. `probe`: the call is a half-open breaker's trial.
    Go {
        dep: Arc<DeploymentState>,
        probe: Option<Probe>,
        in_flight: InFlight,
        /// The request's place in the deployment's rpm window.
        rpm: Option<Charge>,
        tokens: Option<TokenReservation>,
    },
    /// Every deployment is blocked; the soonest may take requests after this long (`None`: not
    /// within a minute). `rate_limited`: capacity or a 429 blocks at least one of them (so the
    /// group takes requests again soon); `breakers_open`: an open (or busy half-open) circuit
    /// breaker blocks at least one.
    Wait {
        after: Option<Duration>,
        rate_limited: bool,
        breakers_open: bool,
    },
}

impl Group {
    pub fn new(
        name: String,
        strategy: Strategy,
        deployments: Vec<Arc<DeploymentState>>,
        retry: RetryConfig,
        fallbacks: FallbackConfig,
        timeouts: TimeoutConfig,
        classifier: Option<Classifier>,
    ) -> Self {
        let has_tpm = deployments.iter().any(|d| d.live.tpm.is_some());
        Group {
            name,
            strategy,
            deployments,
            retry,
            fallbacks,
            timeouts,
            classifier,
            has_tpm,
            health_check: None,
            rr: AtomicUsize::new(0),
        }
    }

    /// Whether some deployment could take a request of `tokens` now: not cooling down after a
    /// 429, its breaker letting it through (closed, or half-open with a trial slot free), within
    /// its capacity. A look only: nothing is taken.
    pub fn open_now(&self, now: Instant, tokens: u64) -> bool {
        self.deployments
            .iter()
            .any(|d| d.blocked(now, tokens).is_none() && d.live.breaker.would_admit(now))
    }

    /// Chooses the deployment for one attempt. Deployments this request already tried are
    /// avoided while an untried one is admissible. `tokens` is the request's estimated size for
    /// tokens-per-minute capacity (0 when no deployment has one).
    pub fn pick(&self, now: Instant, tried: &[bool], tokens: u64) -> Pick {
        self.pick_among(now, tried, &[], tokens)
    }

    /// [`pick`](Self::pick), never choosing a deployment marked in `refused` (one that cannot
    /// serve this request at all: it refused it before sending, for a feature it lacks).
    pub fn pick_among(&self, now: Instant, tried: &[bool], refused: &[bool], tokens: u64) -> Pick {
        let n = self.deployments.len();
        let mut excluded = vec![false; n];
        let mut soonest: Option<Duration> = None;
        let (mut rate_limited, mut breakers_open) = (false, false);
        for (i, d) in self.deployments.iter().enumerate() {
            if refused.get(i).copied().unwrap_or(false) {
                excluded[i] = true;
                continue;
            }
            if let Some((wait, capacity)) = d.blocked(now, tokens) {
                excluded[i] = true;
                if capacity {
                    rate_limited = true;
                } else {
                    breakers_open = true;
                }
                if let Some(w) = wait {
                    soonest = Some(soonest.map_or(w, |s| s.min(w)));
                }
            }
        }
        loop {
            let untried: Vec<usize> = (0..n)
                .filter(|&i| !excluded[i] && !tried.get(i).copied().unwrap_or(false))
                .collect();
            let candidates: Vec<usize> = if untried.is_empty() {
                (0..n).filter(|&i| !excluded[i]).collect()
            } else {
                untried
            };
            let Some(i) = self.choose(&candidates, now) else {
                return Pick::Wait {
                    after: soonest,
                    rate_limited,
                    breakers_open,
                };
            };
            let d = &self.deployments[i];
            let probe = match d.live.breaker.admit(now) {
                Admission::Rejected => {
                    excluded[i] = true;
                    breakers_open = true;
                    continue;
                }
                a => a.probe(),
            };
            let rpm = match &d.live.rpm {
                Some(w) => match w.charge(now, 1) {
                    Some(c) => Some(c),
                    None => {
                        excluded[i] = true;
                        rate_limited = true;
                        if let Some(wt) = w.wait_for(now, 1) {
                            soonest = Some(soonest.map_or(wt, |s| s.min(wt)));
                        }
                        d.unpick(probe, None, None);
                        continue;
                    }
                },
                None => None,
            };
            let reservation = match &d.live.tpm {
                Some(w) if tokens > 0 => match w.charge(now, tokens) {
                    Some(charge) => Some(TokenReservation {
                        dep: d.clone(),
                        reserved: tokens,
                        charge,
                        settled: false,
                    }),
                    None => {
                        excluded[i] = true;
                        rate_limited = true;
                        if let Some(wt) = w.wait_for(now, tokens) {
                            soonest = Some(soonest.map_or(wt, |s| s.min(wt)));
                        }
                        d.unpick(probe, rpm, None);
                        continue;
                    }
                },
                _ => None,
            };
            d.live.in_flight.fetch_add(1, Ordering::Relaxed);
            return Pick::Go {
                dep: d.clone(),
                probe,
                in_flight: InFlight(d.clone()),
                rpm,
                tokens: reservation,
            };
        }
    }

    /// The strategy's choice among `candidates` (indices into `deployments`).
    fn choose(&self, candidates: &[usize], now: Instant) -> Option<usize> {
        match candidates {
            [] => return None,
            [only] => return Some(*only),
            _ => {}
        }
        let deps = &self.deployments;
        Some(match self.strategy {
            Strategy::Weighted | Strategy::Complexity => {
                let total: f64 = candidates.iter().map(|&i| deps[i].dep.weight).sum();
                if total <= 0.0 {
                    candidates[fastrand::usize(..candidates.len())]
                } else {
                    let mut x = fastrand::f64() * total;
                    let mut chosen = candidates[candidates.len() - 1];
                    for &i in candidates {
                        x -= deps[i].dep.weight;
                        if x < 0.0 {
                            chosen = i;
                            break;
                        }
                    }
                    chosen
                }
            }
            Strategy::RoundRobin => {
                // Turns over the deployments that can take the request now, so that one left
                // out shares its turns evenly rather than handing them all to its neighbour.
                let turn = self.rr.fetch_add(1, Ordering::Relaxed);
                candidates[turn % candidates.len()]
            }
            Strategy::LeastBusy => {
                // One read of each counter: other requests move them meanwhile, and the ties
                // must come from the same snapshot as the minimum.
                let busy: Vec<(usize, u32)> = candidates
                    .iter()
                    .map(|&i| (i, deps[i].in_flight()))
                    .collect();
                let least = busy.iter().map(|&(_, n)| n).min().unwrap_or(0);
                let ties = busy.iter().filter(|&&(_, n)| n == least).count();
                let mut k = fastrand::usize(..ties.max(1));
                let mut chosen = candidates[0];
                for &(i, n) in &busy {
                    if n == least {
                        if k == 0 {
                            chosen = i;
                            break;
                        }
                        k -= 1;
                    }
                }
                chosen
            }
            Strategy::Latency => {
                let a = fastrand::usize(..candidates.len());
                let mut b = fastrand::usize(..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                // No recent sample counts as fastest, so every deployment gets measured, and
                // one that was slow is tried again once its average is forgotten.
                let la = deps[a].latency_rank(now);
                let lb = deps[b].latency_rank(now);
                let chosen = if la <= lb { a } else { b };
                deps[chosen].remeasure(now);
                chosen
            }
            Strategy::Cost => {
                let cost = |i: usize| deps[i].dep.price.map(|p| p.input + p.output).unwrap_or(0.0);
                let cheapest = candidates
                    .iter()
                    .map(|&i| cost(i))
                    .fold(f64::INFINITY, f64::min);
                let ties: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&i| cost(i) <= cheapest)
                    .collect();
                ties[fastrand::usize(..ties.len())]
            }
        })
    }

    /// The backoff before retry number `retry` (1-based) of a deployment already tried: full
    /// jitter over an exponential bound.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self.retry.backoff_ms as f64;
        let cap = self.retry.backoff_max_ms as f64;
        let bound = (base * 2f64.powi(retry.saturating_sub(1).min(30) as i32)).min(cap);
        Duration::from_secs_f64(bound * (0.5 + fastrand::f64() * 0.5) / 1000.0)
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_secs_f64(self.retry.max_wait_secs)
    }
}

/// Every model group, by name.
#[derive(Debug, Default)]
pub struct Router {
    groups: BTreeMap<String, Arc<Group>>,
    /// `[limits]`: per user, per model and global rate limits (swapped with the router on reload).
    pub limits: crate::limits::LimitsConfig,
    /// `[budgets]`: per user and per team budgets (each key's own are on the key).
    pub budgets: crate::budget::BudgetsConfig,
    /// `[cache]`: the exact cache's settings (its memory bound is fixed at start).
    pub cache: crate::cache::CacheConfig,
}

impl Router {
    /// Builds the router and checks the references between groups (fallbacks, tiers).
    pub fn new(groups: Vec<Group>) -> Result<Self, String> {
        let groups: BTreeMap<String, Arc<Group>> = groups
            .into_iter()
            .map(|g| (g.name.clone(), Arc::new(g)))
            .collect();
        for (name, g) in &groups {
            for (class, target) in g.fallbacks.all() {
                if !groups.contains_key(target) {
                    return Err(format!(
                        "models.{name}.fallbacks.{class}: no model `{target}`; configured models: {}",
                        groups.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
                if target == name {
                    return Err(format!(
                        "models.{name}.fallbacks.{class}: a model cannot fall back to itself"
                    ));
                }
                if groups[target].classifier.is_some() {
                    return Err(format!(
                        "models.{name}.fallbacks.{class}: `{target}` routes by complexity; fall back to a model with deployments (one of its tiers)"
                    ));
                }
            }
            if let Some(c) = &g.classifier {
                for (i, t) in c.tiers().iter().enumerate() {
                    let Some(target) = groups.get(&t.model) else {
                        return Err(format!(
                            "models.{name}.complexity.tiers[{i}].model: no model `{}`; configured models: {}",
                            t.model,
                            groups.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    };
                    if target.strategy == Strategy::Complexity {
                        return Err(format!(
                            "models.{name}.complexity.tiers[{i}].model: `{}` routes by complexity itself; a tier must name a model with deployments",
                            t.model
                        ));
                    }
                }
            }
        }
        Ok(Router {
            groups,
            limits: Default::default(),
            budgets: Default::default(),
            cache: Default::default(),
        })
    }

    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        self.groups.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.groups.values()
    }

    /// The deployments of hosted or self-hosted upstreams with no price (`group/deployment`, in
    /// name order): their cost is recorded as 0 and budgets never stop them. Local models and
    /// the mock cost nothing by nature and are left out.
    pub fn unpriced(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .groups
            .values()
            .flat_map(|g| g.deployments.iter().map(move |d| (g, d)))
            .filter(|(_, d)| {
                d.dep.price.is_none() && !matches!(d.dep.provider.kind(), "mock" | "local")
            })
            .map(|(g, d)| format!("{}/{}", g.name, d.dep.id))
            .collect();
        out.sort();
        out
    }

    /// Every deployment's live status.
    pub fn status(&self) -> Vec<DeploymentStatus> {
        let now = Instant::now();
        self.groups
            .values()
            .flat_map(|g| g.deployments.iter().map(move |d| d.status(&g.name, now)))
            .collect()
    }

    /// Starts the active health checks of every group that asks for them. Each check loop holds
    /// only a weak reference: it ends when its deployment is gone (after a reload, once the last
    /// request on the old router finished), or when a newer router took the deployment's state
    /// over and started its own loop.
    pub fn start_health_checks(&self) {
        // On the main runtime, even when a reload through the API builds the router on a
        // connection thread: a loop there would wait on that thread's requests.
        let Some(rt) = sluice_core::shard::background() else {
            return;
        };
        for g in self.groups.values() {
            let Some(h) = &g.health_check else { continue };
            let interval = Duration::from_secs_f64(h.interval_secs);
            let timeout = Duration::from_secs_f64(h.timeout_secs);
            for d in &g.deployments {
                if d.health_running.swap(true, Ordering::Relaxed) {
                    continue;
                }
                // A loop of the router this state was carried over from stops at its next turn.
                let generation = d.live.health_loop.fetch_add(1, Ordering::Relaxed) + 1;
                let weak = Arc::downgrade(d);
                rt.spawn(async move {
                    loop {
                        tokio::time::sleep(interval).await;
                        let Some(d) = weak.upgrade() else { return };
                        if d.live.health_loop.load(Ordering::Relaxed) != generation {
                            return;
                        }
                        if !d.check_health(timeout).await {
                            tracing::info!(deployment = %d.dep.id, "provider has no health check; active checks stop");
                            return;
                        }
                    }
                });
            }
        }
    }

    /// The live state of a deployment, for carrying it over a reload when the deployment did not
    /// change.
    pub fn find_state(&self, group: &str, fingerprint: &str) -> Option<Arc<DeploymentState>> {
        self.groups.get(group).and_then(|g| {
            g.deployments
                .iter()
                .find(|d| d.dep.fingerprint == fingerprint)
                .cloned()
        })
    }
}

/// Builds one group from its configuration and already-built deployments. Errors name the key
/// path below `models.NAME`.
pub fn build_group(
    name: &str,
    cfg: &ModelConfig,
    deployments: Vec<Arc<DeploymentState>>,
) -> Result<Group, String> {
    cfg.timeouts.validate()?;
    if let Some(h) = &cfg.health_check {
        h.validate()?;
    }
    cfg.circuit_breaker
        .validate()
        .map_err(|e| format!("circuit_breaker.{e}"))?;
    let r = &cfg.retry_checked()?;
    let classifier = match (cfg.strategy, &cfg.complexity) {
        (Strategy::Complexity, Some(c)) => {
            Some(Classifier::new(c).map_err(|e| format!("complexity.{e}"))?)
        }
        (Strategy::Complexity, None) => {
            return Err(
                "complexity: strategy \"complexity\" needs a [models.NAME.complexity] table with tiers"
                    .into(),
            );
        }
        (_, Some(_)) => {
            return Err("complexity: only used with strategy = \"complexity\"".into());
        }
        (_, None) => None,
    };
    if classifier.is_none() && deployments.is_empty() {
        return Err("deployments: needs at least one deployment".into());
    }
    if classifier.is_some() && !deployments.is_empty() {
        return Err(
            "deployments: a model with strategy \"complexity\" routes to its tiers' models; list deployments there"
                .into(),
        );
    }
    if classifier.is_some() {
        // A routed request runs with its tier's settings: these would be silently ignored.
        for (key, set) in [
            ("retries", cfg.retries != RetryConfig::default()),
            ("fallbacks", cfg.fallbacks != FallbackConfig::default()),
            ("timeouts", cfg.timeouts != TimeoutConfig::default()),
            (
                "circuit_breaker",
                cfg.circuit_breaker != BreakerConfig::default(),
            ),
            ("health_check", cfg.health_check.is_some()),
        ] {
            if set {
                return Err(format!(
                    "{key}: not used with strategy \"complexity\" (a request runs with the settings of its tier's model); set {key} on the tier models"
                ));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, d) in deployments.iter().enumerate() {
        if !seen.insert(d.dep.id.as_str()) {
            return Err(format!(
                "deployments[{i}].id: `{}` is used twice; give each deployment a distinct `id`",
                d.dep.id
            ));
        }
    }
    let mut group = Group::new(
        name.to_string(),
        cfg.strategy,
        deployments,
        r.clone(),
        cfg.fallbacks.clone(),
        cfg.timeouts.clone(),
        classifier,
    );
    group.health_check = cfg.health_check.clone();
    Ok(group)
}

impl ModelConfig {
    fn retry_checked(&self) -> Result<RetryConfig, String> {
        let r = &self.retries;
        if r.retries > 10 {
            return Err(format!("retries.retries: at most 10, got {}", r.retries));
        }
        if r.backoff_max_ms < r.backoff_ms {
            return Err(format!(
                "retries.backoff_max_ms: must be at least backoff_ms ({}), got {}",
                r.backoff_ms, r.backoff_max_ms
            ));
        }
        if !(r.max_wait_secs.is_finite() && (0.0..=600.0).contains(&r.max_wait_secs)) {
            return Err(format!(
                "retries.max_wait_secs: must be in [0, 600], got {}",
                r.max_wait_secs
            ));
        }
        Ok(r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_providers::mock::{Mock, MockConfig};

    fn dep(id: &str, weight: f64, price: Option<(f64, f64)>, rpm: Option<u64>) -> Deployment {
        Deployment {
            id: id.to_string(),
            provider_name: "p".into(),
            provider: Arc::new(Mock::new(&MockConfig::default()).unwrap()),
            model: id.to_string(),
            price: price.map(|(input, output)| ModelPrice {
                input,
                output,
                ..ModelPrice::default()
            }),
            weight,
            rpm,
            tpm: None,
            tags: Vec::new(),
            adapter: None,
            fingerprint: id.to_string(),
            config: id.to_string(),
        }
    }

    fn group(strategy: Strategy, deps: Vec<Deployment>, breaker: BreakerConfig) -> Group {
        Group::new(
            "g".into(),
            strategy,
            deps.into_iter()
                .map(|d| Arc::new(DeploymentState::new(d, breaker.clone())))
                .collect(),
            RetryConfig::default(),
            FallbackConfig::default(),
            TimeoutConfig::default(),
            None,
        )
    }

    /// Picks once and returns the chosen deployment's id (the in-flight slot is released).
    fn pick_id(g: &Group, tried: &[bool]) -> Option<String> {
        match g.pick(Instant::now(), tried, 0) {
            Pick::Go { dep, .. } => Some(dep.dep.id.clone()),
            Pick::Wait { .. } => None,
        }
    }

    fn counts(g: &Group, n: usize) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            *out.entry(pick_id(g, &[]).expect("a pick")).or_default() += 1;
        }
        out
    }

    #[test]
    fn weighted_follows_the_weights() {
        let g = group(
            Strategy::Weighted,
            vec![
                dep("a", 3.0, None, None),
                dep("b", 1.0, None, None),
                dep("z", 0.0, None, None),
            ],
            BreakerConfig::default(),
        );
        let c = counts(&g, 8000);
        let a = c.get("a").copied().unwrap_or(0) as f64 / 8000.0;
        // 3:1 → 0.75; the binomial sd at n = 8000 is 0.005, so ±0.03 is six of them.
        assert!((a - 0.75).abs() < 0.03, "share of a: {a} ({c:?})");
        assert_eq!(
            c.get("z"),
            None,
            "weight 0 is never picked while others are: {c:?}"
        );
    }

    #[test]
    fn round_robin_takes_turns() {
        let g = group(
            Strategy::RoundRobin,
            vec![
                dep("a", 1.0, None, None),
                dep("b", 1.0, None, None),
                dep("c", 1.0, None, None),
            ],
            BreakerConfig::default(),
        );
        let seq: Vec<String> = (0..6).map(|_| pick_id(&g, &[]).unwrap()).collect();
        assert_eq!(seq, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn round_robin_shares_a_skipped_deployments_turns_evenly() {
        let g = group(
            Strategy::RoundRobin,
            vec![
                dep("a", 1.0, None, None),
                dep("b", 1.0, None, None),
                dep("c", 1.0, None, None),
            ],
            BreakerConfig::default(),
        );
        // b cools down after a 429: a and c take turns (it used to be a, c, c).
        g.deployments[1].report(
            Instant::now(),
            Duration::from_millis(5),
            Some((ErrorClass::RateLimited, Some(Duration::from_secs(60)))),
            None,
        );
        let seq: Vec<String> = (0..6).map(|_| pick_id(&g, &[]).unwrap()).collect();
        let a = seq.iter().filter(|id| *id == "a").count();
        assert_eq!((a, seq.len() - a), (3, 3), "{seq:?}");
        assert!(!seq.iter().any(|id| id == "b"), "{seq:?}");
    }

    #[test]
    fn latency_counts_failures_as_slow() {
        let g = group(
            Strategy::Latency,
            vec![
                dep("flaky", 1.0, None, None),
                dep("steady", 1.0, None, None),
            ],
            BreakerConfig::default(),
        );
        let now = Instant::now();
        // flaky answers in 200 ms but timed out after 10 s once; steady takes 400 ms.
        g.deployments[0].report(now, Duration::from_millis(200), None, None);
        g.deployments[0].report(
            now,
            Duration::from_secs(10),
            Some((ErrorClass::Timeout, None)),
            None,
        );
        g.deployments[1].report(now, Duration::from_millis(400), None, None);
        assert!(g.deployments[0].latency_ms(now).unwrap() > 4_000.0);
        assert_eq!(counts(&g, 40).get("steady"), Some(&40));
        // A fast server error counts as slow too.
        g.deployments[1].report(
            now,
            Duration::from_millis(3),
            Some((ErrorClass::ServerError, None)),
            None,
        );
        assert!(g.deployments[1].latency_ms(now).unwrap() > 400.0);
        // A client error says nothing about latency.
        let before = g.deployments[1].latency_ms(now);
        g.deployments[1].report(
            now,
            Duration::from_millis(3),
            Some((ErrorClass::ClientError, None)),
            None,
        );
        assert_eq!(g.deployments[1].latency_ms(now), before);
    }

    /// A deployment that fails at once is not the fastest: a new one whose first attempt was a
    /// 1 ms server error loses to one answering in 100 ms, and a failure shows in `failures`
    /// while a 429 and a client error (not the deployment's fault) do not.
    #[test]
    fn a_deployment_that_fails_fast_does_not_look_fast() {
        let g = group(
            Strategy::Latency,
            vec![dep("fails", 1.0, None, None), dep("works", 1.0, None, None)],
            BreakerConfig::default(),
        );
        let now = Instant::now();
        g.deployments[0].report(
            now,
            Duration::from_millis(1),
            Some((ErrorClass::ServerError, None)),
            None,
        );
        g.deployments[1].report(now, Duration::from_millis(100), None, None);
        assert!(g.deployments[0].latency_ms(now).unwrap() > 100.0);
        assert_eq!(counts(&g, 40).get("works"), Some(&40));
        for class in [ErrorClass::RateLimited, ErrorClass::ClientError] {
            g.deployments[1].report(now, Duration::from_millis(1), Some((class, None)), None);
        }
        let status = |i: usize| g.deployments[i].status("m", now);
        assert_eq!((status(0).requests, status(0).failures), (1, 1));
        assert_eq!((status(1).requests, status(1).failures), (3, 0));
    }

    /// The id of the deployment `g` picks at `at` for an attempt.
    fn picked(g: &Group, at: Instant) -> String {
        match g.pick(at, &[], 0) {
            Pick::Go { dep, .. } => dep.dep.id.clone(),
            Pick::Wait { .. } => panic!("no pick"),
        }
    }

    /// A deployment never measured gets one request to measure it; until that answers, the
    /// others go by their averages (all went to it until its first answer, which a cold
    /// deployment may take seconds to give).
    #[test]
    fn a_deployment_never_measured_gets_one_request_until_it_answers() {
        let t = Instant::now();
        let known_and_new = || {
            let g = group(
                Strategy::Latency,
                vec![dep("known", 1.0, None, None), dep("new", 1.0, None, None)],
                BreakerConfig::default(),
            );
            g.deployments[0].report(t, Duration::from_millis(50), None, None);
            g
        };
        let g = known_and_new();
        assert_eq!(picked(&g, t), "new", "measured first");
        for _ in 0..20 {
            assert_eq!(picked(&g, t), "known", "its first answer is awaited");
        }
        // Its first answer places it.
        g.deployments[1].report(t, Duration::from_millis(10), None, None);
        assert_eq!(picked(&g, t), "new");
        // A first request that never answered (cancelled) is given up after the memory.
        let h = known_and_new();
        assert_eq!(picked(&h, t), "new");
        assert_eq!(picked(&h, t), "known");
        let later = t + LATENCY_MEMORY + Duration::from_secs(1);
        h.deployments[0].report(later, Duration::from_millis(50), None, None);
        assert_eq!(picked(&h, later), "new", "measured again");
    }

    #[test]
    fn latency_forgets_an_old_average() {
        let g = group(
            Strategy::Latency,
            vec![
                dep("was_slow", 1.0, None, None),
                dep("fast", 1.0, None, None),
            ],
            BreakerConfig::default(),
        );
        let t = Instant::now();
        g.deployments[0].report(t, Duration::from_millis(3000), None, None);
        g.deployments[1].report(t, Duration::from_millis(20), None, None);
        let later = t + LATENCY_MEMORY + Duration::from_secs(1);
        // The slow average is forgotten: the deployment counts as unmeasured and is tried.
        assert_eq!(g.deployments[0].latency_ms(later), None);
        g.deployments[1].report(later, Duration::from_millis(20), None, None);
        assert_eq!(picked(&g, later), "was_slow");
        // One request re-measures it; until it answers, the old average stands and the others
        // go to the fast one.
        assert_eq!(g.deployments[0].latency_ms(later), Some(3000.0));
        assert_eq!(picked(&g, later), "fast");
        // Its next sample starts the average afresh rather than blending with 3000 ms.
        g.deployments[0].report(later, Duration::from_millis(10), None, None);
        assert_eq!(g.deployments[0].latency_ms(later), Some(10.0));
        assert_eq!(picked(&g, later), "was_slow");
    }

    #[test]
    fn cost_takes_the_cheapest() {
        let g = group(
            Strategy::Cost,
            vec![
                dep("dear", 1.0, Some((5.0, 15.0)), None),
                dep("cheap", 1.0, Some((0.15, 0.6)), None),
                dep("mid", 1.0, Some((1.0, 2.0)), None),
            ],
            BreakerConfig::default(),
        );
        assert_eq!(counts(&g, 50).get("cheap"), Some(&50));
    }

    #[test]
    fn least_busy_avoids_the_loaded_one() {
        let g = group(
            Strategy::LeastBusy,
            vec![dep("a", 1.0, None, None), dep("b", 1.0, None, None)],
            BreakerConfig::default(),
        );
        // Hold two requests on whichever is picked first, then the other must come next.
        let Pick::Go {
            dep: first,
            in_flight,
            ..
        } = g.pick(Instant::now(), &[], 0)
        else {
            panic!("a pick")
        };
        let Pick::Go {
            dep: second,
            in_flight: held2,
            ..
        } = g.pick(Instant::now(), &[], 0)
        else {
            panic!("a pick")
        };
        assert_ne!(first.dep.id, second.dep.id);
        drop(held2);
        for _ in 0..20 {
            assert_ne!(
                pick_id(&g, &[]).unwrap(),
                first.dep.id,
                "the busy one is avoided"
            );
        }
        drop(in_flight);
        assert_eq!(first.in_flight(), 0, "the slot is released on drop");
    }

    #[test]
    fn least_busy_stays_sound_while_other_requests_move_the_counts() {
        let g = Arc::new(group(
            Strategy::LeastBusy,
            vec![
                dep("a", 1.0, None, None),
                dep("b", 1.0, None, None),
                dep("c", 1.0, None, None),
            ],
            BreakerConfig::default(),
        ));
        // Four threads pick and release as fast as they can, so that counters change between a
        // pick's reads of them; every pick must still go somewhere.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000 {
                        match g.pick(Instant::now(), &[], 0) {
                            Pick::Go { in_flight, .. } => held.push(in_flight),
                            Pick::Wait { .. } => return Err("no deployment picked"),
                        }
                        if i % 3 == 0 {
                            held.clear();
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("no pick panics"), Ok(()));
        }
        assert!(g.deployments.iter().all(|d| d.in_flight() == 0));
    }

    #[test]
    fn rate_limits_and_client_errors_say_nothing_to_the_breaker() {
        let breaker = BreakerConfig {
            consecutive_failures: 3,
            min_requests: 1000,
            ..BreakerConfig::default()
        };
        let g = group(Strategy::Weighted, vec![dep("a", 1.0, None, None)], breaker);
        let d = &g.deployments[0];
        let now = Instant::now();
        let fail = Some((ErrorClass::ServerError, None));
        d.report(now, Duration::from_millis(5), fail, None);
        d.report(now, Duration::from_millis(5), fail, None);
        // A 429 and a bad request between them do not end the run of failures.
        d.report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::RateLimited, Some(Duration::from_millis(1)))),
            None,
        );
        d.report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::ClientError, None)),
            None,
        );
        let snap = d.live.breaker.snapshot(now);
        assert_eq!(snap.consecutive_failures, 2);
        assert_eq!(snap.window_requests, 2, "only the server errors count");
        d.report(now, Duration::from_millis(5), fail, None);
        assert_eq!(d.breaker_state(now), BreakerState::Open);
    }

    #[test]
    fn a_token_reservation_dropped_unsettled_is_given_back() {
        let mut d = dep("a", 1.0, None, None);
        d.tpm = Some(1000);
        let g = group(Strategy::Weighted, vec![d], BreakerConfig::default());
        let now = Instant::now();
        let Pick::Go { dep, tokens, .. } = g.pick(now, &[], 800) else {
            panic!("a pick");
        };
        assert_eq!(dep.status("g", now).tpm.map(|c| c.used), Some(800));
        // The client left during the call: the handler's future, and the reservation, are gone.
        drop(tokens);
        assert_eq!(dep.status("g", now).tpm.map(|c| c.used), Some(0));
        // A settled one is settled once.
        let Pick::Go { tokens, .. } = g.pick(now, &[], 800) else {
            panic!("a pick");
        };
        tokens.expect("a reservation").settle(300);
        assert_eq!(dep.status("g", now).tpm.map(|c| c.used), Some(300));
    }

    #[test]
    fn unpick_gives_back_the_rpm_tokens_and_probe_a_pick_took() {
        let mut d = dep("a", 1.0, None, Some(1));
        d.tpm = Some(1000);
        let breaker = BreakerConfig {
            consecutive_failures: 1,
            cooldown_secs: 60.0,
            ..BreakerConfig::default()
        };
        let g = group(Strategy::Weighted, vec![d], breaker);
        let t0 = Instant::now();
        let fail = Some((ErrorClass::ServerError, None));
        g.deployments[0].report(t0, Duration::from_millis(5), fail, None);
        // Past the cool-down the breaker is half-open: one trial at a time.
        let t1 = t0 + Duration::from_secs(61);
        let Pick::Go {
            dep,
            probe,
            in_flight,
            rpm,
            tokens,
        } = g.pick(t1, &[], 800)
        else {
            panic!("a half-open deployment takes a probe");
        };
        assert!(probe.is_some() && rpm.is_some() && tokens.is_some());
        let status = dep.status("g", t1);
        assert_eq!(status.rpm.map(|c| c.used), Some(1));
        assert_eq!(status.tpm.map(|c| c.used), Some(800));
        assert!(matches!(g.pick(t1, &[], 1), Pick::Wait { .. }));
        dep.unpick(probe, rpm, tokens);
        drop(in_flight);
        let status = dep.status("g", t1);
        assert_eq!(status.rpm.map(|c| c.used), Some(0));
        assert_eq!(status.tpm.map(|c| c.used), Some(0));
        assert_eq!(status.in_flight, 0);
        assert!(matches!(
            g.pick(t1, &[], 800),
            Pick::Go { probe: Some(_), .. }
        ));
    }

    /// A group is open to a request now only if `pick` could take it: not behind an open
    /// breaker, nor a half-open one whose trial is under way (taken for open, it made a fallback
    /// cut a wait short and then refuse the request).
    #[test]
    fn open_now_agrees_with_pick_about_half_open_breakers() {
        let breaker = BreakerConfig {
            consecutive_failures: 1,
            cooldown_secs: 60.0,
            ..BreakerConfig::default()
        };
        let g = group(Strategy::Weighted, vec![dep("a", 1.0, None, None)], breaker);
        let t0 = Instant::now();
        assert!(g.open_now(t0, 0));
        g.deployments[0].report(
            t0,
            Duration::from_millis(5),
            Some((ErrorClass::ServerError, None)),
            None,
        );
        assert!(!g.open_now(t0, 0), "open");
        let t1 = t0 + Duration::from_secs(61);
        assert!(g.open_now(t1, 0), "half-open, its trial slot free");
        let Pick::Go { probe, .. } = g.pick(t1, &[], 0) else {
            panic!("a half-open deployment takes a probe");
        };
        assert!(probe.is_some());
        assert!(!g.open_now(t1, 0), "half-open, its trial under way");
        assert!(matches!(g.pick(t1, &[], 0), Pick::Wait { .. }));
    }

    #[test]
    fn a_stream_opens_within_both_its_first_token_and_total_limits() {
        let t = |first: Option<f64>, total: Option<f64>| TimeoutConfig {
            first_token_secs: first,
            total_secs: total,
            ..TimeoutConfig::default()
        };
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(t(Some(60.0), Some(30.0)).opening(), secs(30));
        assert_eq!(t(Some(10.0), Some(30.0)).opening(), secs(10));
        assert_eq!(t(None, Some(30.0)).opening(), secs(30));
        assert_eq!(t(Some(10.0), None).opening(), secs(10));
        assert_eq!(t(None, None).opening(), None);
    }

    #[test]
    fn latency_prefers_the_faster() {
        let g = group(
            Strategy::Latency,
            vec![dep("slow", 1.0, None, None), dep("fast", 1.0, None, None)],
            BreakerConfig::default(),
        );
        let now = Instant::now();
        g.deployments[0].report(now, Duration::from_millis(300), None, None);
        g.deployments[1].report(now, Duration::from_millis(20), None, None);
        assert_eq!(counts(&g, 40).get("fast"), Some(&40));
    }

    #[test]
    fn untried_deployments_come_first() {
        let g = group(
            Strategy::Weighted,
            vec![dep("a", 1000.0, None, None), dep("b", 1.0, None, None)],
            BreakerConfig::default(),
        );
        for _ in 0..20 {
            assert_eq!(pick_id(&g, &[true, false]).as_deref(), Some("b"));
        }
        // Once both were tried, either may be tried again.
        assert!(pick_id(&g, &[true, true]).is_some());
    }

    #[test]
    fn open_breakers_and_full_capacity_are_skipped() {
        let breaker = BreakerConfig {
            consecutive_failures: 2,
            cooldown_secs: 60.0,
            ..BreakerConfig::default()
        };
        let g = group(
            Strategy::Weighted,
            vec![
                dep("bad", 1.0, None, None),
                dep("capped", 1.0, None, Some(2)),
            ],
            breaker,
        );
        let now = Instant::now();
        let fail = Some((ErrorClass::ServerError, None));
        g.deployments[0].report(now, Duration::from_millis(5), fail, None);
        g.deployments[0].report(now, Duration::from_millis(5), fail, None);
        assert_eq!(g.deployments[0].breaker_state(now), BreakerState::Open);
        assert_eq!(pick_id(&g, &[]).as_deref(), Some("capped"));
        assert_eq!(pick_id(&g, &[]).as_deref(), Some("capped"));
        // `capped` is at its 2 requests a minute and `bad` is open: nothing is admissible, and
        // the soonest change is the rpm window freeing up within the minute.
        match g.pick(Instant::now(), &[], 0) {
            Pick::Wait {
                after,
                rate_limited,
                breakers_open,
            } => {
                assert!(
                    after.is_some_and(|d| d <= Duration::from_secs(60)),
                    "{after:?}"
                );
                // Both blockers are named: the group takes requests again within the minute.
                assert!(rate_limited && breakers_open);
            }
            Pick::Go { dep, .. } => panic!("picked {}", dep.dep.id),
        }
    }

    #[test]
    fn a_429_cools_the_deployment_down_for_its_retry_after() {
        let g = group(
            Strategy::Weighted,
            vec![dep("a", 1.0, None, None)],
            BreakerConfig::default(),
        );
        let now = Instant::now();
        g.deployments[0].report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::RateLimited, Some(Duration::from_secs(30)))),
            None,
        );
        match g.pick(now, &[], 0) {
            Pick::Wait {
                after,
                rate_limited,
                breakers_open,
            } => {
                assert!(rate_limited && !breakers_open);
                let d = after.expect("a wait");
                assert!(
                    d > Duration::from_secs(29) && d <= Duration::from_secs(30),
                    "{d:?}"
                );
            }
            Pick::Go { .. } => panic!("a cooling deployment was picked"),
        }
        // Rate limits do not count against the breaker.
        assert_eq!(g.deployments[0].breaker_state(now), BreakerState::Closed);
    }

    #[test]
    fn a_503_with_retry_after_cools_down_too_and_no_wait_is_endless() {
        let g = group(
            Strategy::Weighted,
            vec![dep("a", 1.0, None, None), dep("b", 1.0, None, None)],
            BreakerConfig::default(),
        );
        let now = Instant::now();
        g.deployments[0].report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::ServerError, Some(Duration::from_secs(20)))),
            None,
        );
        // A Retry-After far beyond any sensible wait (or one sent in milliseconds) is capped.
        g.deployments[1].report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::RateLimited, Some(Duration::MAX))),
            None,
        );
        let a = g.deployments[0].cooling(now).expect("a cools down");
        assert!(
            a > Duration::from_secs(19) && a <= Duration::from_secs(20),
            "{a:?}"
        );
        let b = g.deployments[1].cooling(now).expect("b cools down");
        assert!(
            b <= MAX_RETRY_AFTER && b > MAX_RETRY_AFTER - Duration::from_secs(1),
            "{b:?}"
        );
        // A 5xx without Retry-After does not cool down (the breaker handles those).
        let g = group(
            Strategy::Weighted,
            vec![dep("c", 1.0, None, None)],
            BreakerConfig::default(),
        );
        g.deployments[0].report(
            now,
            Duration::from_millis(5),
            Some((ErrorClass::ServerError, None)),
            None,
        );
        assert_eq!(g.deployments[0].cooling(now), None);
    }

    #[tokio::test]
    async fn health_checks_feed_the_breaker() {
        let breaker = BreakerConfig {
            consecutive_failures: 2,
            cooldown_secs: 0.05,
            ..BreakerConfig::default()
        };
        let healthy = DeploymentState::new(dep("up", 1.0, None, None), breaker.clone());
        assert!(healthy.check_health(Duration::from_secs(1)).await);
        let s = healthy.status("g", Instant::now());
        assert!(
            s.health.as_ref().is_some_and(|h| h.ok && h.checks == 1),
            "{s:?}"
        );
        assert_eq!(s.breaker.state, BreakerState::Closed);

        let mut down = dep("down", 1.0, None, None);
        down.provider = Arc::new(
            Mock::new(&MockConfig {
                fail_status: Some(503),
                ..MockConfig::default()
            })
            .unwrap(),
        );
        let down = DeploymentState::new(down, breaker);
        assert!(down.check_health(Duration::from_secs(1)).await);
        assert!(down.check_health(Duration::from_secs(1)).await);
        let s = down.status("g", Instant::now());
        assert_eq!(
            s.breaker.state,
            BreakerState::Open,
            "two failed checks open it"
        );
        let h = s.health.expect("a health status");
        assert!(!h.ok && h.failures == 2 && h.error.is_some_and(|e| e.contains("503")));
        // While open and cooling down, no check is made.
        assert!(down.check_health(Duration::from_secs(1)).await);
        assert_eq!(down.status("g", Instant::now()).health.unwrap().checks, 2);
        // After the cool-down the check is the half-open probe; it fails, so the breaker reopens.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(down.check_health(Duration::from_secs(1)).await);
        let s = down.status("g", Instant::now());
        assert_eq!(s.health.unwrap().checks, 3);
        assert_eq!(s.breaker.state, BreakerState::Open);
        assert_eq!(s.breaker.opened_times, 2);

        // A check answered 429 (an account-wide rate limit) says the deployment answers, as a
        // request's 429 would: it never opens the breaker, and as the half-open probe it closes
        // it.
        let mut limited = dep("limited", 1.0, None, None);
        limited.provider = Arc::new(
            Mock::new(&MockConfig {
                fail_status: Some(429),
                ..MockConfig::default()
            })
            .unwrap(),
        );
        let limited = DeploymentState::new(
            limited,
            BreakerConfig {
                consecutive_failures: 2,
                cooldown_secs: 0.05,
                ..BreakerConfig::default()
            },
        );
        for _ in 0..3 {
            assert!(limited.check_health(Duration::from_secs(1)).await);
        }
        let s = limited.status("g", Instant::now());
        assert_eq!(s.breaker.state, BreakerState::Closed, "{s:?}");
        let h = s.health.expect("a health status");
        assert!(!h.ok && h.failures == 3 && h.error.is_some_and(|e| e.contains("429")));
        let fail = Some((ErrorClass::ServerError, None));
        limited.report(Instant::now(), Duration::from_millis(5), fail, None);
        limited.report(Instant::now(), Duration::from_millis(5), fail, None);
        assert_eq!(limited.breaker_state(Instant::now()), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(limited.check_health(Duration::from_secs(1)).await);
        assert_eq!(limited.breaker_state(Instant::now()), BreakerState::Closed);
    }

    /// Passing checks between failed requests do not end their run: the check lists models,
    /// which may answer while every request fails (a retired model answering 404).
    #[tokio::test]
    async fn passing_checks_do_not_keep_a_failing_deployment_in_rotation() {
        let up = DeploymentState::new(
            dep("up", 1.0, None, None),
            BreakerConfig {
                consecutive_failures: 3,
                ..BreakerConfig::default()
            },
        );
        let fail = Some((ErrorClass::ServerError, None));
        for _ in 0..3 {
            assert!(up.check_health(Duration::from_secs(1)).await);
            assert_eq!(up.breaker_state(Instant::now()), BreakerState::Closed);
            up.report(Instant::now(), Duration::from_millis(5), fail, None);
        }
        assert_eq!(
            up.breaker_state(Instant::now()),
            BreakerState::Open,
            "three failed requests in a row, checks passing between them"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let g = group(
            Strategy::Weighted,
            vec![dep("a", 1.0, None, None)],
            BreakerConfig::default(),
        );
        for retry in 1..=10 {
            let bound = (100.0 * 2f64.powi(retry as i32 - 1)).min(5000.0);
            let b = g.backoff(retry).as_secs_f64() * 1000.0;
            assert!(
                b >= bound * 0.5 - 1e-6 && b <= bound + 1e-6,
                "retry {retry}: {b} ms vs {bound}"
            );
        }
    }
}
