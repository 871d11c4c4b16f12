//! `[state]`: where state shared by replicas lives. Without `redis_url` every limit, budget
//! ledger and the cache's fast tier are in process (exact for one node); with it, rate limits
//! and budget ledgers are kept in Redis by atomic scripts and the cache's shared tier is Redis,
//! so N replicas enforce one limit and see one cache.
//!
//! When Redis cannot be reached the operator's [`FailurePolicy`] decides: `open` (the default)
//! falls back to the in-process limits and ledgers and logs an error (at most every few
//! seconds, and once more when Redis is back); `closed` answers 503
//! `shared_state_unavailable`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_core::error::{Error, ErrorCode};
use sluice_core::record::StoreError;
use sluice_core::usage::{CacheEntry, CacheStore};

use crate::shared::{RedisState, SharedError};

/// What to do when Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Carry on with in-process limits and ledgers; log loudly.
    #[default]
    Open,
    /// Refuse requests that need shared state with 503.
    Closed,
}

/// `[state]` in sluice.toml.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://HOST:PORT[/DB]` (or `rediss://`); unset: in process.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// `open` (default) or `closed`.
    #[serde(default)]
    pub on_redis_failure: FailurePolicy,
    /// Prefix of every Redis key Sluice writes (several gateways may share one Redis).
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "sluice".into()
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            redis_url: None,
            on_redis_failure: FailurePolicy::Open,
            prefix: default_prefix(),
        }
    }
}

impl StateConfig {
    /// Checks the settings; errors name the key below `state`.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://"))
        {
            return Err(format!(
                "redis_url: `{url}` is not a Redis URL; write redis://HOST:PORT (e.g. redis://127.0.0.1:6379)"
            ));
        }
        if self.prefix.is_empty() || self.prefix.chars().any(char::is_whitespace) {
            return Err("prefix: must be a non-empty word without spaces".into());
        }
        Ok(())
    }
}

/// How often a Redis failure is logged while it lasts.
const WARN_EVERY: Duration = Duration::from_secs(5);
/// After a failure, requests do not wait on Redis again for this long (one call then probes
/// it), so that a Redis that hangs does not add its timeout to every request.
const BACKOFF: Duration = Duration::from_secs(1);

/// The connection to Redis and the policy for when it fails.
pub struct Shared {
    redis: RedisState,
    policy: FailurePolicy,
    down: AtomicBool,
    last_warn: Mutex<Option<Instant>>,
    /// While down: when the next call may try Redis again.
    retry_at: Mutex<Option<Instant>>,
    failures: AtomicU64,
    /// Budget ledgers a cost could not be added to while Redis was unreachable: forgotten (and
    /// so built again from the request log) once it answers.
    stale_ledgers: Mutex<HashSet<String>>,
    has_stale: AtomicBool,
    /// Slots and budget holds whose giving back Redis did not take through an outage longer
    /// than the retries: sent again once it answers, rather than left to lapse after
    /// [`HOLD_MS`](crate::shared::HOLD_MS) while they refuse requests that fit.
    deferred: Mutex<std::collections::VecDeque<Deferred>>,
    has_deferred: AtomicBool,
    sending: AtomicBool,
    /// The cache tier's own backoff: a cache call that failed (a Redis that hangs only for the
    /// cache's calls, with no limit or budget to find it down) makes the next second's cache
    /// calls skip Redis but one, rather than each wait out its timeout.
    cache_down: AtomicBool,
    cache_retry_at: Mutex<Option<Instant>>,
}

/// A giving back that Redis did not take, kept to send again.
#[derive(Debug, Clone)]
pub enum Deferred {
    /// In-flight slots held by `holder` on these subjects.
    Release {
        subjects: Vec<String>,
        holder: String,
    },
    /// A budget hold of `worst` nano-USD by `holder` on these ledgers.
    GiveBack {
        ledgers: Vec<String>,
        holder: String,
        worst: i64,
    },
}

/// The most give-backs kept through an outage (beyond it, the oldest lapse by themselves).
const MAX_DEFERRED: usize = 100_000;

/// How many stale ledgers one Redis call forgets.
const FORGET_AT_ONCE: usize = 500;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("policy", &self.policy)
            .field("down", &self.down.load(Ordering::Relaxed))
            .finish()
    }
}

impl Shared {
    /// Connects to `config.redis_url` (`Ok(None)` when unset). A Redis that is down at start is
    /// not an error under `open`: calls fail over to local state until it is back.
    pub async fn connect(config: &StateConfig) -> Result<Option<Shared>, String> {
        let Some(url) = &config.redis_url else {
            return Ok(None);
        };
        // Lazily: a Redis that is down at start is handled like one that goes down later.
        let redis = RedisState::connect_lazy(url, &config.prefix)
            .map_err(|e| format!("state.redis_url: {e}"))?;
        let shared = Shared {
            redis,
            policy: config.on_redis_failure,
            down: AtomicBool::new(false),
            last_warn: Mutex::new(None),
            retry_at: Mutex::new(None),
            failures: AtomicU64::new(0),
            stale_ledgers: Mutex::new(HashSet::new()),
            has_stale: AtomicBool::new(false),
            deferred: Mutex::new(std::collections::VecDeque::new()),
            has_deferred: AtomicBool::new(false),
            sending: AtomicBool::new(false),
            cache_down: AtomicBool::new(false),
            cache_retry_at: Mutex::new(None),
        };
        if let Err(e) = shared.redis.ping().await {
            if shared.policy == FailurePolicy::Closed {
                tracing::error!(error = %e, "Redis (state.redis_url) is unreachable at start; requests that need it get 503 until it is back");
            }
            shared.failed(&e);
        }
        Ok(Some(shared))
    }

    pub fn redis(&self) -> &RedisState {
        &self.redis
    }

    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    /// Calls that failed on Redis since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether the last call to Redis failed.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Notes budget ledgers that miss a cost (its reconciliation failed): they are forgotten
    /// in Redis, and so built again from the request log, after the next call Redis answers
    /// ([`catch_up`](Self::catch_up)).
    pub fn mark_stale(&self, ledgers: &[String]) {
        if ledgers.is_empty() {
            return;
        }
        let mut stale = self.stale_ledgers.lock();
        for l in ledgers {
            if !stale.contains(l) {
                stale.insert(l.clone());
            }
        }
        self.has_stale.store(true, Ordering::Release);
    }

    /// Takes those of `ledgers` noted by [`mark_stale`](Self::mark_stale).
    pub fn take_stale_of(&self, ledgers: &[String]) -> Vec<String> {
        if !self.has_stale.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut stale = self.stale_ledgers.lock();
        let taken: Vec<String> = ledgers
            .iter()
            .filter(|l| stale.remove(*l))
            .cloned()
            .collect();
        if stale.is_empty() {
            self.has_stale.store(false, Ordering::Release);
        }
        taken
    }

    /// How many ledgers are noted stale.
    pub fn stale_count(&self) -> usize {
        self.stale_ledgers.lock().len()
    }

    /// Keeps a giving back that failed, to send again once Redis answers
    /// ([`catch_up`](Self::catch_up)).
    pub fn defer(&self, d: Deferred) {
        let mut all = self.deferred.lock();
        if all.len() >= MAX_DEFERRED {
            all.pop_front();
        }
        all.push_back(d);
        self.has_deferred.store(true, Ordering::Release);
    }

    /// After a call Redis answered: in the background, forgets the ledgers noted stale (each is
    /// built again from the request log on next use, by every replica) and sends the deferred
    /// give-backs again. What fails again waits for the next call Redis answers. Cheap when
    /// there is nothing to do.
    pub fn catch_up(self: &Arc<Self>) {
        if !self.has_deferred.load(Ordering::Acquire) && !self.has_stale.load(Ordering::Acquire)
            || self.sending.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        let work = async move {
            me.catch_up_now().await;
            me.sending.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(work);
            }
            Err(_) => self.sending.store(false, Ordering::Release),
        }
    }

    /// The work of [`catch_up`](Self::catch_up); says whether everything went through.
    async fn catch_up_now(&self) -> bool {
        self.forget_stale().await && self.send_deferred_now().await
    }

    /// Forgets the stale ledgers in Redis, a slice at a time (a long outage with per-user
    /// budgets can leave very many); a slice Redis did not take, or whose call was abandoned, is
    /// noted stale again. Says whether all went.
    async fn forget_stale(&self) -> bool {
        loop {
            let ledgers: Vec<String> = {
                let mut all = self.stale_ledgers.lock();
                let slice: Vec<String> = all.iter().take(FORGET_AT_ONCE).cloned().collect();
                for l in &slice {
                    all.remove(l);
                }
                if all.is_empty() {
                    self.has_stale.store(false, Ordering::Release);
                }
                slice
            };
            if ledgers.is_empty() {
                return true;
            }
            if self.forget(ledgers).await.is_err() {
                return false;
            }
        }
    }

    /// Forgets `ledgers` (taken from the stale set) in Redis; they are noted stale again if
    /// Redis does not take them, or if the call is abandoned (the request left meanwhile).
    pub(crate) async fn forget(
        &self,
        ledgers: Vec<String>,
    ) -> Result<(), crate::shared::SharedError> {
        struct Taken<'a> {
            shared: &'a Shared,
            ledgers: Vec<String>,
            done: bool,
        }
        impl Drop for Taken<'_> {
            fn drop(&mut self) {
                if !self.done {
                    self.shared.mark_stale(&self.ledgers);
                }
            }
        }
        if ledgers.is_empty() {
            return Ok(());
        }
        let mut taken = Taken {
            shared: self,
            ledgers,
            done: false,
        };
        self.redis.forget_ledgers(&taken.ledgers).await?;
        taken.done = true;
        Ok(())
    }

    /// Sends the deferred give-backs again; those Redis does not take stay deferred. Says
    /// whether all went.
    async fn send_deferred_now(&self) -> bool {
        let todo = {
            let mut all = self.deferred.lock();
            self.has_deferred.store(false, Ordering::Release);
            std::mem::take(&mut *all)
        };
        let mut todo = todo.into_iter();
        while let Some(d) = todo.next() {
            let sent = match &d {
                Deferred::Release { subjects, holder } => {
                    self.redis.release(subjects, holder).await
                }
                Deferred::GiveBack {
                    ledgers,
                    holder,
                    worst,
                } => self.redis.reconcile(ledgers, holder, *worst, 0).await,
            };
            if sent.is_err() {
                // Redis failed again: the rest waits for the next call it answers, rather
                // than each waiting out a timeout now.
                self.defer(d);
                for rest in todo.by_ref() {
                    self.defer(rest);
                }
                return false;
            }
        }
        true
    }

    /// At shutdown: forgets the stale ledgers in Redis, within `patience` (a catch-up already
    /// running finishes first), and logs those left (a replica that stops forgets what it
    /// noted).
    pub async fn catch_up_before_exit(&self, patience: Duration) {
        // A catch-up running in the background finishes first. Each Redis call is bounded, and
        // the work stops at the first that fails.
        let deadline = Instant::now() + patience;
        let mut ours = false;
        while Instant::now() < deadline {
            if !self.sending.swap(true, Ordering::AcqRel) {
                ours = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if ours {
            // Only the ledgers: give-backs left over lapse by themselves (15 minutes), and
            // shutdown must stay within its bound.
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, self.forget_stale()).await;
            self.sending.store(false, Ordering::Release);
        }
        let stale: Vec<String> = {
            let all = self.stale_ledgers.lock();
            let mut some: Vec<String> = all.iter().take(10).cloned().collect();
            some.sort();
            if all.len() > some.len() {
                some.push(format!("and {} more", all.len() - some.len()));
            }
            some
        };
        if !stale.is_empty() {
            tracing::error!(
                ledgers = %stale.join(", "),
                keys = %format!("{}:budget_nusd:LEDGER", self.redis.prefix()),
                "budget ledgers in Redis miss costs settled while it was unreachable, and this replica stops before it could drop them: \
                 until they expire, their budgets may let that much more through; delete those keys in Redis to have them built again from the request log"
            );
        }
    }

    /// Notes a successful call (logs the recovery after a failure).
    pub fn ok(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "Redis (state.redis_url) is reachable again; limits and budgets are shared across replicas again"
            );
        }
    }

    /// While Redis is down and its backoff runs, what to do instead of calling it: `None`
    /// (call it: it is up, or this call probes it), else the failure policy's answer — `Ok`
    /// (use local state) or the 503.
    pub fn bypass(&self, what: &str) -> Option<Result<(), Error>> {
        self.backing_off().then(|| self.verdict(what))
    }

    /// Whether Redis is down and this call should not wait on it (one call per backoff probes).
    fn backing_off(&self) -> bool {
        waits(&self.down, &self.retry_at)
    }

    fn verdict(&self, what: &str) -> Result<(), Error> {
        match self.policy {
            FailurePolicy::Open => Ok(()),
            FailurePolicy::Closed => {
                let mut e = Error::new(
                    ErrorCode::StateUnavailable,
                    format!(
                        "the gateway cannot reach its shared state (Redis) to check {what}, and it is set to fail closed (state.on_redis_failure = \"closed\"); retry shortly"
                    ),
                );
                e.retry_after = Some(Duration::from_secs(1));
                Err(e)
            }
        }
    }

    /// Notes a failed call and logs it (at most every few seconds).
    fn failed(&self, err: &dyn std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.down.store(true, Ordering::Relaxed);
        let now = Instant::now();
        *self.retry_at.lock() = Some(now + BACKOFF);
        let mut last = self.last_warn.lock();
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            match self.policy {
                FailurePolicy::Open => tracing::error!(
                    error = %err,
                    "Redis (state.redis_url) is unreachable: FAILING OPEN — limits and budgets are enforced per replica until it is back"
                ),
                FailurePolicy::Closed => tracing::error!(
                    error = %err,
                    "Redis (state.redis_url) is unreachable: failing closed — requests that need it get 503"
                ),
            }
        }
    }

    /// Handles a failed call: under `open`, `Ok(())` (the caller uses local state); under
    /// `closed`, the 503 to answer.
    pub fn on_failure(&self, what: &str, err: &SharedError) -> Result<(), Error> {
        self.failed(err);
        self.verdict(what)
    }

    /// Notes a cache call that Redis answered (it is up). A failed one is not noted: a slow read
    /// of a large entry, or a write Redis refuses (too large, out of memory), says nothing
    /// about limits and budgets, which must not fall back for it.
    fn noted<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok() {
            self.ok();
            self.cache_down.store(false, Ordering::Relaxed);
        }
        r
    }

    /// A cache read Redis did not answer in time: the cache's calls leave Redis alone for a
    /// [`BACKOFF`] but one (an error Redis answered, such as a write refused at `maxmemory`,
    /// says Redis is there and starts none).
    fn cache_hung(&self) {
        *self.cache_retry_at.lock() = Some(Instant::now() + BACKOFF);
        self.cache_down.store(true, Ordering::Relaxed);
    }

    /// Whether a cache call should leave Redis alone: it is down for limits and budgets, or a
    /// cache call failed less than [`BACKOFF`] ago (one call per backoff probes it).
    fn cache_backing_off(&self) -> bool {
        self.backing_off() || waits(&self.cache_down, &self.cache_retry_at)
    }
}

/// Whether a call should leave Redis alone: it is `down` and its backoff (`retry_at`) runs. One
/// call per backoff probes it: the one that finds the backoff over, which starts another round.
fn waits(down: &AtomicBool, retry_at: &Mutex<Option<Instant>>) -> bool {
    if !down.load(Ordering::Relaxed) {
        return false;
    }
    let now = Instant::now();
    let mut at = retry_at.lock();
    if at.is_none_or(|t| now >= t) {
        *at = Some(now + BACKOFF);
        return false;
    }
    true
}

/// The longest a cache read waits on Redis before it counts as a miss (and a Redis failure).
const CACHE_GET_TIMEOUT: Duration = Duration::from_millis(200);

/// The cache's shared tier in Redis, under the same backoff as limits and budgets: while Redis is
/// down (as their calls found) and its backoff runs, reads are misses and writes are skipped
/// (the answer stays in this replica's memory) without waiting on it, whatever the policy (the
/// cache never refuses a request). A cache call that fails is a miss or a skipped write, and
/// does not mark Redis down for limits and budgets; a read Redis does not answer in time starts
/// the cache's own backoff. Clearing always tries Redis: a clear that did not happen must say
/// so.
#[async_trait]
impl CacheStore for Shared {
    async fn cache_get(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CacheEntry>, StoreError> {
        if self.cache_backing_off() {
            return Ok(None);
        }
        match tokio::time::timeout(CACHE_GET_TIMEOUT, self.redis.cache_get(key, now)).await {
            Ok(r) => self.noted(r),
            Err(_) => {
                self.cache_hung();
                Err(StoreError::Database(format!(
                    "Redis did not answer a cache read within {} ms",
                    CACHE_GET_TIMEOUT.as_millis()
                )))
            }
        }
    }

    async fn cache_put(&self, entry: &CacheEntry) -> Result<(), StoreError> {
        if self.cache_backing_off() {
            return Ok(());
        }
        self.noted(self.redis.cache_put(entry).await)
    }

    async fn cache_purge(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        if self.cache_backing_off() {
            return Ok(0);
        }
        self.noted(self.redis.cache_purge(now).await)
    }

    async fn cache_clear(&self, namespace: Option<&str>) -> Result<u64, StoreError> {
        self.noted(self.redis.cache_clear(namespace).await)
    }

    async fn cache_generation(&self) -> Result<Option<u64>, StoreError> {
        if self.cache_backing_off() {
            return Ok(None);
        }
        self.noted(self.redis.cache_generation().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(policy: FailurePolicy) -> StateConfig {
        // Nothing listens on port 1: every call fails at once.
        StateConfig {
            redis_url: Some("redis://127.0.0.1:1".into()),
            on_redis_failure: policy,
            prefix: "t".into(),
        }
    }

    #[test]
    fn urls_and_prefixes_are_checked() {
        assert!(StateConfig::default().validate().is_ok());
        let mut c = config(FailurePolicy::Open);
        assert!(c.validate().is_ok());
        c.redis_url = Some("localhost:6379".into());
        assert!(c.validate().unwrap_err().contains("redis://HOST:PORT"));
        let c = StateConfig {
            prefix: "a b".into(),
            ..StateConfig::default()
        };
        assert!(c.validate().unwrap_err().starts_with("prefix"));
    }

    #[tokio::test]
    async fn a_down_redis_is_bypassed_with_one_probe_per_backoff() {
        let closed = Shared::connect(&config(FailurePolicy::Closed))
            .await
            .expect("a bad host is not a config error")
            .expect("configured");
        // The ping at start failed: Redis is down.
        assert!(closed.is_down());
        assert!(closed.failures() >= 1);
        // Within the backoff, callers get the policy's answer without waiting on Redis.
        let e = closed.bypass("budgets").expect("bypassed").unwrap_err();
        assert_eq!(e.code, ErrorCode::StateUnavailable);
        assert!(e.message.contains("budgets"), "{}", e.message);
        // After it, one call probes (None), the next ones are bypassed again.
        *closed.retry_at.lock() = Some(Instant::now() - Duration::from_millis(1));
        assert!(closed.bypass("limits").is_none());
        assert!(closed.bypass("limits").is_some());
        // A success ends it.
        closed.ok();
        assert!(!closed.is_down());
        assert!(closed.bypass("limits").is_none());

        let open = Shared::connect(&config(FailurePolicy::Open))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(open.bypass("limits"), Some(Ok(()))));
        let err = open.redis().ping().await.unwrap_err();
        assert!(open.on_failure("limits", &err).is_ok(), "fail open");
    }

    #[tokio::test]
    async fn the_cache_tier_does_not_wait_on_a_down_redis() {
        let s = Shared::connect(&config(FailurePolicy::Closed))
            .await
            .unwrap()
            .unwrap();
        let before = s.failures();
        // Within the backoff a read is a miss without a call, whatever the policy.
        assert!(matches!(s.cache_get("k", Utc::now()).await, Ok(None)));
        assert!(matches!(s.cache_purge(Utc::now()).await, Ok(0)));
        assert_eq!(s.failures(), before);
        // Past it, one read probes Redis: a miss with its error, which does not mark Redis down
        // for limits and budgets (a cache error says nothing about them).
        *s.retry_at.lock() = Some(Instant::now() - Duration::from_millis(1));
        assert!(s.cache_get("k", Utc::now()).await.is_err());
        assert_eq!(s.failures(), before);
        // A clear always tries, and says it failed.
        assert!(s.cache_clear(None).await.is_err());
    }

    /// A Redis that stops answering while only the cache calls it (no limit or budget to find
    /// it down): one read waits out its timeout, the next second's reads are misses at once.
    #[tokio::test]
    async fn a_hanging_redis_delays_one_cache_read_per_backoff() {
        use sluice_testkit::redis::{TempRedis, redis_available};
        if !redis_available() {
            assert_ne!(std::env::var("SLUICE_REQUIRE_REDIS").as_deref(), Ok("1"));
            return;
        }
        let redis = TempRedis::start().expect("redis-server starts");
        let link =
            sluice_testkit::partition::Partition::start(&format!("127.0.0.1:{}", redis.port()))
                .await
                .unwrap();
        let s = Shared::connect(&StateConfig {
            redis_url: Some(format!("redis://{}", link.addr())),
            ..StateConfig::default()
        })
        .await
        .unwrap()
        .unwrap();
        assert!(matches!(s.cache_get("k", Utc::now()).await, Ok(None)));
        link.mute();
        let started = Instant::now();
        for _ in 0..20 {
            let _ = s.cache_get("k", Utc::now()).await;
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(900),
            "20 reads took {took:?} (each waited on Redis)"
        );
        assert!(!s.is_down(), "limits and budgets still use Redis");
    }
}
