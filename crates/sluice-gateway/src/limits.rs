//! Rate limits, in process: requests per minute, tokens per minute (estimated before the call,
//! replaced by the real count after it) and requests in flight — per virtual key, per user, per
//! model and global. A request over any limit is answered 429 `rate_limit_exceeded` with
//! `Retry-After`, and what it took from the limits it passed is given back; answers carry
//! OpenAI's `x-ratelimit-*` headers for the most specific limit that applies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use sluice_core::error::{Error, ErrorCode};
use sluice_core::keys::VirtualKey;

use crate::window::{Charge, RateWindow};

type Signature = (Option<u64>, Option<u64>, Option<u32>);

/// One set of limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub max_parallel: Option<u32>,
}

impl LimitSpec {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_parallel.is_none()
    }

    fn signature(&self) -> Signature {
        (self.rpm, self.tpm, self.max_parallel)
    }

    fn validate(&self, key: &str) -> Result<(), String> {
        if self.rpm == Some(0) || self.tpm == Some(0) || self.max_parallel == Some(0) {
            return Err(format!(
                "{key}: a limit must be at least 1 (leave it out for none)"
            ));
        }
        Ok(())
    }
}

/// `[limits]`: limits beyond each key's own.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Over every request.
    #[serde(default)]
    pub global: LimitSpec,
    /// For each user separately (the user of the request: header, body or key owner).
    #[serde(default)]
    pub per_user: LimitSpec,
    /// Per model name (as clients ask for it).
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, LimitSpec>,
}

impl LimitsConfig {
    /// Checks the settings; errors name the key below `limits`.
    pub fn validate(&self) -> Result<(), String> {
        self.global.validate("global")?;
        self.per_user.validate("per_user")?;
        for (m, spec) in &self.models {
            spec.validate(&format!("models.{m}"))?;
        }
        Ok(())
    }
}

/// One limit that applies to a request: who it counts for, how to name it, and the limits.
#[derive(Debug, Clone)]
pub struct Subject {
    /// `key:ID`, `user:NAME`, `model:NAME` or `global`.
    pub id: String,
    /// For messages: "this API key (`svc`)", "user `alice`", …
    pub label: String,
    pub spec: LimitSpec,
}

/// The windows and the in-flight count go over to the limiter that replaces this one when the
/// limits change (a reload, an edited key): what was counted still counts under the new limits.
struct KeyLimiter {
    rpm: Option<Arc<RateWindow>>,
    tpm: Option<Arc<RateWindow>>,
    max_parallel: Option<u32>,
    /// Counted whether or not a max_parallel applies, so that one set later starts right.
    in_flight: Arc<AtomicU32>,
}

impl KeyLimiter {
    fn signature(&self) -> Signature {
        (
            self.rpm.as_ref().map(|w| w.limit()),
            self.tpm.as_ref().map(|w| w.limit()),
            self.max_parallel,
        )
    }

    /// A limiter for `spec` that keeps what `old` (the same subject's, under other limits) has
    /// counted.
    fn new(spec: &LimitSpec, old: Option<&KeyLimiter>) -> KeyLimiter {
        let window = |old: Option<&Arc<RateWindow>>, limit: Option<u64>| {
            limit.map(|l| match old {
                Some(w) => {
                    w.set_limit(l);
                    w.clone()
                }
                None => Arc::new(RateWindow::new(l)),
            })
        };
        KeyLimiter {
            rpm: window(old.and_then(|o| o.rpm.as_ref()), spec.rpm),
            tpm: window(old.and_then(|o| o.tpm.as_ref()), spec.tpm),
            max_parallel: spec.max_parallel,
            in_flight: old.map_or_else(Arc::default, |o| o.in_flight.clone()),
        }
    }
}

/// The limiters of every key seen, by key id.
#[derive(Default)]
pub struct KeyLimits {
    limiters: RwLock<HashMap<String, Arc<KeyLimiter>>>,
    /// Held while a request is admitted: a request refused by its second limit gives back what
    /// its first took, and no other admission may see that charge meanwhile (it would be refused
    /// by a limit with room), as Redis's one-script admission sees none.
    admitting: parking_lot::Mutex<()>,
    /// The number of limiters at which idle ones are swept out next (ids come from clients, as
    /// `user` values, so the map must not grow without bound).
    sweep_at: std::sync::atomic::AtomicUsize,
}

/// The fewest limiters kept before idle ones are swept out.
const SWEEP_MIN: usize = 1024;

impl std::fmt::Debug for KeyLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimits")
            .field("keys", &self.limiters.read().len())
            .finish()
    }
}

/// A request let through: holds its in-flight slot and token estimate until dropped or settled.
pub struct Admitted {
    limiter: Arc<KeyLimiter>,
    /// Where the request and its token estimate were counted.
    rpm: Option<Charge>,
    tpm: Option<Charge>,
    reserved: u64,
    /// `x-ratelimit-*` headers for the response.
    pub headers: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl Admitted {
    /// Gives back what the admission took (the request was refused by another limit, or by a
    /// budget).
    pub fn cancel(mut self) {
        let now = Instant::now();
        if let (Some(w), Some(c)) = (&self.limiter.rpm, self.rpm.take()) {
            w.reconcile(c, now, -1);
        }
        if let (Some(w), Some(c)) = (&self.limiter.tpm, self.tpm.take()) {
            w.reconcile(c, now, -i64::try_from(self.reserved).unwrap_or(i64::MAX));
        }
        self.reserved = 0;
    }

    /// Replaces the token estimate with the real count (once: later calls change nothing).
    pub fn settle(&mut self, actual: u64) {
        let Some(w) = &self.limiter.tpm else { return };
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(self.reserved).unwrap_or(i64::MAX);
        if let Some(c) = self.tpm.take() {
            if delta != 0 {
                w.reconcile(c, Instant::now(), delta);
            }
            self.reserved = actual;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// OpenAI's reset format: `1s`, `250ms`, `6m0s`.
fn reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", (ms as f64 / 1000.0 * 1000.0).round() / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn limited(message: String, wait: Option<Duration>, headers: Vec<(&'static str, String)>) -> Error {
    let mut e = Error::new(ErrorCode::RateLimited, message);
    e.retry_after = Some(Duration::from_secs(
        wait.map_or(1.0, |d| d.as_secs_f64().ceil().max(1.0)) as u64,
    ));
    e.headers = headers;
    e
}

/// The refusal of `subject` by its `kind` limit.
fn refusal(
    subject: &Subject,
    kind: crate::shared::LimitKind,
    limit: u64,
    tokens: u64,
    wait: Option<Duration>,
    headers: Vec<(&'static str, String)>,
) -> Error {
    use crate::shared::LimitKind;
    let label = &subject.label;
    let message = match kind {
        LimitKind::Parallel => format!(
            "{label} already has {limit} requests in flight, its max_parallel; retry when one finishes"
        ),
        LimitKind::Rpm => format!("{label} is at its limit of {limit} requests per minute"),
        LimitKind::Tpm => format!(
            "{label} is at its limit of {limit} tokens per minute (this request is estimated at {tokens})"
        ),
    };
    limited(message, wait, headers)
}

/// The refusal of a request estimated at more tokens than `subject`'s whole tokens-per-minute
/// limit (OpenAI's "request too large"): no wait makes room for it, so no `Retry-After`, and
/// `x-should-retry: false` keeps the SDKs from retrying it.
pub fn too_large(subject: &Subject, tokens: u64) -> Error {
    let limit = subject.spec.tpm.unwrap_or_default();
    let mut e = Error::new(
        ErrorCode::RateLimited,
        format!(
            "request too large for {}: estimated at {tokens} tokens (prompt plus max_tokens), over its whole limit of {limit} tokens per minute; shorten the prompt or lower max_tokens",
            subject.label
        ),
    );
    e.headers.push(("x-should-retry", "false".into()));
    e
}

/// `x-ratelimit-*` headers from a window's state as Redis reported it.
fn shared_headers(w: &crate::shared::WindowState) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    for (u, names) in [
        (
            w.rpm,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        ),
        (
            w.tpm,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
    ] {
        if let Some(u) = u {
            h.push((names[0], u.limit.to_string()));
            h.push((names[1], u.remaining().to_string()));
            h.push((names[2], reset(Duration::from_millis(u.reset_ms))));
        }
    }
    h
}

/// A request let through the limits kept in Redis: its token estimate is settled and its
/// in-flight slots released when its record closes (before its answer ends, unless Redis is
/// slow to take them).
pub struct SharedAdmission {
    shared: Arc<crate::state::Shared>,
    /// Subjects with a requests-per-minute limit.
    rpm: Vec<String>,
    /// Subjects with a tokens-per-minute limit.
    tpm: Vec<String>,
    /// Subjects with a max_parallel limit.
    parallel: Vec<String>,
    /// The id of the request's in-flight slots in Redis.
    holder: String,
    second: i64,
    reserved: u64,
}

impl std::fmt::Debug for SharedAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAdmission")
            .field("reserved", &self.reserved)
            .finish()
    }
}

fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(work);
    }
}

impl SharedAdmission {
    /// Gives back the request and tokens the admission counted (the request was refused by a
    /// budget), in a task whose handle is returned (to wait on a moment); its in-flight slots
    /// go when it is dropped.
    pub fn cancel(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let (shared, second) = (self.shared.clone(), self.second);
        let rpm = std::mem::take(&mut self.rpm);
        let tpm = if self.reserved > 0 {
            self.tpm.clone()
        } else {
            Vec::new()
        };
        let tokens = i64::try_from(std::mem::take(&mut self.reserved)).unwrap_or(i64::MAX);
        if rpm.is_empty() && tpm.is_empty() {
            return None;
        }
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(async move {
            // Taken from the second charged only, as a token settlement's are.
            let redis = shared.redis();
            let done = async {
                redis.give_back_request(&rpm, second).await?;
                redis.settle(&tpm, second, -tokens).await
            };
            if let Err(e) = done.await {
                let _ = shared.on_failure("rate limits", &e);
            }
        }))
    }

    /// Replaces the token estimate with the real count.
    pub fn settle(&mut self, actual: u64) {
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(self.reserved).unwrap_or(i64::MAX);
        self.reserved = actual;
        if delta == 0 || self.tpm.is_empty() {
            return;
        }
        let (shared, ids, second) = (self.shared.clone(), self.tpm.clone(), self.second);
        spawn(async move {
            if let Err(e) = shared.redis().settle(&ids, second, delta).await {
                let _ = shared.on_failure("rate limits", &e);
            }
        });
    }
}

impl SharedAdmission {
    /// Gives back the in-flight slots, waiting up to `wait` for Redis to take them; past that
    /// the release goes on in the background (as when the admission is dropped).
    pub async fn release_within(mut self, wait: std::time::Duration) {
        if let Some(release) = self.release() {
            let _ = tokio::time::timeout(wait, release).await;
        }
    }

    /// Starts giving back the in-flight slots (once); the task's handle.
    fn release(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        if self.parallel.is_empty() {
            return None;
        }
        let (shared, ids) = (self.shared.clone(), std::mem::take(&mut self.parallel));
        let holder = std::mem::take(&mut self.holder);
        let handle = tokio::runtime::Handle::try_current().ok()?;
        Some(handle.spawn(async move {
            // Retried through a Redis blip: a slot left held would refuse the subject's next
            // requests until it lapses (`shared::HOLD_MS`).
            let redis = shared.redis().clone();
            if let Err(e) = crate::shared::with_retries(|| redis.release(&ids, &holder)).await {
                let _ = shared.on_failure("rate limits", &e);
                shared.defer(crate::state::Deferred::Release {
                    subjects: ids,
                    holder,
                });
            }
        }))
    }
}

impl Drop for SharedAdmission {
    fn drop(&mut self) {
        self.release();
    }
}

/// Lets a request through every limit in `subjects` as kept in Redis: all are charged in one
/// atomic script, or none. The outer `Err` is a Redis failure (the caller applies the failure
/// policy); the inner one a refusal.
pub async fn admit_shared(
    shared: &Arc<crate::state::Shared>,
    subjects: &[Subject],
    tokens: u64,
) -> Result<Result<(SharedAdmission, Vec<(&'static str, String)>), Error>, crate::shared::SharedError>
{
    use crate::shared::SharedAdmit;
    let specs: Vec<(String, LimitSpec)> = subjects.iter().map(|s| (s.id.clone(), s.spec)).collect();
    let first_window = |windows: &[crate::shared::WindowState]| {
        windows
            .iter()
            .map(shared_headers)
            .find(|h| !h.is_empty())
            .unwrap_or_default()
    };
    let answer = shared.redis().admit(&specs, tokens).await?;
    shared.catch_up();
    match answer {
        SharedAdmit::Admitted {
            second,
            windows,
            holder,
        } => {
            shared.ok();
            let headers = first_window(&windows);
            let ids = |f: fn(&LimitSpec) -> bool| {
                subjects
                    .iter()
                    .filter(|s| f(&s.spec))
                    .map(|s| s.id.clone())
                    .collect::<Vec<_>>()
            };
            Ok(Ok((
                SharedAdmission {
                    shared: shared.clone(),
                    rpm: ids(|s| s.rpm.is_some()),
                    tpm: ids(|s| s.tpm.is_some()),
                    parallel: ids(|s| s.max_parallel.is_some()),
                    holder,
                    second,
                    reserved: if subjects.iter().any(|s| s.spec.tpm.is_some()) {
                        tokens
                    } else {
                        0
                    },
                },
                headers,
            )))
        }
        SharedAdmit::Refused {
            index,
            kind,
            limit,
            retry_after_ms,
            windows,
        } => {
            shared.ok();
            let subject = &subjects[index.min(subjects.len() - 1)];
            let headers = windows.get(index).map(shared_headers).unwrap_or_default();
            Ok(Err(refusal(
                subject,
                kind,
                limit,
                tokens,
                retry_after_ms.map(Duration::from_millis),
                headers,
            )))
        }
    }
}

/// Drops the limiters that hold nothing: no request in flight or admitted, and empty windows.
/// One that comes back later starts afresh, exactly where the dropped one stood.
fn sweep(all: &mut HashMap<String, Arc<KeyLimiter>>, now: Instant) {
    all.retain(|_, l| {
        Arc::strong_count(l) > 1
            || l.in_flight.load(Ordering::Relaxed) > 0
            || l.rpm.as_ref().is_some_and(|w| w.used(now) > 0)
            || l.tpm.as_ref().is_some_and(|w| w.used(now) > 0)
    });
}

impl KeyLimits {
    /// How many limiters are kept now.
    pub fn len(&self) -> usize {
        self.limiters.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn limiter(&self, id: &str, spec: &LimitSpec) -> Arc<KeyLimiter> {
        let signature = spec.signature();
        if let Some(l) = self.limiters.read().get(id)
            && l.signature() == signature
        {
            return l.clone();
        }
        let mut all = self.limiters.write();
        if all.len() >= self.sweep_at.load(Ordering::Relaxed) {
            sweep(&mut all, Instant::now());
            self.sweep_at
                .store((all.len() * 2).max(SWEEP_MIN), Ordering::Relaxed);
        }
        match all.get(id) {
            // Another request made it first with the same limits: share it.
            Some(l) if l.signature() == signature => l.clone(),
            old => {
                let fresh = Arc::new(KeyLimiter::new(spec, old.map(|o| &**o)));
                all.insert(id.to_string(), fresh.clone());
                fresh
            }
        }
    }

    /// The subject of a virtual key's own limits.
    pub fn key_subject(key: &VirtualKey) -> Subject {
        Subject {
            id: format!("key:{}", key.id),
            label: format!("this API key (`{}`)", key.name),
            spec: LimitSpec {
                rpm: key.rpm,
                tpm: key.tpm,
                max_parallel: key.max_parallel,
            },
        }
    }

    /// Lets a request through every limit in `subjects` (most specific first), or refuses it
    /// and gives back what the limits it passed took.
    pub fn admit_all(&self, subjects: &[Subject], tokens: u64) -> Result<Vec<Admitted>, Error> {
        let mut held: Vec<Admitted> = Vec::with_capacity(subjects.len());
        let subjects: Vec<&Subject> = subjects.iter().filter(|s| !s.spec.is_empty()).collect();
        if subjects.is_empty() {
            return Ok(held);
        }
        let _admitting = self.admitting.lock();
        for (i, s) in subjects.iter().enumerate() {
            match self.admit_one(s, tokens) {
                Ok(a) => held.push(a),
                Err(mut e) => {
                    for a in held {
                        a.cancel();
                    }
                    // `Retry-After` says when the request can pass: the longest wait of any
                    // limit without room (the refusing subject's other window included), not
                    // only the first one's.
                    let now = Instant::now();
                    for rest in &subjects[i..] {
                        if let Some(wait) = self.wait_of(rest, tokens, now) {
                            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                            if e.retry_after.is_some_and(|r| r.as_secs() < secs) {
                                e.retry_after = Some(Duration::from_secs(secs));
                            }
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(held)
    }

    /// How long until `subject`'s windows have room for a request of `tokens`, taking nothing.
    fn wait_of(&self, subject: &Subject, tokens: u64, now: Instant) -> Option<Duration> {
        let l = self.limiter(&subject.id, &subject.spec);
        let rpm = l.rpm.as_ref().and_then(|w| w.wait_for(now, 1));
        let tpm = l
            .tpm
            .as_ref()
            .filter(|_| tokens > 0)
            .and_then(|w| w.wait_for(now, tokens));
        rpm.into_iter().chain(tpm).max()
    }

    /// Lets a request of `tokens` (estimated) through `key`'s limits, or says when to retry.
    pub fn admit(&self, key: &VirtualKey, tokens: u64) -> Result<Admitted, Error> {
        let _admitting = self.admitting.lock();
        self.admit_one(&Self::key_subject(key), tokens)
    }

    fn admit_one(&self, subject: &Subject, tokens: u64) -> Result<Admitted, Error> {
        use crate::shared::LimitKind;
        let l = self.limiter(&subject.id, &subject.spec);
        let now = Instant::now();
        let before = l.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = l.max_parallel
            && before >= max
        {
            l.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(refusal(
                subject,
                LimitKind::Parallel,
                u64::from(max),
                tokens,
                None,
                Self::headers(&l, now),
            ));
        }
        // From here on, dropping `admitted` releases the in-flight slot.
        let mut admitted = Admitted {
            limiter: l.clone(),
            rpm: None,
            tpm: None,
            reserved: 0,
            headers: Vec::new(),
        };
        if let Some(w) = &l.rpm {
            admitted.rpm = w.charge(now, 1);
            if admitted.rpm.is_none() {
                let wait = w.wait_for(now, 1);
                let headers = Self::headers(&l, now);
                return Err(refusal(
                    subject,
                    LimitKind::Rpm,
                    w.limit(),
                    tokens,
                    wait,
                    headers,
                ));
            }
        }
        if let Some(w) = &l.tpm {
            if tokens == 0 {
                // Nothing to hold back: the real count is added when the request settles.
                admitted.tpm = Some(w.add(now, 0));
            } else if let Some(c) = w.charge(now, tokens) {
                admitted.tpm = Some(c);
                admitted.reserved = tokens;
            } else {
                if let (Some(r), Some(c)) = (&l.rpm, admitted.rpm.take()) {
                    r.reconcile(c, now, -1);
                }
                let wait = w.wait_for(now, tokens);
                let headers = Self::headers(&l, now);
                return Err(refusal(
                    subject,
                    LimitKind::Tpm,
                    w.limit(),
                    tokens,
                    wait,
                    headers,
                ));
            }
        }
        admitted.headers = Self::headers(&l, now);
        Ok(admitted)
    }

    fn headers(l: &KeyLimiter, now: Instant) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        for (w, names) in [
            (
                &l.rpm,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                &l.tpm,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ] {
            if let Some(w) = w {
                let used = w.used(now);
                h.push((names[0], w.limit().to_string()));
                h.push((names[1], w.limit().saturating_sub(used).to_string()));
                // When the oldest use in the window expires: a full slot again.
                h.push((
                    names[2],
                    reset(w.wait_for(now, w.limit()).unwrap_or_default()),
                ));
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A subject named `id` with these limits.
    fn subject(id: &str, spec: LimitSpec) -> Subject {
        Subject {
            id: id.into(),
            label: id.into(),
            spec,
        }
    }

    /// A subject named `id` with one request in flight at most.
    fn one(id: &str) -> Subject {
        subject(
            id,
            LimitSpec {
                max_parallel: Some(1),
                ..LimitSpec::default()
            },
        )
    }

    fn key(rpm: Option<u64>, tpm: Option<u64>, par: Option<u32>) -> VirtualKey {
        let now = chrono::Utc::now();
        VirtualKey {
            id: "0123456789abcdef".into(),
            name: "k".into(),
            hash: String::new(),
            owner: Default::default(),
            models: Vec::new(),
            rpm,
            tpm,
            max_parallel: par,
            budget: Default::default(),
            expires_at: None,
            metadata: serde_json::Value::Null,
            created_at: now,
            updated_at: now,
            revoked_at: None,
            role: None,
            created_by: None,
        }
    }

    #[test]
    fn idle_limiters_of_client_chosen_ids_are_swept_out() {
        let limits = KeyLimits::default();
        let subject = |i: usize| Subject {
            id: format!("user:u{i}"),
            label: format!("user `u{i}`"),
            spec: LimitSpec {
                rpm: None,
                tpm: None,
                max_parallel: Some(1),
            },
        };
        // One request stays in flight through it all: its limiter must survive every sweep.
        let held = limits.admit_all(&[subject(0)], 0).expect("admitted");
        for i in 1..10 * SWEEP_MIN {
            drop(limits.admit_all(&[subject(i)], 0).expect("admitted"));
        }
        assert!(
            limits.len() <= 2 * SWEEP_MIN,
            "{} limiters kept",
            limits.len()
        );
        // Still held: a second request of user 0 is over its max_parallel.
        assert!(limits.admit_all(&[subject(0)], 0).is_err());
        drop(held);
        assert!(limits.admit_all(&[subject(0)], 0).is_ok());
    }

    #[test]
    fn requests_per_minute_are_enforced_with_headers() {
        let limits = KeyLimits::default();
        let k = key(Some(3), None, None);
        for i in 0..3 {
            let a = limits.admit(&k, 10).expect("under the limit");
            let remaining = a
                .headers
                .iter()
                .find(|(n, _)| *n == "x-ratelimit-remaining-requests")
                .map(|(_, v)| v.clone());
            assert_eq!(remaining, Some((2 - i).to_string()));
        }
        let e = limits.admit(&k, 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
        assert!(
            e.headers
                .iter()
                .any(|(n, v)| *n == "x-ratelimit-remaining-requests" && v == "0")
        );
        // New limits on the key take effect (a new limiter).
        let more = key(Some(10), None, None);
        assert!(limits.admit(&more, 10).is_ok());
    }

    #[test]
    fn tokens_are_reserved_then_settled() {
        let limits = KeyLimits::default();
        let k = key(None, Some(1000), None);
        let mut a = limits.admit(&k, 800).unwrap();
        assert!(limits.admit(&k, 300).is_err(), "800 + 300 > 1000");
        // The request used only 100 tokens: the rest is released.
        a.settle(100);
        assert!(limits.admit(&k, 300).is_ok());
    }

    #[test]
    fn parallel_requests_are_bounded_and_released() {
        let limits = KeyLimits::default();
        let k = key(None, None, Some(2));
        let a = limits.admit(&k, 0).unwrap();
        let b = limits.admit(&k, 0).unwrap();
        let e = limits.admit(&k, 0).unwrap_err();
        assert!(e.message.contains("max_parallel"), "{}", e.message);
        drop(a);
        let c = limits.admit(&k, 0).unwrap();
        drop((b, c));
        // A refusal carries the key's other windows, as a refusal by Redis does.
        let k = key(Some(10), None, Some(1));
        let _held = limits.admit(&k, 0).unwrap();
        let e = limits.admit(&k, 0).unwrap_err();
        assert!(
            e.headers
                .iter()
                .any(|(n, v)| *n == "x-ratelimit-limit-requests" && v == "10"),
            "{:?}",
            e.headers
        );
    }

    /// A request refused by a limit that frees up soon, while another limit stays full for
    /// longer, is told to retry after the longer wait.
    #[test]
    fn retry_after_is_the_longest_wait_of_any_full_limit() {
        let limits = KeyLimits::default();
        let k = KeyLimits::key_subject(&key(Some(1), None, None));
        // A key whose own tokens fill later than its one request.
        let both = KeyLimits::key_subject(&VirtualKey {
            id: "both".into(),
            ..key(Some(1), Some(100), None)
        });
        let global = subject(
            "global",
            LimitSpec {
                tpm: Some(100),
                ..LimitSpec::default()
            },
        );
        // The key's one request now; two seconds later the global tpm fills.
        let kl = limits.limiter(&k.id, &k.spec);
        kl.rpm.as_ref().unwrap().add(Instant::now(), 1);
        let bl = limits.limiter(&both.id, &both.spec);
        bl.rpm.as_ref().unwrap().add(Instant::now(), 1);
        std::thread::sleep(Duration::from_secs(2));
        let g = limits.limiter(&global.id, &global.spec);
        g.tpm.as_ref().unwrap().add(Instant::now(), 100);
        bl.tpm.as_ref().unwrap().add(Instant::now(), 100);
        // The keys' minutes end in 58 s, the gateway's tokens' and the second key's in 60 s.
        for subjects in [vec![k, global], vec![both]] {
            let e = limits.admit_all(&subjects, 10).unwrap_err();
            let after = e.retry_after.expect("retry-after").as_secs();
            assert!(
                (59..=60).contains(&after),
                "retry after {after} s: {}",
                e.message
            );
        }
    }

    /// A slot whose release Redis never took (an outage longer than the retries) is released
    /// once Redis answers again, not held against the subject until it lapses 15 minutes on.
    #[tokio::test]
    async fn a_release_lost_to_an_outage_is_sent_again_when_redis_answers() {
        use sluice_testkit::redis::{TempRedis, redis_available};
        if !redis_available() {
            assert_ne!(std::env::var("SLUICE_REQUIRE_REDIS").as_deref(), Ok("1"));
            return;
        }
        let redis = TempRedis::start().expect("redis-server starts");
        let config = crate::state::StateConfig {
            redis_url: Some(format!("redis://127.0.0.1:{}", redis.port())),
            ..Default::default()
        };
        let shared = Arc::new(
            crate::state::Shared::connect(&config)
                .await
                .unwrap()
                .unwrap(),
        );
        let (mut held, _) = admit_shared(&shared, &[one("key:a")], 0)
            .await
            .unwrap()
            .unwrap();
        // Its release was lost: the retries ran out while Redis was unreachable.
        let lost = crate::state::Deferred::Release {
            subjects: std::mem::take(&mut held.parallel),
            holder: held.holder.clone(),
        };
        drop(held);
        assert!(
            admit_shared(&shared, &[one("key:a")], 0)
                .await
                .unwrap()
                .is_err(),
            "the slot is still held"
        );
        shared.defer(lost);
        // Any call Redis answers sends it again.
        let _other = admit_shared(&shared, &[one("key:b")], 0)
            .await
            .unwrap()
            .unwrap();
        let mut freed = false;
        for _ in 0..100 {
            if let Ok(Ok(_)) = admit_shared(&shared, &[one("key:a")], 0).await {
                freed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(freed, "the deferred release was not sent");
    }

    /// A request refused by its second limit took its first limit's slot for a moment; no other
    /// request may be refused for that slot (one admission at a time, as in Redis's script).
    #[test]
    fn a_passing_refusal_never_refuses_another_request() {
        let limits = Arc::new(KeyLimits::default());
        // Model `x` is busy for the whole test: every request for it is refused by it.
        let _busy = limits
            .admit_all(&[one("model:x")], 0)
            .expect("x's one slot");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuser = {
            let (limits, stop) = (limits.clone(), stop.clone());
            let subjects = [one("key:k"), one("model:x")];
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert!(limits.admit_all(&subjects, 0).is_err());
                }
            })
        };
        let mut refused = 0;
        for _ in 0..200_000 {
            if limits.admit_all(&[one("key:k")], 0).is_err() {
                refused += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        refuser.join().unwrap();
        assert_eq!(refused, 0, "key k had room every time");
    }

    #[test]
    fn a_refusal_gives_back_what_other_limits_took() {
        let limits = KeyLimits::default();
        let k = KeyLimits::key_subject(&key(Some(10), Some(1000), Some(5)));
        let model = Subject {
            id: "model:m".into(),
            label: "model `m`".into(),
            spec: LimitSpec {
                rpm: Some(1),
                ..LimitSpec::default()
            },
        };
        let subjects = [k.clone(), model];
        let first = limits.admit_all(&subjects, 100).expect("first");
        assert_eq!(first.len(), 2);
        let e = limits.admit_all(&subjects, 100).unwrap_err();
        assert!(e.message.contains("model `m`"), "{}", e.message);
        // The key's limiter holds only the first request: 1 request, 100 tokens, 1 in flight.
        let l = limits.limiter(&k.id, &k.spec);
        let now = Instant::now();
        assert_eq!(l.rpm.as_ref().unwrap().used(now), 1);
        assert_eq!(l.tpm.as_ref().unwrap().used(now), 100);
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 1);
        drop(first);
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn changed_limits_keep_what_was_counted() {
        let limits = KeyLimits::default();
        let subject = |rpm: u64, tpm: Option<u64>| Subject {
            id: "global".into(),
            label: "this gateway".into(),
            spec: LimitSpec {
                rpm: Some(rpm),
                tpm,
                max_parallel: Some(2),
            },
        };
        let held: Vec<_> = (0..2)
            .map(|_| limits.admit_all(&[subject(10, None)], 0).expect("admitted"))
            .collect();
        // A reload raises rpm: the two in flight still count against max_parallel…
        let e = limits.admit_all(&[subject(11, None)], 0).unwrap_err();
        assert!(e.message.contains("max_parallel"), "{}", e.message);
        drop(held);
        // … and the two requests of this minute against the new rpm: 9 more fit, not 11.
        for _ in 0..9 {
            drop(limits.admit_all(&[subject(11, None)], 0).expect("under 11"));
        }
        let e = limits.admit_all(&[subject(11, None)], 0).unwrap_err();
        assert!(
            e.message.contains("11 requests per minute"),
            "{}",
            e.message
        );
        // A limit added later starts counting then; the existing ones keep their counts.
        drop(
            limits
                .admit_all(&[subject(12, Some(100))], 60)
                .expect("the 12th"),
        );
        let l = limits.limiter("global", &subject(12, Some(100)).spec);
        let now = Instant::now();
        assert_eq!(l.rpm.as_ref().unwrap().used(now), 12);
        assert_eq!(l.tpm.as_ref().unwrap().used(now), 60);
        assert_eq!(l.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn reset_format() {
        assert_eq!(reset(Duration::from_millis(250)), "250ms");
        assert_eq!(reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset(Duration::from_secs(360)), "6m0s");
    }
}
