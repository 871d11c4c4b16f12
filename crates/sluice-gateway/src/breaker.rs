//! A per-deployment circuit breaker.
//!
//! Closed, the breaker counts attempt outcomes over a rolling window of one-second buckets and
//! opens when the error rate reaches its threshold (once enough outcomes are in the window) or
//! after a run of consecutive failures. Open, it rejects every request until its cooldown has
//! passed; then it is half-open and lets a few trial requests ("probes") through: enough
//! successful probes close it with a fresh window, a failed probe opens it again. Each probe
//! holds a slot named by its [`Probe`] ticket: a call that taught nothing gives it back at once,
//! one whose outcome has not come after the cooldown frees its slot for another probe (so the
//! breaker cannot get stuck half-open). Its answer still counts if it comes while the breaker is
//! half-open in the same period (a deployment slower than the cooldown can still close it); one
//! that comes after the breaker reopened says nothing about the deployment now.
//!
//! Every time-dependent method takes `now`; each call holds one short mutex section.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::window::Buckets;

/// The longest rolling window, in seconds.
pub const MAX_WINDOW_SECS: u64 = 600;
/// The longest cooldown, in seconds (a day).
pub const MAX_COOLDOWN_SECS: f64 = 86_400.0;
/// The most concurrent half-open probes.
pub const MAX_HALF_OPEN_PROBES: u32 = 10_000;
/// The most probes whose slot expired that a half-open breaker still waits to hear from.
const MAX_EXPIRED_PROBES: usize = 64;

fn default_enabled() -> bool {
    true
}
fn default_window_secs() -> u64 {
    30
}
fn default_min_requests() -> u32 {
    10
}
fn default_error_rate() -> f64 {
    0.5
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_cooldown_secs() -> f64 {
    15.0
}
fn default_half_open_probes() -> u32 {
    1
}
fn default_half_open_successes() -> u32 {
    1
}

/// `[models.NAME.circuit_breaker]` (also usable as a global default).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Whether the breaker ever rejects (default true).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The rolling window outcomes are counted over, in seconds (default 30, at most 600).
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// The breaker does not open on the error rate with fewer outcomes than this in the window
    /// (default 10).
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Opens when failures / outcomes in the window reach this (default 0.5).
    #[serde(default = "default_error_rate")]
    pub error_rate: f64,
    /// Also opens after this many failures in a row (default 5; 0 turns it off).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long it stays open before letting probes through, in seconds (default 15).
    #[serde(default = "default_cooldown_secs")]
    pub cooldown_secs: f64,
    /// Trial requests allowed at once while half-open (default 1).
    #[serde(default = "default_half_open_probes")]
    pub half_open_probes: u32,
    /// Successful probes needed to close (default 1).
    #[serde(default = "default_half_open_successes")]
    pub half_open_successes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: default_enabled(),
            window_secs: default_window_secs(),
            min_requests: default_min_requests(),
            error_rate: default_error_rate(),
            consecutive_failures: default_consecutive_failures(),
            cooldown_secs: default_cooldown_secs(),
            half_open_probes: default_half_open_probes(),
            half_open_successes: default_half_open_successes(),
        }
    }
}

impl BreakerConfig {
    /// Checks the values; the message names the offending key (relative to the table).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            return Err(format!(
                "window_secs: must be between 1 and {MAX_WINDOW_SECS}, got {}",
                self.window_secs
            ));
        }
        if !(self.error_rate > 0.0 && self.error_rate <= 1.0) {
            return Err(format!(
                "error_rate: must be in (0, 1], got {}",
                self.error_rate
            ));
        }
        if !(self.cooldown_secs > 0.0 && self.cooldown_secs <= MAX_COOLDOWN_SECS) {
            return Err(format!(
                "cooldown_secs: must be in (0, {MAX_COOLDOWN_SECS}], got {}",
                self.cooldown_secs
            ));
        }
        if !(1..=MAX_HALF_OPEN_PROBES).contains(&self.half_open_probes) {
            return Err(format!(
                "half_open_probes: must be between 1 and {MAX_HALF_OPEN_PROBES}, got {}",
                self.half_open_probes
            ));
        }
        if self.half_open_successes == 0 {
            return Err("half_open_successes: must be at least 1, got 0".to_string());
        }
        Ok(())
    }

    /// The cooldown as a duration (the default for a value that is not a valid one).
    fn cooldown(&self) -> Duration {
        let fallback = Duration::from_secs(15);
        if self.cooldown_secs > 0.0 && self.cooldown_secs <= MAX_COOLDOWN_SECS {
            Duration::try_from_secs_f64(self.cooldown_secs).unwrap_or(fallback)
        } else {
            fallback
        }
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests are rejected until the cooldown ends.
    Open,
    /// A few trial requests are let through.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the state gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Breaker::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The request may go (the breaker is closed or disabled).
    Allowed,
    /// The request may go as a half-open trial; report its outcome with the ticket.
    Probe(Probe),
    /// The breaker is open (or its probe slots are taken): try another deployment.
    Rejected,
}

impl Admission {
    /// Whether the request may go.
    pub fn is_admitted(self) -> bool {
        !matches!(self, Admission::Rejected)
    }

    /// The probe ticket, for a half-open trial.
    pub fn probe(self) -> Option<Probe> {
        match self {
            Admission::Probe(p) => Some(p),
            _ => None,
        }
    }
}

/// A half-open trial's ticket: the number of its slot, unique for the breaker's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    id: u64,
}

/// A breaker's counters, for the admin API and logs.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    /// Outcomes in the rolling window.
    pub window_requests: u64,
    /// Failures in the rolling window.
    pub window_failures: u64,
    /// `window_failures / window_requests` (0 with no requests).
    pub error_rate: f64,
    /// Failures in a row, up to the last success.
    pub consecutive_failures: u32,
    /// How many times the breaker has opened.
    pub opened_times: u64,
    /// Seconds until half-open, when open.
    pub retry_in_secs: Option<f64>,
}

/// Bucket counters.
const SUCCESSES: usize = 0;
const FAILURES: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open { since: Instant },
    HalfOpen,
}

#[derive(Debug)]
struct Inner {
    window: Buckets<2>,
    phase: Phase,
    consecutive: u32,
    opened_times: u64,
    /// Each probe in flight (half-open only): its ticket number and when it was admitted.
    probes: Vec<(u64, Instant)>,
    /// Probes of this half-open period whose slot expired before they answered (the newest
    /// [`MAX_EXPIRED_PROBES`]): their answer still counts.
    expired: Vec<u64>,
    /// Successful probes since the breaker went half-open.
    probe_successes: u32,
    /// The next probe's ticket number.
    next_probe: u64,
}

impl Inner {
    /// Open past its cooldown becomes half-open.
    fn refresh(&mut self, now: Instant, cooldown: Duration) {
        if let Phase::Open { since } = self.phase
            && now.saturating_duration_since(since) >= cooldown
        {
            self.phase = Phase::HalfOpen;
            self.probes.clear();
            self.expired.clear();
            self.probe_successes = 0;
        }
    }

    /// Frees the slot of probe `p`; whether it was a probe of this half-open period not given
    /// back or reported already (its slot held, or expired while it was still out).
    fn take_slot(&mut self, p: Probe) -> bool {
        if self.phase != Phase::HalfOpen {
            return false;
        }
        if let Some(i) = self.probes.iter().position(|&(id, _)| id == p.id) {
            self.probes.remove(i);
            return true;
        }
        match self.expired.iter().position(|&id| id == p.id) {
            Some(i) => {
                self.expired.remove(i);
                true
            }
            None => false,
        }
    }

    /// Frees the slots held longer than `ttl`; their probes' answers still count.
    fn expire_probes(&mut self, now: Instant, ttl: Duration) {
        let mut i = 0;
        while i < self.probes.len() {
            let (id, at) = self.probes[i];
            if now.saturating_duration_since(at) < ttl {
                i += 1;
                continue;
            }
            self.probes.remove(i);
            if self.expired.len() == MAX_EXPIRED_PROBES {
                self.expired.remove(0);
            }
            self.expired.push(id);
        }
    }

    fn open(&mut self, now: Instant) {
        self.phase = Phase::Open { since: now };
        self.opened_times = self.opened_times.saturating_add(1);
        self.probes.clear();
        self.expired.clear();
        self.probe_successes = 0;
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.window.clear();
        self.consecutive = 0;
        self.probes.clear();
        self.expired.clear();
        self.probe_successes = 0;
    }

    fn state(&self) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

/// A circuit breaker for one deployment.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker. Out-of-range values are clamped so that it always works (`validate` the
    /// config to report them).
    pub fn new(cfg: BreakerConfig) -> Self {
        Self::with_base(cfg, Instant::now())
    }

    /// A closed breaker whose window counts seconds from `base`.
    pub(crate) fn with_base(cfg: BreakerConfig, base: Instant) -> Self {
        let window_secs = cfg.window_secs.clamp(1, MAX_WINDOW_SECS);
        let probes = cfg.half_open_probes.clamp(1, MAX_HALF_OPEN_PROBES);
        Breaker {
            cooldown: cfg.cooldown(),
            inner: Mutex::new(Inner {
                // At most MAX_WINDOW_SECS, so it fits a usize.
                window: Buckets::new(window_secs as usize, base),
                phase: Phase::Closed,
                consecutive: 0,
                opened_times: 0,
                probes: Vec::with_capacity(probes.min(16) as usize),
                expired: Vec::new(),
                probe_successes: 0,
                next_probe: 0,
            }),
            cfg,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    fn max_probes(&self) -> usize {
        self.cfg.half_open_probes.clamp(1, MAX_HALF_OPEN_PROBES) as usize
    }

    /// Whether a request may go to this deployment now. Open past the cooldown becomes half-open;
    /// half-open allows at most `half_open_probes` probes in flight, and a probe whose outcome has
    /// not come after `cooldown_secs` frees its slot (its answer still counts when it comes). A
    /// disabled breaker always allows.
    pub fn admit(&self, now: Instant) -> Admission {
        if !self.cfg.enabled {
            return Admission::Allowed;
        }
        let mut inner = self.inner.lock();
        inner.refresh(now, self.cooldown);
        match inner.phase {
            Phase::Closed => Admission::Allowed,
            Phase::Open { .. } => Admission::Rejected,
            Phase::HalfOpen => {
                inner.expire_probes(now, self.cooldown);
                if inner.probes.len() < self.max_probes() {
                    let id = inner.next_probe;
                    inner.next_probe = id.wrapping_add(1);
                    inner.probes.push((id, now));
                    Admission::Probe(Probe { id })
                } else {
                    Admission::Rejected
                }
            }
        }
    }

    /// Whether [`admit`](Self::admit) would let a request through now, taking nothing: closed,
    /// or half-open with a trial slot free.
    pub fn would_admit(&self, now: Instant) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let mut inner = self.inner.lock();
        inner.refresh(now, self.cooldown);
        match inner.phase {
            Phase::Closed => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen => {
                inner.expire_probes(now, self.cooldown);
                inner.probes.len() < self.max_probes()
            }
        }
    }

    /// Gives back a probe slot that [`admit`](Self::admit) handed out for a call that was not
    /// made (the deployment was at capacity, or has no health check) or taught nothing (the
    /// request was cancelled mid-call), so that the next request can probe at once rather than
    /// after a cool-down.
    pub fn release_probe(&self, p: Probe) {
        self.inner.lock().take_slot(p);
    }

    /// Reports an attempt's outcome: `success` when the deployment answered properly, a failure
    /// for a 5xx, timeout, connect or protocol error (client errors are not reported).
    /// `probe` is the ticket [`admit`](Self::admit) gave it, if it was a trial.
    ///
    /// Outcomes reported while open (late answers to requests sent before it opened) change
    /// nothing; while half-open only this period's probes count, once each.
    pub fn record(&self, now: Instant, success: bool, probe: Option<Probe>) {
        let mut inner = self.inner.lock();
        if !self.cfg.enabled {
            count(&mut inner, now, success);
            return;
        }
        inner.refresh(now, self.cooldown);
        match inner.phase {
            Phase::Open { .. } => {}
            Phase::HalfOpen => {
                if !probe.is_some_and(|p| inner.take_slot(p)) {
                    return;
                }
                if success {
                    inner.consecutive = 0;
                    inner.probe_successes = inner.probe_successes.saturating_add(1);
                    if inner.probe_successes >= self.cfg.half_open_successes {
                        inner.close();
                    }
                } else {
                    inner.consecutive = inner.consecutive.saturating_add(1);
                    inner.open(now);
                }
            }
            Phase::Closed => {
                count(&mut inner, now, success);
                if !success && self.should_open(&mut inner, now) {
                    inner.open(now);
                }
            }
        }
    }

    fn should_open(&self, inner: &mut Inner, now: Instant) -> bool {
        let c = &self.cfg;
        if c.consecutive_failures > 0 && inner.consecutive >= c.consecutive_failures {
            return true;
        }
        let [ok, failed] = inner.window.totals(now);
        let total = ok.saturating_add(failed);
        total > 0
            && total >= u64::from(c.min_requests)
            && failed as f64 / total as f64 >= c.error_rate
    }

    /// The current state. An open breaker past its cooldown shows (and becomes) half-open.
    pub fn state(&self, now: Instant) -> BreakerState {
        if !self.cfg.enabled {
            return BreakerState::Closed;
        }
        let mut inner = self.inner.lock();
        inner.refresh(now, self.cooldown);
        inner.state()
    }

    /// The state and counters.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let mut inner = self.inner.lock();
        let (state, retry_in_secs) = if self.cfg.enabled {
            inner.refresh(now, self.cooldown);
            let retry = match inner.phase {
                Phase::Open { since } => Some(
                    self.cooldown
                        .saturating_sub(now.saturating_duration_since(since))
                        .as_secs_f64(),
                ),
                _ => None,
            };
            (inner.state(), retry)
        } else {
            (BreakerState::Closed, None)
        };
        let [ok, failed] = inner.window.totals(now);
        let total = ok.saturating_add(failed);
        BreakerSnapshot {
            state,
            window_requests: total,
            window_failures: failed,
            error_rate: if total == 0 {
                0.0
            } else {
                failed as f64 / total as f64
            },
            consecutive_failures: inner.consecutive,
            opened_times: inner.opened_times,
            retry_in_secs,
        }
    }
}

/// Counts an outcome in the window and the run of failures.
fn count(inner: &mut Inner, now: Instant, success: bool) {
    if success {
        inner.window.add(now, SUCCESSES, 1);
        inner.consecutive = 0;
    } else {
        inner.window.add(now, FAILURES, 1);
        inner.consecutive = inner.consecutive.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A breaker and the instant its window counts seconds from.
    fn breaker(cfg: BreakerConfig) -> (Breaker, Instant) {
        let t0 = Instant::now();
        (Breaker::with_base(cfg, t0), t0)
    }

    /// Rate-only: consecutive failures off.
    fn rate_cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 0,
            ..BreakerConfig::default()
        }
    }

    /// Admits a probe at `t`, or fails.
    fn probe(b: &Breaker, t: Instant) -> Probe {
        b.admit(t)
            .probe()
            .unwrap_or_else(|| panic!("no probe: {:?}", b.snapshot(t)))
    }

    fn open_it(b: &Breaker, now: Instant) {
        for _ in 0..b.config().consecutive_failures.max(1) {
            b.record(now, false, None);
        }
        assert_eq!(b.state(now), BreakerState::Open);
    }

    #[test]
    fn defaults_and_deserialization() {
        let d = BreakerConfig::default();
        assert!(d.enabled);
        assert_eq!(d.window_secs, 30);
        assert_eq!(d.min_requests, 10);
        assert_eq!(d.error_rate, 0.5);
        assert_eq!(d.consecutive_failures, 5);
        assert_eq!(d.cooldown_secs, 15.0);
        assert_eq!(d.half_open_probes, 1);
        assert_eq!(d.half_open_successes, 1);
        assert_eq!(d.validate(), Ok(()));

        let parsed: Result<BreakerConfig, _> = serde_json::from_str("{}");
        assert_eq!(parsed.ok(), Some(d));
        let parsed: Result<BreakerConfig, _> =
            serde_json::from_str(r#"{"error_rate": 0.25, "enabled": false}"#);
        assert!(matches!(&parsed, Ok(c) if c.error_rate == 0.25 && !c.enabled));
        let unknown: Result<BreakerConfig, _> = serde_json::from_str(r#"{"threshold": 1}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn validate_messages() {
        let bad = |f: fn(&mut BreakerConfig)| {
            let mut c = BreakerConfig::default();
            f(&mut c);
            c.validate().err().unwrap_or_default()
        };
        assert_eq!(
            bad(|c| c.error_rate = 1.5),
            "error_rate: must be in (0, 1], got 1.5"
        );
        assert_eq!(
            bad(|c| c.error_rate = 0.0),
            "error_rate: must be in (0, 1], got 0"
        );
        assert!(bad(|c| c.error_rate = f64::NAN).starts_with("error_rate:"));
        assert_eq!(
            bad(|c| c.window_secs = 0),
            "window_secs: must be between 1 and 600, got 0"
        );
        assert!(bad(|c| c.window_secs = 601).starts_with("window_secs:"));
        assert_eq!(
            bad(|c| c.cooldown_secs = -1.0),
            "cooldown_secs: must be in (0, 86400], got -1"
        );
        assert!(bad(|c| c.cooldown_secs = f64::INFINITY).starts_with("cooldown_secs:"));
        assert_eq!(
            bad(|c| c.half_open_probes = 0),
            "half_open_probes: must be between 1 and 10000, got 0"
        );
        assert_eq!(
            bad(|c| c.half_open_successes = 0),
            "half_open_successes: must be at least 1, got 0"
        );
        let mut ok = BreakerConfig {
            error_rate: 1.0,
            min_requests: 0,
            consecutive_failures: 0,
            window_secs: 600,
            ..BreakerConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        ok.enabled = false;
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn state_names_and_gauge() {
        assert_eq!(BreakerState::Closed.as_str(), "closed");
        assert_eq!(BreakerState::Open.as_str(), "open");
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
        assert_eq!(BreakerState::HalfOpen.to_string(), "half_open");
        assert_eq!(
            [
                BreakerState::Closed,
                BreakerState::Open,
                BreakerState::HalfOpen
            ]
            .map(BreakerState::gauge),
            [0, 1, 2]
        );
        assert_eq!(
            serde_json::to_string(&BreakerState::HalfOpen).unwrap_or_default(),
            r#""half_open""#
        );
    }

    #[test]
    fn stays_closed_under_min_requests() {
        let (b, t0) = breaker(rate_cfg());
        for _ in 0..9 {
            b.record(t0, false, None);
            assert_eq!(b.admit(t0), Admission::Allowed);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        let s = b.snapshot(t0);
        assert_eq!((s.window_requests, s.window_failures), (9, 9));
        assert_eq!(s.error_rate, 1.0);
        assert_eq!(s.opened_times, 0);
        assert_eq!(s.retry_in_secs, None);
    }

    #[test]
    fn opens_at_the_error_rate() {
        let (b, t0) = breaker(rate_cfg());
        for _ in 0..6 {
            b.record(t0, true, None);
        }
        for _ in 0..4 {
            b.record(t0, false, None);
        }
        // 4 / 10 < 0.5.
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.record(t0 + secs(1), false, None);
        // 5 / 11 < 0.5.
        assert_eq!(b.state(t0 + secs(1)), BreakerState::Closed);
        b.record(t0 + secs(1), false, None);
        // 6 / 12 = 0.5.
        assert_eq!(b.state(t0 + secs(1)), BreakerState::Open);
        assert_eq!(b.admit(t0 + secs(1)), Admission::Rejected);
        let s = b.snapshot(t0 + secs(1));
        assert_eq!(s.state, BreakerState::Open);
        assert_eq!((s.window_requests, s.window_failures), (12, 6));
        assert_eq!(s.error_rate, 0.5);
        assert_eq!(s.opened_times, 1);
        assert_eq!(s.retry_in_secs, Some(15.0));
    }

    #[test]
    fn successes_never_open() {
        let (b, t0) = breaker(BreakerConfig {
            min_requests: 0,
            error_rate: 0.01,
            ..BreakerConfig::default()
        });
        for _ in 0..100 {
            b.record(t0, true, None);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.record(t0, false, None);
        // 1 / 101 < 0.01.
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.record(t0, false, None);
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    #[test]
    fn opens_on_consecutive_failures() {
        let (b, t0) = breaker(BreakerConfig {
            min_requests: 1000,
            ..BreakerConfig::default()
        });
        for _ in 0..20 {
            b.record(t0, true, None);
        }
        for _ in 0..4 {
            b.record(t0, false, None);
        }
        b.record(t0, true, None);
        for _ in 0..4 {
            b.record(t0, false, None);
        }
        assert_eq!(b.snapshot(t0).consecutive_failures, 4);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.record(t0, false, None);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.snapshot(t0).consecutive_failures, 5);
    }

    #[test]
    fn rejects_while_open_and_late_outcomes_change_nothing() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        for s in [0, 5, 14] {
            assert_eq!(b.admit(t0 + secs(s)), Admission::Rejected);
        }
        // Late answers from before it opened neither close nor extend it.
        b.record(t0 + secs(10), true, None);
        b.record(t0 + secs(10), false, None);
        b.record(t0 + secs(10), true, Some(Probe { id: 0 }));
        let s = b.snapshot(t0 + secs(10));
        assert_eq!(s.state, BreakerState::Open);
        assert_eq!(s.opened_times, 1);
        assert_eq!(s.retry_in_secs, Some(5.0));
        assert_eq!(s.window_requests, 5);
        assert_eq!(b.state(t0 + secs(15)), BreakerState::HalfOpen);
    }

    #[test]
    fn half_open_admits_exactly_the_probes() {
        let (b, t0) = breaker(BreakerConfig {
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        let t = t0 + secs(15);
        // The read-only view already shows half-open.
        assert_eq!(b.snapshot(t).state, BreakerState::HalfOpen);
        assert_eq!(b.snapshot(t).retry_in_secs, None);
        probe(&b, t);
        probe(&b, t);
        assert_eq!(b.admit(t), Admission::Rejected);
        assert_eq!(b.admit(t + secs(1)), Admission::Rejected);
        // Non-probe outcomes do not count while half-open.
        b.record(t + secs(1), true, None);
        b.record(t + secs(1), false, None);
        assert_eq!(b.state(t + secs(1)), BreakerState::HalfOpen);
        assert_eq!(b.admit(t + secs(1)), Admission::Rejected);
    }

    #[test]
    fn a_probe_slot_given_back_is_free_at_once() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        let t = t0 + secs(15);
        let p = probe(&b, t);
        assert_eq!(b.admit(t), Admission::Rejected);
        b.release_probe(p);
        let again = probe(&b, t);
        assert_ne!(again, p, "tickets are unique, even at the same instant");
        // Giving back twice frees nothing more: `again` keeps its slot.
        b.release_probe(p);
        assert_eq!(b.admit(t), Admission::Rejected);
        b.release_probe(again);
        b.release_probe(again);
        let p = probe(&b, t);
        assert_eq!(b.admit(t), Admission::Rejected);
        // A ticket reported twice counts once.
        b.release_probe(p);
        let (b2, t2) = breaker(BreakerConfig {
            half_open_successes: 2,
            ..BreakerConfig::default()
        });
        open_it(&b2, t2);
        let one = probe(&b2, t2 + secs(15));
        b2.record(t2 + secs(15), true, Some(one));
        b2.record(t2 + secs(15), true, Some(one));
        assert_eq!(b2.state(t2 + secs(15)), BreakerState::HalfOpen);
        let p = probe(&b, t);
        // Giving back while closed changes nothing.
        b.record(t, true, Some(p));
        assert_eq!(b.state(t), BreakerState::Closed);
        b.release_probe(p);
        assert_eq!(b.admit(t), Admission::Allowed);
    }

    #[test]
    fn the_slot_given_back_is_the_probes_own() {
        let (b, t0) = breaker(BreakerConfig {
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        let t = t0 + secs(15);
        let early = probe(&b, t);
        let late = probe(&b, t + secs(10));
        // The early probe is cancelled: its slot is free, the late one's is still held until
        // its own cooldown runs out.
        b.release_probe(early);
        let third = probe(&b, t + secs(20));
        assert_eq!(b.admit(t + secs(20)), Admission::Rejected);
        // Past the early probe's cooldown nothing expires: its slot was already given back.
        assert_eq!(b.admit(t + secs(24)), Admission::Rejected);
        b.record(t + secs(24), true, Some(late));
        b.record(t + secs(24), true, Some(third));
        assert_eq!(b.state(t + secs(24)), BreakerState::Closed);
    }

    #[test]
    fn a_probe_slower_than_the_cooldown_still_closes_it() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        // Every answer takes 40 s, the cooldown is 15 s: each probe's slot expires before it
        // answers and the next request takes it.
        let t = t0 + secs(15);
        let first = probe(&b, t);
        let second = probe(&b, t + secs(16));
        let third = probe(&b, t + secs(32));
        assert_eq!(b.admit(t + secs(33)), Admission::Rejected);
        b.record(t + secs(40), true, Some(first));
        assert_eq!(b.state(t + secs(40)), BreakerState::Closed);
        // The others answer after it closed: ordinary outcomes.
        b.record(t + secs(56), true, Some(second));
        b.record(t + secs(72), true, Some(third));
        assert_eq!(b.snapshot(t + secs(72)).window_requests, 2);

        // A slow probe that fails reopens it; its answer counts once.
        let (b, t0) = breaker(BreakerConfig {
            half_open_successes: 2,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        let t = t0 + secs(15);
        let slow = probe(&b, t);
        let next = probe(&b, t + secs(20));
        b.record(t + secs(30), true, Some(slow));
        b.record(t + secs(30), true, Some(slow));
        assert_eq!(b.state(t + secs(30)), BreakerState::HalfOpen);
        b.record(t + secs(31), true, Some(next));
        assert_eq!(b.state(t + secs(31)), BreakerState::Closed);
    }

    #[test]
    fn a_probe_of_an_earlier_half_open_period_does_not_count() {
        let (b, t0) = breaker(BreakerConfig {
            half_open_successes: 2,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        let t = t0 + secs(15);
        let slow = probe(&b, t);
        // The slow probe's slot expires: its answer would no longer count. A second probe
        // fails and reopens the breaker.
        let second = probe(&b, t + secs(15));
        b.record(t + secs(16), false, Some(second));
        assert_eq!(b.state(t + secs(16)), BreakerState::Open);
        // Half-open again; the slow probe answers now. It says nothing about this period.
        let t2 = t + secs(31);
        let fresh = probe(&b, t2);
        b.record(t2, true, Some(slow));
        b.record(t2, false, Some(slow));
        let s = b.snapshot(t2);
        assert_eq!(s.state, BreakerState::HalfOpen, "{s:?}");
        assert_eq!(s.opened_times, 2);
        // Its slot is not freed either: the fresh probe still holds the only one.
        assert_eq!(b.admit(t2), Admission::Rejected);
        b.record(t2, true, Some(fresh));
        let next = probe(&b, t2);
        b.record(t2, true, Some(next));
        assert_eq!(b.state(t2), BreakerState::Closed);
    }

    #[test]
    fn probe_success_closes_with_a_fresh_window() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        let t = t0 + secs(20);
        let p = probe(&b, t);
        b.record(t, true, Some(p));
        assert_eq!(b.state(t), BreakerState::Closed);
        assert_eq!(b.admit(t), Admission::Allowed);
        let s = b.snapshot(t);
        assert_eq!((s.window_requests, s.window_failures), (0, 0));
        assert_eq!(s.consecutive_failures, 0);
        assert_eq!(s.opened_times, 1);
        // A probe answering after it closed counts as an ordinary outcome.
        b.record(t, false, Some(p));
        assert_eq!(b.snapshot(t).window_failures, 1);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn several_successes_needed_to_close() {
        let (b, t0) = breaker(BreakerConfig {
            half_open_successes: 3,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        let t = t0 + secs(15);
        for i in 0..3 {
            let p = probe(&b, t);
            assert_eq!(b.admit(t), Admission::Rejected);
            b.record(t, true, Some(p));
            let want = if i < 2 {
                BreakerState::HalfOpen
            } else {
                BreakerState::Closed
            };
            assert_eq!(b.state(t), want);
        }
    }

    #[test]
    fn probe_failure_reopens_with_a_fresh_cooldown() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        let t = t0 + secs(15);
        let p = probe(&b, t);
        let failed_at = t + secs(3);
        b.record(failed_at, false, Some(p));
        let s = b.snapshot(failed_at);
        assert_eq!(s.state, BreakerState::Open);
        assert_eq!(s.opened_times, 2);
        assert_eq!(s.retry_in_secs, Some(15.0));
        assert_eq!(b.admit(failed_at + secs(14)), Admission::Rejected);
        let p = probe(&b, failed_at + secs(15));
        b.record(failed_at + secs(16), false, Some(p));
        assert_eq!(b.snapshot(failed_at + secs(16)).opened_times, 3);
    }

    #[test]
    fn lost_probe_frees_its_slot_after_cooldown() {
        let (b, t0) = breaker(BreakerConfig::default());
        open_it(&b, t0);
        let t = t0 + secs(15);
        // This probe's outcome is never reported.
        probe(&b, t);
        assert_eq!(b.admit(t + secs(14)), Admission::Rejected);
        assert_eq!(b.state(t + secs(14)), BreakerState::HalfOpen);
        let p = probe(&b, t + secs(15));
        b.record(t + secs(16), true, Some(p));
        assert_eq!(b.state(t + secs(16)), BreakerState::Closed);
    }

    #[test]
    fn old_failures_expire_from_the_window() {
        let (b, t0) = breaker(rate_cfg());
        for _ in 0..9 {
            b.record(t0, false, None);
        }
        assert_eq!(b.snapshot(t0 + secs(29)).window_failures, 9);
        assert_eq!(b.snapshot(t0 + secs(30)).window_requests, 0);
        // The tenth failure comes after the first nine left the window.
        b.record(t0 + secs(30), false, None);
        assert_eq!(b.state(t0 + secs(30)), BreakerState::Closed);
        // Spread over the window they do count.
        for s in 1..10 {
            b.record(t0 + secs(30 + s), false, None);
        }
        assert_eq!(b.state(t0 + secs(39)), BreakerState::Open);
    }

    #[test]
    fn disabled_never_rejects() {
        let (b, t0) = breaker(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        });
        for _ in 0..100 {
            assert_eq!(b.admit(t0), Admission::Allowed);
            b.record(t0, false, None);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        let s = b.snapshot(t0);
        assert_eq!(s.state, BreakerState::Closed);
        assert_eq!(s.window_failures, 100);
        assert_eq!(s.opened_times, 0);
        assert!(Admission::Allowed.is_admitted());
        assert!(Admission::Probe(Probe { id: 1 }).is_admitted());
        assert!(!Admission::Rejected.is_admitted());
    }

    #[test]
    fn invalid_values_are_clamped() {
        let (b, t0) = breaker(BreakerConfig {
            half_open_probes: 0,
            cooldown_secs: f64::NAN,
            window_secs: 0,
            ..BreakerConfig::default()
        });
        open_it(&b, t0);
        assert_eq!(b.admit(t0 + secs(14)), Admission::Rejected);
        probe(&b, t0 + secs(15));
    }
}
