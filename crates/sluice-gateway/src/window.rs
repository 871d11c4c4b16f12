//! Rolling counters for capacity limits: [`RateWindow`] counts requests or tokens over the last
//! minute in one-second buckets (rpm / tpm), and [`Ewma`] keeps a lock-free moving average of
//! latency.
//!
//! Every time-dependent method takes `now` so that callers (and tests) decide what time it is.
//! Seconds are counted from a base [`Instant`] taken at construction; instants before the base
//! count as second 0, and an instant older than the newest second already seen counts as that
//! newest second (time never runs backwards inside a window).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The span of a [`RateWindow`], in seconds (one bucket per second).
const MINUTE_SECS: usize = 60;

/// A ring of per-second buckets, each holding `K` counters, with running totals.
///
/// Bucket `s` (a second since `base`) lives in slot `s % len` and counts while the newest second
/// seen (`head`) is below `s + len`. Moving `head` forward zeroes the slots it passes and takes
/// their counts off the totals, so that reads and writes cost O(1) amortized.
#[derive(Debug)]
pub(crate) struct Buckets<const K: usize> {
    base: Instant,
    slots: Box<[[u64; K]]>,
    head: u64,
    totals: [u64; K],
}

impl<const K: usize> Buckets<K> {
    /// A ring spanning `len` seconds (at least 1), counting from `base`.
    pub(crate) fn new(len: usize, base: Instant) -> Self {
        Buckets {
            base,
            slots: vec![[0; K]; len.max(1)].into_boxed_slice(),
            head: 0,
            totals: [0; K],
        }
    }

    fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, sec: u64) -> usize {
        // `len() >= 1`, and the remainder is below `slots.len()`, so it fits a usize.
        (sec % self.len()) as usize
    }

    /// Seconds from `base` to `now` (0 for instants before it).
    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.base)
    }

    /// Moves the window to `now`, expiring the buckets that fell out of it. Returns the current
    /// second.
    fn advance(&mut self, now: Instant) -> u64 {
        let sec = self.elapsed(now).as_secs();
        if sec <= self.head {
            return self.head;
        }
        if sec - self.head >= self.len() {
            self.clear();
        } else {
            for s in self.head + 1..=sec {
                let i = self.slot(s);
                let old = std::mem::replace(&mut self.slots[i], [0; K]);
                for (t, o) in self.totals.iter_mut().zip(old) {
                    *t = t.saturating_sub(o);
                }
            }
        }
        self.head = sec;
        sec
    }

    /// The totals over the window ending at `now`.
    pub(crate) fn totals(&mut self, now: Instant) -> [u64; K] {
        self.advance(now);
        self.totals
    }

    /// Adds `v` to counter `k` of the current second, and returns that second.
    pub(crate) fn add(&mut self, now: Instant, k: usize, v: u64) -> u64 {
        let sec = self.advance(now);
        let i = self.slot(sec);
        if let (Some(c), Some(t)) = (self.slots[i].get_mut(k), self.totals.get_mut(k)) {
            *c = c.saturating_add(v);
            *t = t.saturating_add(v);
        }
        sec
    }

    /// Takes up to `v` off counter `k` of second `sec` (as [`add`](Self::add) returned it), if
    /// that second is still in the window at `now`: a count that already expired has nothing
    /// left to take, and other seconds hold other callers' counts.
    pub(crate) fn sub_at(&mut self, now: Instant, sec: u64, k: usize, v: u64) {
        let head = self.advance(now);
        if sec > head || sec.saturating_add(self.len()) <= head {
            return;
        }
        let i = self.slot(sec);
        if let (Some(c), Some(t)) = (self.slots[i].get_mut(k), self.totals.get_mut(k)) {
            let take = (*c).min(v);
            *c -= take;
            *t = t.saturating_sub(take);
        }
    }

    /// How long from `now` until at least `need` of counter `k` has expired, the oldest buckets
    /// going first. `None` when the window does not hold that much.
    pub(crate) fn expiry_of(&mut self, now: Instant, k: usize, need: u64) -> Option<Duration> {
        let head = self.advance(now);
        if need == 0 {
            return Some(Duration::ZERO);
        }
        let len = self.len();
        let oldest = (head + 1).saturating_sub(len);
        let mut freed = 0u64;
        for s in oldest..=head {
            freed = freed.saturating_add(self.slots[self.slot(s)].get(k).copied().unwrap_or(0));
            if freed >= need {
                // Bucket `s` leaves the window when the clock reaches second `s + len`.
                let at = Duration::from_secs(s.saturating_add(len));
                return Some(at.saturating_sub(self.elapsed(now)));
            }
        }
        None
    }

    /// Forgets every count.
    pub(crate) fn clear(&mut self) {
        self.slots.fill([0; K]);
        self.totals = [0; K];
    }
}

/// Where [`RateWindow::charge`] counted an admitted amount: the second it landed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    second: u64,
}

/// Counts events (requests or tokens) over the last 60 seconds in 1-second buckets, against a
/// per-minute limit.
#[derive(Debug)]
pub struct RateWindow {
    /// Changed in place when a reload changes the limit: the counts stay.
    limit: AtomicU64,
    inner: Mutex<Buckets<1>>,
}

impl RateWindow {
    /// A window allowing `limit_per_minute` events per trailing minute.
    pub fn new(limit_per_minute: u64) -> Self {
        Self::with_base(limit_per_minute, Instant::now())
    }

    /// A window counting seconds from `base`.
    pub(crate) fn with_base(limit_per_minute: u64, base: Instant) -> Self {
        RateWindow {
            limit: AtomicU64::new(limit_per_minute),
            inner: Mutex::new(Buckets::new(MINUTE_SECS, base)),
        }
    }

    /// The per-minute limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets a new per-minute limit, keeping what the window has counted (a reload that changes
    /// a limit must not hand out a fresh minute).
    pub fn set_limit(&self, limit_per_minute: u64) {
        self.limit.store(limit_per_minute, Ordering::Relaxed);
    }

    /// The sum over the trailing 60 seconds.
    pub fn used(&self, now: Instant) -> u64 {
        self.inner.lock().totals(now)[0]
    }

    /// Adds `n` if the window then stays within the limit, and says where it went (`None`: it
    /// did not fit). A request larger than the whole limit is admitted when the window is empty,
    /// so that it is never starved forever.
    pub fn charge(&self, now: Instant, n: u64) -> Option<Charge> {
        let mut b = self.inner.lock();
        let used = b.totals(now)[0];
        if used.saturating_add(n) <= self.limit() || used == 0 {
            Some(Charge {
                second: b.add(now, 0, n),
            })
        } else {
            None
        }
    }

    /// Adds `n` whatever the limit, and says where it went.
    pub fn add(&self, now: Instant, n: u64) -> Charge {
        Charge {
            second: self.inner.lock().add(now, 0, n),
        }
    }

    /// [`charge`](Self::charge), saying only whether `n` fitted.
    #[cfg(test)]
    pub(crate) fn try_add(&self, now: Instant, n: u64) -> bool {
        self.charge(now, n).is_some()
    }

    /// Reconciles a charged estimate with the real count: `delta` more than charged counts from
    /// `now`; less is taken off the charge's own second (never below zero), and only while that
    /// second is still in the window. Once it has expired the estimate is no longer counted,
    /// and the counts of other seconds belong to other requests.
    pub fn reconcile(&self, charge: Charge, now: Instant, delta: i64) {
        let mut b = self.inner.lock();
        if delta >= 0 {
            b.add(now, 0, delta.unsigned_abs());
        } else {
            b.sub_at(now, charge.second, 0, delta.unsigned_abs());
        }
    }

    /// How long until [`charge`](Self::charge) of `n` would succeed, if nothing else is added
    /// meanwhile: zero when it would now; otherwise the time until enough old buckets expire.
    /// For `n` above the limit that is the time until the window is empty (see `charge`), at
    /// most 60 s. `None` would mean that no expiry makes room; the window always holds what it
    /// counts, so that does not happen, but callers should treat it as "not within a minute".
    pub fn wait_for(&self, now: Instant, n: u64) -> Option<Duration> {
        let mut b = self.inner.lock();
        let used = b.totals(now)[0];
        let limit = self.limit();
        if used.saturating_add(n) <= limit || used == 0 {
            return Some(Duration::ZERO);
        }
        let need = if n > limit { used } else { used + n - limit };
        b.expiry_of(now, 0, need)
    }
}

/// The smoothing factor of [`Ewma::default`].
pub const DEFAULT_EWMA_ALPHA: f64 = 0.2;

/// An exponentially weighted moving average of latency in milliseconds, lock-free.
#[derive(Debug)]
pub struct Ewma {
    alpha: f64,
    /// The current average as `f64` bits; NaN until the first sample.
    bits: AtomicU64,
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma::new(DEFAULT_EWMA_ALPHA)
    }
}

impl Ewma {
    /// An average where each sample weighs `alpha` (in (0, 1]; anything else means 0.2).
    pub fn new(alpha: f64) -> Self {
        let alpha = if alpha > 0.0 && alpha <= 1.0 {
            alpha
        } else {
            DEFAULT_EWMA_ALPHA
        };
        Ewma {
            alpha,
            bits: AtomicU64::new(f64::NAN.to_bits()),
        }
    }

    /// Adds a sample. The first sample becomes the average; non-finite samples are ignored.
    pub fn observe(&self, ms: f64) {
        if !ms.is_finite() {
            return;
        }
        let alpha = self.alpha;
        // The closure always returns Some, so this never fails.
        let _ = self
            .bits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let old = f64::from_bits(old);
                let new = if old.is_nan() {
                    ms
                } else {
                    old + alpha * (ms - old)
                };
                Some(new.to_bits())
            });
    }

    /// Starts the average afresh at `ms` (ignored when not finite).
    pub fn reset(&self, ms: f64) {
        if ms.is_finite() {
            self.bits.store(ms.to_bits(), Ordering::Release);
        }
    }

    /// The average, or `None` before the first sample.
    pub fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.bits.load(Ordering::Acquire));
        (!v.is_nan()).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// A window and the instant its seconds count from.
    fn window(limit: u64) -> (RateWindow, Instant) {
        let t0 = Instant::now();
        (RateWindow::with_base(limit, t0), t0)
    }

    #[test]
    fn limit_enforced() {
        let (w, t0) = window(10);
        assert_eq!(w.limit(), 10);
        assert!(w.try_add(t0, 4));
        assert!(w.try_add(t0, 6));
        assert_eq!(w.used(t0), 10);
        assert!(!w.try_add(t0, 1));
        assert!(!w.try_add(t0 + secs(30), 1));
        assert_eq!(w.used(t0 + secs(30)), 10);
        assert!(w.try_add(t0 + secs(30), 0));
    }

    #[test]
    fn sliding_expiry_one_second_at_a_time() {
        let (w, t0) = window(100);
        assert!(w.try_add(t0, 10));
        assert!(w.try_add(t0 + secs(1), 20));
        assert!(w.try_add(t0 + secs(30), 30));
        assert_eq!(w.used(t0 + secs(59)), 60);
        // Second 0 leaves at 60 s, second 1 at 61 s, second 30 at 90 s.
        assert_eq!(w.used(t0 + secs(60)), 50);
        assert_eq!(w.used(t0 + secs(61)), 30);
        assert_eq!(w.used(t0 + secs(89)), 30);
        assert_eq!(w.used(t0 + secs(90)), 0);
        // A long gap clears everything at once.
        assert!(w.try_add(t0 + secs(100), 5));
        assert_eq!(w.used(t0 + secs(1000)), 0);
        // An instant older than the newest one seen counts as the newest second.
        assert!(w.try_add(t0, 7));
        assert_eq!(w.used(t0 + secs(1000)), 7);
        assert_eq!(w.used(t0 + secs(1060)), 0);
    }

    #[test]
    fn full_window_frees_up_as_buckets_expire() {
        let (w, t0) = window(3);
        for s in 0..3 {
            assert!(w.try_add(t0 + secs(s), 1));
        }
        assert!(!w.try_add(t0 + secs(59), 1));
        assert!(w.try_add(t0 + secs(60), 1));
        assert!(!w.try_add(t0 + secs(60), 1));
        assert!(w.try_add(t0 + secs(61), 1));
    }

    #[test]
    fn reconcile_up_and_down() {
        let (w, t0) = window(1000);
        let first = w.charge(t0, 100).expect("fits");
        let second = w.charge(t0 + secs(10), 50).expect("fits");
        // More than estimated counts from now (second 20).
        w.reconcile(second, t0 + secs(20), 25);
        assert_eq!(w.used(t0 + secs(20)), 175);
        // Less than estimated comes off the charge's own second, and no other: the 50 at second
        // 10 cannot give 80.
        w.reconcile(second, t0 + secs(20), -80);
        assert_eq!(w.used(t0 + secs(20)), 125);
        assert_eq!(w.used(t0 + secs(59)), 125);
        // Second 0 leaves at 60 s, then the 25 of second 20 are all that is left.
        assert_eq!(w.used(t0 + secs(60)), 25);
        // An estimate that already expired has nothing left to give back: the 25 stay.
        w.reconcile(first, t0 + secs(61), -100);
        assert_eq!(w.used(t0 + secs(61)), 25);
        w.reconcile(first, t0 + secs(61), i64::MIN);
        assert_eq!(w.used(t0 + secs(61)), 25);
        assert_eq!(w.used(t0 + secs(80)), 0);
        // Reconciling up may go past the limit; then nothing fits until it drains.
        let third = w.charge(t0 + secs(81), 10).expect("fits");
        w.reconcile(third, t0 + secs(81), 1200);
        assert_eq!(w.used(t0 + secs(81)), 1210);
        assert!(!w.try_add(t0 + secs(81), 1));
        assert!(w.try_add(t0 + secs(141), 1));
    }

    #[test]
    fn reconcile_keeps_other_requests_counts_in_the_same_second() {
        let (w, t0) = window(1000);
        let a = w.charge(t0, 300).expect("fits");
        let b = w.charge(t0, 200).expect("fits");
        // Each gives back at most its own estimate's worth from the shared second.
        w.reconcile(a, t0 + secs(5), -300);
        assert_eq!(w.used(t0 + secs(5)), 200);
        w.reconcile(b, t0 + secs(5), -150);
        assert_eq!(w.used(t0 + secs(5)), 50);
        // A charge made at an instant older than the newest second seen lands in that second,
        // and is reconciled there.
        assert!(w.try_add(t0 + secs(7), 1));
        let late = w.charge(t0 + secs(6), 40).expect("fits");
        w.reconcile(late, t0 + secs(7), -40);
        assert_eq!(w.used(t0 + secs(7)), 51);
    }

    #[test]
    fn wait_for_reports_when_room_frees_up() {
        let (w, t0) = window(10);
        assert_eq!(w.wait_for(t0, 10), Some(Duration::ZERO));
        assert!(w.try_add(t0, 4));
        assert!(w.try_add(t0 + secs(20), 6));
        let now = t0 + secs(30);
        assert_eq!(w.wait_for(now, 0), Some(Duration::ZERO));
        // 4 must go: second 0 expires at 60 s.
        assert_eq!(w.wait_for(now, 4), Some(secs(30)));
        // 5 must go: seconds 0 and 20 must both expire; the latter at 80 s.
        assert_eq!(w.wait_for(now, 5), Some(secs(50)));
        assert_eq!(w.wait_for(now, 10), Some(secs(50)));
        // The answer is consistent with try_add.
        assert!(!w.try_add(t0 + secs(59), 4));
        assert!(w.try_add(t0 + secs(60), 4));
        assert_eq!(w.wait_for(t0 + secs(60), 1), Some(secs(20)));
    }

    #[test]
    fn wait_for_measures_from_the_instant_given() {
        let (w, t0) = window(1);
        assert!(w.try_add(t0, 1));
        let now = t0 + Duration::from_millis(59_250);
        assert_eq!(w.wait_for(now, 1), Some(Duration::from_millis(750)));
        // Instants before the base count as second 0.
        let early = RateWindow::with_base(1, t0 + secs(5));
        assert!(early.try_add(t0, 1));
        assert_eq!(early.used(t0 + secs(64)), 1);
        assert_eq!(early.used(t0 + secs(65)), 0);
    }

    #[test]
    fn oversized_request_on_empty_window() {
        let (w, t0) = window(10);
        assert_eq!(w.wait_for(t0, 50), Some(Duration::ZERO));
        assert!(w.try_add(t0, 50));
        assert_eq!(w.used(t0), 50);
        assert!(!w.try_add(t0 + secs(1), 1));
        assert!(!w.try_add(t0 + secs(1), 50));
        // An oversized request waits for the window to drain entirely.
        assert_eq!(w.wait_for(t0 + secs(1), 50), Some(secs(59)));
        assert!(w.try_add(t0 + secs(60), 50));
    }

    #[test]
    fn ewma_first_sample_and_convergence() {
        let e = Ewma::new(0.5);
        assert_eq!(e.get(), None);
        e.observe(f64::NAN);
        assert_eq!(e.get(), None);
        e.observe(100.0);
        assert_eq!(e.get(), Some(100.0));
        e.observe(200.0);
        assert_eq!(e.get(), Some(150.0));
        for _ in 0..100 {
            e.observe(40.0);
        }
        let v = e.get().unwrap_or_default();
        assert!((v - 40.0).abs() < 1e-9, "{v}");

        let d = Ewma::default();
        d.observe(10.0);
        d.observe(20.0);
        assert_eq!(d.get(), Some(12.0));
        // An alpha out of range falls back to the default.
        let bad = Ewma::new(0.0);
        bad.observe(10.0);
        bad.observe(20.0);
        assert_eq!(bad.get(), Some(12.0));
    }

    #[test]
    fn ewma_is_shared_across_threads() {
        let e = std::sync::Arc::new(Ewma::new(0.1));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        e.observe(5.0);
                    }
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().is_ok());
        }
        assert_eq!(e.get(), Some(5.0));
    }
}
