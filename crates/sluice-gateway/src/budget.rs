//! Budgets: spend limits in USD per virtual key, user and team, per day, month or in total.
//!
//! Spend accrues from the request log's `cost_usd`. Before a provider call the request's
//! worst-case cost (every prompt byte a token, plus its maximum completion, at the dearest
//! price among the deployments that may serve it) is reserved on every ledger that covers it;
//! when its record closes the reservation is replaced by the real cost. A request whose worst
//! case does not fit under a budget next to what is spent and reserved is refused with 429
//! `insufficient_quota`, so a budget is never overshot by more than the reservations' estimate
//! errors — and never at all when the worst case holds.
//!
//! A ledger (one spender, one period) starts from the store's spend for its period the first
//! time it is needed. In process it lives in memory (exact on one node); with Redis
//! (`state.redis_url`) it lives in Redis and every replica reserves against the same one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_core::error::{Error, ErrorCode};
use sluice_core::keys::{Budget, VirtualKey};
use sluice_core::record::RequestRecord;
use sluice_core::usage::{Spender, UsageStore};

use crate::shared::{BudgetItem, Reserve};
use crate::state::Shared;

/// `[budgets]` in sluice.toml: budgets besides each key's own.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// For every user separately (the request's user: header, body or key owner), unless
    /// `users` names them.
    #[serde(default)]
    pub per_user: Budget,
    /// Budgets of named users.
    #[serde(default)]
    pub users: BTreeMap<String, Budget>,
    /// Budgets of teams (the team of the key's owner).
    #[serde(default)]
    pub teams: BTreeMap<String, Budget>,
    /// Completion tokens assumed for the worst case of a request that sets no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
}

fn default_max_tokens() -> u32 {
    4096
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        BudgetsConfig {
            per_user: Budget::default(),
            users: BTreeMap::new(),
            teams: BTreeMap::new(),
            default_max_tokens: default_max_tokens(),
        }
    }
}

fn check_budget(name: &str, b: &Budget) -> Result<(), String> {
    for (field, v) in [
        ("daily_usd", b.daily_usd),
        ("monthly_usd", b.monthly_usd),
        ("total_usd", b.total_usd),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(format!(
                "{name}.{field}: must be a non-negative number of USD, got {v}"
            ));
        }
    }
    Ok(())
}

impl BudgetsConfig {
    /// Checks the settings; errors name the key below `budgets`.
    pub fn validate(&self) -> Result<(), String> {
        check_budget("per_user", &self.per_user)?;
        for (u, b) in &self.users {
            check_budget(&format!("users.{u}"), b)?;
        }
        for (t, b) in &self.teams {
            check_budget(&format!("teams.{t}"), b)?;
        }
        if self.default_max_tokens == 0 {
            return Err("default_max_tokens: must be at least 1".into());
        }
        Ok(())
    }

    /// Whether any budget is configured here.
    pub fn is_empty(&self) -> bool {
        is_empty(&self.per_user) && self.users.is_empty() && self.teams.is_empty()
    }
}

fn is_empty(b: &Budget) -> bool {
    b.daily_usd.is_none() && b.monthly_usd.is_none() && b.total_usd.is_none()
}

/// A budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// The UTC day.
    Day,
    /// The UTC calendar month.
    Month,
    /// Since the first record.
    Total,
}

impl Period {
    /// When the period that contains `now` started.
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let day = |y, m, d| {
            Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
                .single()
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        };
        match self {
            Period::Day => day(now.year(), now.month(), now.day()),
            Period::Month => day(now.year(), now.month(), 1),
            Period::Total => DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    /// When the period that contains `now` ends (`None`: never).
    pub fn end(self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Period::Day => Some(self.start(now) + chrono::Duration::days(1)),
            Period::Month => {
                let (y, m) = if now.month() == 12 {
                    (now.year() + 1, 1)
                } else {
                    (now.year(), now.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()
            }
            Period::Total => None,
        }
    }

    /// `daily`, `monthly`, `total`.
    pub fn adjective(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Month => "monthly",
            Period::Total => "total",
        }
    }

    /// The ledger's name for the period containing `now`: `day:2026-12-02`, `month:2026-12`,
    /// `total`.
    fn bucket(self, now: DateTime<Utc>) -> String {
        match self {
            Period::Day => format!("day:{}", now.format("%Y-%m-%d")),
            Period::Month => format!("month:{}", now.format("%Y-%m")),
            Period::Total => "total".into(),
        }
    }

    /// How long a shared ledger is kept after its last change (it is rebuilt from the store
    /// when it is gone).
    fn ttl_secs(self) -> u64 {
        match self {
            Period::Day => 2 * 86_400,
            Period::Month => 32 * 86_400,
            Period::Total => 86_400,
        }
    }
}

/// One budget that covers a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub spender: Spender,
    pub period: Period,
    pub usd: f64,
}

fn push_budget(out: &mut Vec<Limit>, spender: &Spender, b: &Budget) {
    for (period, v) in [
        (Period::Day, b.daily_usd),
        (Period::Month, b.monthly_usd),
        (Period::Total, b.total_usd),
    ] {
        if let Some(usd) = v {
            out.push(Limit {
                spender: spender.clone(),
                period,
                usd,
            });
        }
    }
}

/// Every budget covering a request made with `key` by `user` of `team`.
pub fn limits_for(
    cfg: &BudgetsConfig,
    key: Option<&VirtualKey>,
    user: Option<&str>,
    team: Option<&str>,
) -> Vec<Limit> {
    let mut out = Vec::new();
    if let Some(k) = key
        && !is_empty(&k.budget)
    {
        push_budget(&mut out, &Spender::Key(k.id.clone()), &k.budget);
    }
    if let Some(u) = user {
        let b = cfg.users.get(u).unwrap_or(&cfg.per_user);
        if !is_empty(b) {
            push_budget(&mut out, &Spender::User(u.to_string()), b);
        }
    }
    if let Some(t) = team
        && let Some(b) = cfg.teams.get(t)
    {
        push_budget(&mut out, &Spender::Team(t.to_string()), b);
    }
    out
}

/// The ledger of `spender`'s budget for `period`, at `now`: `key:ID:day:2026-12-02`.
fn ledger_name(spender: &Spender, period: Period, now: DateTime<Utc>) -> String {
    format!("{}:{}", spender.id(), period.bucket(now))
}

/// Every ledger a request's cost goes to, whichever budgets are configured: its key's, its
/// user's and its team's (as the store attributes spend), for each period, at its start.
pub fn ledgers_of(r: &RequestRecord) -> Vec<String> {
    let spenders = [
        r.key_id.clone().map(Spender::Key),
        r.user.clone().map(Spender::User),
        r.team().map(|t| Spender::Team(t.to_string())),
    ];
    spenders
        .iter()
        .flatten()
        .flat_map(|s| {
            [Period::Day, Period::Month, Period::Total].map(|p| ledger_name(s, p, r.started_at))
        })
        .collect()
}

/// USD as integer nano-dollars. Ledgers count in them, so sums are exact, and a whole
/// nano-dollar is fine enough for the cheapest call priced (one token of an embedding model at
/// $0.02 per million tokens is 20 of them): rounding each cost to the nearest moves a ledger by
/// at most half a nano-dollar per request.
pub fn nanos(usd: f64) -> i64 {
    if usd.is_finite() {
        (usd * 1e9).round().clamp(0.0, i64::MAX as f64) as i64
    } else {
        i64::MAX
    }
}

fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

/// One ledger in process.
#[derive(Debug, Default)]
struct Ledger {
    /// `None` until the period's spend was read from the store.
    spent: Option<i64>,
    /// Costs settled before the spend was read (added to it then).
    early: i64,
    reserved: i64,
    /// When the period ends: the ledger is dropped after.
    ends: Option<DateTime<Utc>>,
    /// When a request last used it: one idle for long, with nothing reserved, is dropped too
    /// (read again from the store when needed), so ledgers of user names seen once do not pile
    /// up.
    used: Option<std::time::Instant>,
    /// Held while the spend is read from the store, so that requests arriving together (at
    /// the start of a period) read it once.
    loading: Arc<tokio::sync::Mutex<()>>,
    /// The last failed read of the spend and when it ended: requests that waited for it are
    /// refused with its error at once (each one reading again, for up to 2 s, would make the
    /// last of N wait 2N s), until [`RETRY_SPEND_READ`] has passed.
    failed: Option<(std::time::Instant, Error)>,
}

/// How long a failed read of a ledger's spend answers for the requests behind it.
const RETRY_SPEND_READ: std::time::Duration = std::time::Duration::from_secs(1);

/// A ledger unused this long, with nothing reserved, is dropped from memory: by then every cost
/// it settled is in the store, which it is read from again when needed.
const LEDGER_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// The budgets' ledgers.
pub struct Budgets {
    store: Option<Arc<dyn UsageStore>>,
    shared: Option<Arc<Shared>>,
    local: Mutex<HashMap<String, Arc<Mutex<Ledger>>>>,
    /// When ledgers of periods that are over were last dropped.
    swept: Mutex<std::time::Instant>,
    /// How often ledgers are swept, and how long one may sit idle ([`LEDGER_IDLE`]).
    sweep_every: std::time::Duration,
    idle: std::time::Duration,
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("ledgers", &self.local.lock().len())
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

/// A request's reservation on its budgets: settled with the real cost when its record closes
/// (a reservation dropped unsettled is released with no cost).
pub struct Reservation {
    local: Vec<Arc<Mutex<Ledger>>>,
    /// Redis, the ledgers and the holder of the reservation there.
    shared: Option<(Arc<Shared>, Vec<String>, String)>,
    /// The worst case held in Redis (0 for a reservation made locally while Redis was down).
    shared_worst: i64,
    worst: i64,
    settled: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("worst_nanos", &self.worst)
            .field(
                "ledgers",
                &(self.local.len() + self.shared.as_ref().map_or(0, |s| s.1.len())),
            )
            .finish()
    }
}

impl Reservation {
    /// Replaces the reservation by the request's real cost.
    pub fn settle(mut self, cost_usd: f64) {
        self.finish(nanos(cost_usd));
    }

    fn finish(&mut self, actual: i64) {
        if self.settled {
            return;
        }
        self.settled = true;
        for l in &self.local {
            let mut l = l.lock();
            // Used now: it is not dropped as idle before this cost is surely in the store.
            l.used = Some(std::time::Instant::now());
            l.reserved = (l.reserved - self.worst).max(0);
            // Saturating: an absurd cost reported by a broken upstream pins the ledger at its
            // ceiling (spent, refusing more) rather than wrapping it negative (unlimited).
            match &mut l.spent {
                Some(s) => *s = s.saturating_add(actual),
                None => l.early = l.early.saturating_add(actual),
            }
        }
        if let Some((shared, ledgers, holder)) = self.shared.take() {
            let worst = self.shared_worst;
            let work = async move {
                if worst == 0 && shared.bypass("budgets").is_some() {
                    // Reserved locally while Redis was down, and it still is: nothing is held
                    // there, and the ledgers are built again from the log once it answers.
                    shared.mark_stale(&ledgers);
                    return;
                }
                let redis = shared.redis().clone();
                match redis.reconcile(&ledgers, &holder, worst, actual).await {
                    Ok(()) => {
                        shared.ok();
                        shared.catch_up();
                    }
                    Err(e) => {
                        // Redis may lack this cost: the ledgers are built again from the log,
                        // which has it, once Redis answers.
                        shared.mark_stale(&ledgers);
                        let _ = shared.on_failure("budgets", &e);
                        // A hold is given back through the blip (a settlement is applied once
                        // however often it is sent, so if the first one did arrive this does
                        // nothing), rather than held against the budget until it lapses.
                        if worst > 0
                            && crate::shared::with_retries(|| {
                                redis.reconcile(&ledgers, &holder, worst, 0)
                            })
                            .await
                            .is_err()
                        {
                            // Sent again once Redis answers (it would hold the budget for
                            // shared::HOLD_MS otherwise).
                            shared.defer(crate::state::Deferred::GiveBack {
                                ledgers,
                                holder,
                                worst,
                            });
                        }
                    }
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(work);
                }
                Err(_) => tracing::warn!("budget reconciliation skipped: no runtime"),
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.finish(0);
    }
}

fn insufficient(l: &Limit, spent: i64, reserved: i64, worst: i64, now: DateTime<Utc>) -> Error {
    let usd_text = |n: i64| sluice_core::price::format_usd(usd(n));
    let resets = match l.period.end(now) {
        Some(t) => format!("; it resets at {}", t.format("%Y-%m-%dT%H:%MZ")),
        None => "; raise it to go on".into(),
    };
    let budget = sluice_core::price::format_usd(l.usd);
    let (label, period) = (l.spender.label(), l.period.adjective());
    let worst_text = format!(
        "this request may cost up to {} (its max tokens at the model's price)",
        usd_text(worst)
    );
    let limit = nanos(l.usd);
    if worst > limit {
        // The request alone is over the whole budget: no reset makes room for it.
        let mut e = Error::new(
            ErrorCode::InsufficientQuota,
            format!(
                "request too large for the {period} budget of {budget} of {label}: it may cost up to {} (its max tokens at the model's price); lower max_tokens (or max_completion_tokens), shorten the prompt, or raise the budget",
                usd_text(worst),
            ),
        );
        e.headers.push(("x-should-retry", "false".into()));
        return e;
    }
    let message = if spent >= limit {
        format!(
            "{label} has used its {period} budget of {budget}: {} spent{resets}",
            usd_text(spent)
        )
    } else if spent.saturating_add(worst) > limit {
        // Room is left, not enough for this request's worst case.
        let held = if reserved > 0 {
            format!(", {} reserved by requests in flight", usd_text(reserved))
        } else {
            String::new()
        };
        format!(
            "{label} has {} left of its {period} budget of {budget} ({} spent{held}), and {worst_text}: lower max_tokens (or max_completion_tokens) or shorten the prompt to fit{resets}",
            usd_text(limit - spent),
            usd_text(spent)
        )
    } else {
        format!(
            "the room left in the {period} budget of {budget} of {label} is held by requests in flight: {} spent and {} reserved, and {worst_text}; retry when they finish",
            usd_text(spent),
            usd_text(reserved)
        )
    };
    let mut e = Error::new(ErrorCode::InsufficientQuota, message);
    if spent.saturating_add(worst) > limit {
        // What is spent already leaves no room: retrying before the period ends cannot help.
        // `x-should-retry: false` stops the OpenAI and Anthropic SDKs' automatic retries.
        e.retry_after = l
            .period
            .end(now)
            .and_then(|t| (t - now).to_std().ok())
            .map(|d| d.max(std::time::Duration::from_secs(1)));
        e.headers.push(("x-should-retry", "false".into()));
    } else {
        // Requests in flight hold the room; they settle within moments.
        e.retry_after = Some(std::time::Duration::from_secs(1));
    }
    e
}

impl Budgets {
    pub fn new(store: Option<Arc<dyn UsageStore>>, shared: Option<Arc<Shared>>) -> Self {
        Budgets {
            store,
            shared,
            local: Mutex::new(HashMap::new()),
            swept: Mutex::new(std::time::Instant::now()),
            sweep_every: std::time::Duration::from_secs(60),
            idle: LEDGER_IDLE,
        }
    }

    fn ledger_id(l: &Limit, now: DateTime<Utc>) -> String {
        ledger_name(&l.spender, l.period, now)
    }

    async fn stored_spend(&self, l: &Limit, now: DateTime<Utc>) -> Result<i64, Error> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            store.spend(&l.spender, l.period.start(now)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(sluice_core::record::StoreError::Database(
                "no answer within 2 s".into(),
            ))
        });
        read.map(nanos).map_err(|e| {
            let mut err = Error::new(
                ErrorCode::Unavailable,
                format!("cannot read spend from the store to check the budget: {e}"),
            );
            err.retry_after = Some(std::time::Duration::from_secs(1));
            err
        })
    }

    /// Reserves `worst_usd` on every budget in `limits`, or refuses the request with 429
    /// `insufficient_quota` naming the budget it does not fit. `Ok(None)` when no budget
    /// applies.
    pub async fn reserve(
        &self,
        limits: &[Limit],
        worst_usd: f64,
    ) -> Result<Option<Reservation>, Error> {
        if limits.is_empty() {
            return Ok(None);
        }
        let now = Utc::now();
        let worst = nanos(worst_usd);
        let Some(shared) = &self.shared else {
            return self.reserve_local(limits, worst, now).await.map(Some);
        };
        match shared.bypass("budgets") {
            None => match self.reserve_fresh(shared, limits, worst, now).await {
                Ok(r) => {
                    // Redis answers again: ledgers kept locally meanwhile are stale now.
                    let mut local = self.local.lock();
                    if !local.is_empty() {
                        local.clear();
                    }
                    return r.map(Some);
                }
                Err(e) => shared.on_failure("budgets", &e)?,
            },
            Some(verdict) => verdict?,
        }
        // Failing open: local ledgers, and the cost also goes to Redis's ledgers when it can
        // (best effort), so that they do not miss what was spent meanwhile.
        let mut r = self.reserve_local(limits, worst, now).await?;
        r.shared = Some((
            shared.clone(),
            limits.iter().map(|l| Self::ledger_id(l, now)).collect(),
            crate::shared::new_holder(),
        ));
        r.shared_worst = 0;
        Ok(Some(r))
    }

    /// [`reserve_shared`](Self::reserve_shared) after forgetting those of the request's ledgers
    /// that missed a cost while Redis was unreachable (the others are forgotten in the
    /// background, [`Shared::catch_up`]).
    async fn reserve_fresh(
        &self,
        shared: &Arc<Shared>,
        limits: &[Limit],
        worst: i64,
        now: DateTime<Utc>,
    ) -> Result<Result<Reservation, Error>, crate::shared::SharedError> {
        let ids: Vec<String> = limits.iter().map(|l| Self::ledger_id(l, now)).collect();
        shared.forget(shared.take_stale_of(&ids)).await?;
        self.reserve_shared(shared, limits, worst, now).await
    }

    /// `Err` is a Redis failure; `Ok(Err)` a refusal.
    async fn reserve_shared(
        &self,
        shared: &Arc<Shared>,
        limits: &[Limit],
        worst: i64,
        now: DateTime<Utc>,
    ) -> Result<Result<Reservation, Error>, crate::shared::SharedError> {
        let items: Vec<BudgetItem> = limits
            .iter()
            .map(|l| BudgetItem {
                ledger: Self::ledger_id(l, now),
                limit_nanos: nanos(l.usd),
                worst_nanos: worst,
                ttl_secs: l.period.ttl_secs(),
            })
            .collect();
        let holder = crate::shared::new_holder();
        // A missing ledger is built from the store, then the reservation is tried again.
        for _ in 0..3 {
            match shared.redis().reserve(&items, &holder).await? {
                Reserve::Ok => {
                    shared.ok();
                    shared.catch_up();
                    return Ok(Ok(Reservation {
                        local: Vec::new(),
                        shared: Some((
                            shared.clone(),
                            items.into_iter().map(|i| i.ledger).collect(),
                            holder,
                        )),
                        shared_worst: worst,
                        worst,
                        settled: false,
                    }));
                }
                Reserve::Refused {
                    index,
                    spent_nanos,
                    reserved_nanos,
                } => {
                    shared.ok();
                    // Also what keeps this refusal from lasting: a hold Redis missed giving
                    // back during an outage is sent again now.
                    shared.catch_up();
                    let l = &limits[index.min(limits.len() - 1)];
                    return Ok(Err(insufficient(
                        l,
                        spent_nanos,
                        reserved_nanos,
                        worst,
                        now,
                    )));
                }
                Reserve::NeedInit(missing) => {
                    for i in missing {
                        let (Some(l), Some(item)) = (limits.get(i), items.get(i)) else {
                            continue;
                        };
                        // Costs of records written from here on, which the read may not see, are
                        // added to the ledger as they are written (`late_costs`): kept aside until
                        // it exists, judged against this moment after. (One written between now
                        // and the read's snapshot may count twice: the safe side for a budget.)
                        shared.redis().begin_build(&item.ledger).await?;
                        let built = Utc::now().timestamp_millis();
                        let spent = match self.stored_spend(l, now).await {
                            Ok(s) => s,
                            Err(e) => return Ok(Err(e)),
                        };
                        shared
                            .redis()
                            .init(&item.ledger, spent, item.ttl_secs, built)
                            .await?;
                    }
                }
            }
        }
        Ok(Err(Error::internal(
            "budget ledgers could not be initialised in Redis",
        )))
    }

    async fn reserve_local(
        &self,
        limits: &[Limit],
        worst: i64,
        now: DateTime<Utc>,
    ) -> Result<Reservation, Error> {
        let mut ledgers: Vec<(String, Arc<Mutex<Ledger>>)> = {
            let mut all = self.local.lock();
            // Ledgers of periods that are over are dropped, once a minute at most.
            {
                let mut swept = self.swept.lock();
                if swept.elapsed() >= self.sweep_every {
                    *swept = std::time::Instant::now();
                    all.retain(|_, l| {
                        let held = Arc::strong_count(l) > 1;
                        let g = l.lock();
                        let idle = g.reserved == 0
                            && !held
                            && g.used.is_none_or(|t| t.elapsed() >= self.idle);
                        g.ends.is_none_or(|e| e > now) && !idle
                    });
                }
            }
            limits
                .iter()
                .map(|l| {
                    let id = Self::ledger_id(l, now);
                    let ledger = all
                        .entry(id.clone())
                        .or_insert_with(|| {
                            Arc::new(Mutex::new(Ledger {
                                ends: l.period.end(now),
                                ..Ledger::default()
                            }))
                        })
                        .clone();
                    ledger.lock().used = Some(std::time::Instant::now());
                    (id, ledger)
                })
                .collect()
        };
        for ((_, ledger), l) in ledgers.iter().zip(limits) {
            if ledger.lock().spent.is_some() {
                continue;
            }
            let gate = ledger.lock().loading.clone();
            let _loading = gate.lock().await;
            if ledger.lock().spent.is_none() {
                let recent = ledger
                    .lock()
                    .failed
                    .as_ref()
                    .filter(|(at, _)| at.elapsed() < RETRY_SPEND_READ)
                    .map(|(_, e)| e.clone());
                if let Some(e) = recent {
                    return Err(e);
                }
                match self.stored_spend(l, now).await {
                    Ok(spent) => {
                        let mut g = ledger.lock();
                        g.spent = Some(spent + std::mem::take(&mut g.early));
                        g.failed = None;
                    }
                    Err(e) => {
                        ledger.lock().failed = Some((std::time::Instant::now(), e.clone()));
                        return Err(e);
                    }
                }
            }
        }
        // Check every ledger, then charge them all, under all their locks (taken in one order).
        let mut order: Vec<usize> = (0..ledgers.len()).collect();
        order.sort_by(|a, b| ledgers[*a].0.cmp(&ledgers[*b].0));
        order.dedup_by(|a, b| ledgers[*a].0 == ledgers[*b].0);
        let mut guards: Vec<(usize, parking_lot::MutexGuard<'_, Ledger>)> =
            order.iter().map(|&i| (i, ledgers[i].1.lock())).collect();
        for (i, g) in &guards {
            let spent = g.spent.unwrap_or(0);
            if spent.saturating_add(g.reserved).saturating_add(worst) > nanos(limits[*i].usd) {
                return Err(insufficient(&limits[*i], spent, g.reserved, worst, now));
            }
        }
        for (_, g) in &mut guards {
            g.reserved = g.reserved.saturating_add(worst);
        }
        drop(guards);
        let held = order
            .into_iter()
            .map(|i| ledgers[i].1.clone())
            .collect::<Vec<_>>();
        ledgers.clear();
        Ok(Reservation {
            local: held,
            shared: None,
            shared_worst: 0,
            worst,
            settled: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use sluice_core::record::StoreError;
    use sluice_core::usage::{UsageQuery, UsageRow};

    struct FixedSpend(f64);

    #[async_trait]
    impl UsageStore for FixedSpend {
        async fn spend(&self, _: &Spender, _: DateTime<Utc>) -> Result<f64, StoreError> {
            Ok(self.0)
        }
        async fn usage(&self, _: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn daily(spender: Spender, usd: f64) -> Limit {
        Limit {
            spender,
            period: Period::Day,
            usd,
        }
    }

    /// Reserves `worst` on `limits` and settles the reservation at `cost`.
    async fn spend(b: &Budgets, limits: &[Limit], worst: f64, cost: f64) {
        b.reserve(limits, worst)
            .await
            .expect("room in the budget")
            .expect("a budget applies")
            .settle(cost);
    }

    #[tokio::test]
    async fn reservations_fit_under_the_budget_and_settle_to_the_real_cost() {
        let b = Budgets::new(Some(Arc::new(FixedSpend(0.50))), None);
        let limits = [daily(Spender::Key("k".into()), 1.00)];
        // 0.50 spent: two reservations of 0.20 fit, a third does not.
        let r1 = b.reserve(&limits, 0.20).await.unwrap().unwrap();
        let r2 = b.reserve(&limits, 0.20).await.unwrap().unwrap();
        let e = b.reserve(&limits, 0.20).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota);
        assert!(
            e.message.starts_with(
                "the room left in the daily budget of $1 of API key `k` is held by requests in flight: $0.50 spent and $0.40 reserved"
            ),
            "{}",
            e.message
        );
        assert_eq!(e.retry_after, Some(std::time::Duration::from_secs(1)));
        // The first cost far less than its worst case: room again.
        r1.settle(0.01);
        let r3 = b.reserve(&limits, 0.20).await.unwrap().unwrap();
        r2.settle(0.20);
        r3.settle(0.20);
        // 0.50 + 0.01 + 0.20 + 0.20 = 0.91 spent: 0.09 fits, 0.10 does not.
        let e = b.reserve(&limits, 0.10).await.unwrap_err();
        assert!(
            e.message.starts_with(
                "API key `k` has $0.09 left of its daily budget of $1 ($0.91 spent), and this request may cost up to $0.10"
            ),
            "{}",
            e.message
        );
        assert!(e.message.contains("lower max_tokens"), "{}", e.message);
        spend(&b, &limits, 0.09, 0.09).await;
        let e = b.reserve(&limits, 0.000_001).await.unwrap_err();
        assert!(
            e.message
                .starts_with("API key `k` has used its daily budget of $1: $1 spent; it resets at"),
            "exactly spent: {}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_request_over_the_whole_budget_is_too_large_not_waiting_for_a_reset() {
        let b = Budgets::new(Some(Arc::new(FixedSpend(0.0))), None);
        let limits = [daily(Spender::Key("k".into()), 0.01)];
        let e = b.reserve(&limits, 0.02).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota);
        assert!(
            e.message
                .starts_with("request too large for the daily budget of $0.01"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("has used"), "{}", e.message);
        assert_eq!(e.retry_after, None);
        assert!(e.headers.contains(&("x-should-retry", "false".into())));
        // A budget below a cent keeps its digits in the message.
        let limits = [daily(Spender::Key("k".into()), 0.0001)];
        let e = b.reserve(&limits, 0.02).await.unwrap_err();
        assert!(e.message.contains("$0.0001"), "{}", e.message);
    }

    /// Costs far below a micro-dollar add up: each of these calls costs $0.00000004 (two tokens
    /// of an embedding model at $0.02 per million), and rounded to whole micro-dollars each
    /// added nothing, so the budget let any number through.
    #[tokio::test]
    async fn costs_far_below_a_micro_dollar_add_up() {
        let b = Budgets::new(Some(Arc::new(FixedSpend(0.0))), None);
        let limits = [daily(Spender::Key("k".into()), 0.000_01)];
        let mut served = 0;
        while let Ok(r) = b.reserve(&limits, 0.000_000_04).await {
            r.unwrap().settle(0.000_000_04);
            served += 1;
            assert!(served <= 1000, "the budget never filled");
        }
        assert_eq!(served, 250, "$0.00001 holds 250 calls of $0.00000004");
    }

    #[tokio::test]
    async fn an_absurd_cost_pins_the_ledger_rather_than_wrapping_it() {
        let b = Budgets::new(Some(Arc::new(FixedSpend(0.0))), None);
        let limits = [daily(Spender::Key("k".into()), 1.00)];
        // Two requests under way; a broken upstream reports usage so large that each cost
        // saturates.
        let r1 = b.reserve(&limits, 0.01).await.unwrap().unwrap();
        let r2 = b.reserve(&limits, 0.01).await.unwrap().unwrap();
        r1.settle(1e30);
        r2.settle(1e30);
        let e = b.reserve(&limits, 0.01).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota);
    }

    /// A store that does not answer (a database that hangs).
    struct Hangs;

    #[async_trait]
    impl UsageStore for Hangs {
        async fn spend(&self, _: &Spender, _: DateTime<Utc>) -> Result<f64, StoreError> {
            std::future::pending().await
        }
        async fn usage(&self, _: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// Requests that wait behind a spend read that timed out are refused with its error, not
    /// each after a read of its own (the last of 10 waited 20 s).
    #[tokio::test]
    async fn requests_behind_a_failed_spend_read_fail_together() {
        let b = Arc::new(Budgets::new(Some(Arc::new(Hangs)), None));
        let limits = [daily(Spender::Key("k".into()), 1.00)];
        let started = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (b, limits) = (b.clone(), limits.clone());
                tokio::spawn(async move {
                    let e = b.reserve(&limits, 0.01).await.unwrap_err();
                    assert_eq!(e.code, ErrorCode::Unavailable);
                    tokio::time::Instant::now()
                })
            })
            .collect();
        for t in tasks {
            let done = t.await.unwrap();
            assert!(
                done - started < std::time::Duration::from_secs(3),
                "refused after {:?}",
                done - started
            );
        }
    }

    /// A store whose spend the test sets (nano-USD).
    struct SetSpend(std::sync::atomic::AtomicI64);

    #[async_trait]
    impl UsageStore for SetSpend {
        async fn spend(&self, _: &Spender, _: DateTime<Utc>) -> Result<f64, StoreError> {
            Ok(self.0.load(std::sync::atomic::Ordering::SeqCst) as f64 / 1e9)
        }
        async fn usage(&self, _: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// Budgets over a Redis reached through a link a test can cut, with a $1.00 daily budget.
    struct Blip {
        _redis: sluice_testkit::redis::TempRedis,
        link: sluice_testkit::partition::Partition,
        shared: Arc<Shared>,
        store: Arc<SetSpend>,
        b: Budgets,
        limits: [Limit; 1],
        ledger: String,
    }

    impl Blip {
        /// A gateway's budgets over the Redis on `port`, reached through a link a test can cut.
        async fn replica(
            port: u16,
            store: &Arc<SetSpend>,
        ) -> (sluice_testkit::partition::Partition, Arc<Shared>, Budgets) {
            let link = sluice_testkit::partition::Partition::start(&format!("127.0.0.1:{port}"))
                .await
                .unwrap();
            let config = crate::state::StateConfig {
                redis_url: Some(format!("redis://{}", link.addr())),
                ..Default::default()
            };
            let shared = Arc::new(Shared::connect(&config).await.unwrap().unwrap());
            let b = Budgets::new(Some(store.clone()), Some(shared.clone()));
            (link, shared, b)
        }

        /// `None` (the test passes) where redis-server is not installed and not required.
        async fn start() -> Option<Blip> {
            use sluice_testkit::redis::{TempRedis, redis_available};
            if !redis_available() {
                assert_ne!(std::env::var("SLUICE_REQUIRE_REDIS").as_deref(), Ok("1"));
                return None;
            }
            let redis = TempRedis::start().expect("redis-server starts");
            let store = Arc::new(SetSpend(std::sync::atomic::AtomicI64::new(0)));
            let (link, shared, b) = Self::replica(redis.port(), &store).await;
            let limits = [daily(Spender::Key("k".into()), 1.00)];
            let ledger = Budgets::ledger_id(&limits[0], Utc::now());
            Some(Blip {
                _redis: redis,
                link,
                shared,
                store,
                b,
                limits,
                ledger,
            })
        }
    }

    /// A shared ledger counts a cost far below a micro-dollar (it counted whole micro-dollars,
    /// so this one added nothing).
    #[tokio::test]
    async fn a_shared_ledger_counts_costs_below_a_micro_dollar() {
        let Some(Blip {
            _redis,
            link: _link,
            shared,
            b,
            limits,
            ledger,
            ..
        }) = Blip::start().await
        else {
            return;
        };
        for _ in 0..3 {
            spend(&b, &limits, 0.000_000_4, 0.000_000_04).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (spent, reserved) = shared.redis().ledger(&ledger).await.unwrap().unwrap();
        assert_eq!(
            (spent, reserved),
            (120, 0),
            "three costs of 40 nano-dollars"
        );
    }

    /// A shared ledger of millions of dollars, rebuilt from the log, holds its whole spend (the
    /// amounts sent to Redis were capped at $1.1 million, so a $3 million budget with $2 million
    /// spent took a $1.5 million request).
    #[tokio::test]
    async fn a_large_shared_budget_holds_after_its_ledger_is_rebuilt() {
        let Some(Blip {
            _redis,
            link: _link,
            b,
            store,
            ..
        }) = Blip::start().await
        else {
            return;
        };
        store
            .0
            .store(2_000_000_000_000_000, std::sync::atomic::Ordering::SeqCst);
        let limits = [Limit {
            spender: Spender::Team("big".into()),
            period: Period::Total,
            usd: 3_000_000.0,
        }];
        let e = b.reserve(&limits, 1_500_000.0).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota);
        assert!(e.message.contains("$2000000 spent"), "{}", e.message);
        spend(&b, &limits, 900_000.0, 900_000.0).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(b.reserve(&limits, 200_000.0).await.is_err(), "$2.9M spent");
    }

    /// A request log that keeps record ids (what a store needs to tell new records).
    #[derive(Default)]
    struct Ids(Mutex<std::collections::HashSet<uuid::Uuid>>);

    #[async_trait]
    impl sluice_core::record::LogStore for Ids {
        async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
            self.insert_reporting_new(records).await.map(|_| ())
        }
        async fn insert_reporting_new(
            &self,
            records: &[RequestRecord],
        ) -> Result<Vec<uuid::Uuid>, StoreError> {
            let mut ids = self.0.lock();
            Ok(records
                .iter()
                .filter(|r| ids.insert(r.id))
                .map(|r| r.id)
                .collect())
        }
        async fn get(&self, _: uuid::Uuid) -> Result<Option<RequestRecord>, StoreError> {
            Ok(None)
        }
        async fn list(
            &self,
            _: &sluice_core::record::RecordQuery,
        ) -> Result<Vec<RequestRecord>, StoreError> {
            Ok(Vec::new())
        }
        async fn count(&self) -> Result<u64, StoreError> {
            Ok(self.0.lock().len() as u64)
        }
    }

    /// A ledger lost and rebuilt from the store while a record was still queued (or spilled)
    /// learns that record's cost when it is written; one written before, or a request that
    /// finished after the rebuild (settled into the new ledger), adds nothing. The ledger stayed
    /// short of the cost for good: with an outage's records spilled, a $10 budget spent $16.
    #[tokio::test]
    async fn a_cost_whose_record_reaches_the_store_after_a_rebuild_reaches_the_ledger() {
        let Some(blip) = Blip::start().await else {
            return;
        };
        let (shared, b, limits, ledger) = (&blip.shared, &blip.b, &blip.limits, &blip.ledger);
        let spent = || async {
            let (spent, _) = shared.redis().ledger(ledger).await.unwrap().unwrap();
            spent
        };
        let settled = || tokio::time::sleep(std::time::Duration::from_millis(300));
        let record = |cost: f64| {
            let mut r = RequestRecord::start(uuid::Uuid::now_v7(), "chat.completions", false);
            r.key_id = Some("k".into());
            r.cost_usd = cost;
            r.finished_at = Utc::now();
            r
        };
        let log = crate::late_costs::LateCosts::new(Arc::new(Ids::default()), shared.clone());
        use sluice_core::record::LogStore;

        // $0.10 settled; its record is queued, not in the store (which says $0 spent).
        spend(b, limits, 0.05, 0.10).await;
        let queued = record(0.10);
        let written_before = record(0.20);
        log.insert_batch(std::slice::from_ref(&written_before))
            .await
            .unwrap();
        settled().await;
        assert_eq!(spent().await, 100_000_000);
        // The ledger is lost (a Redis restart, a flush) and rebuilt from the store.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        shared
            .redis()
            .forget_ledgers(std::slice::from_ref(ledger))
            .await
            .unwrap();
        spend(b, limits, 0.05, 0.0).await;
        settled().await;
        assert_eq!(spent().await, 0, "rebuilt without the queued cost");
        // A request that finishes now is settled into the rebuilt ledger.
        spend(b, limits, 0.05, 0.03).await;
        let after = record(0.03);
        settled().await;
        assert_eq!(spent().await, 30_000_000);

        // In a batch with a record written before (a replay's chunk holding the record it
        // tried the store with): the new ones count.
        log.insert_batch(&[written_before.clone(), queued.clone(), after])
            .await
            .unwrap();
        settled().await;
        assert_eq!(spent().await, 130_000_000, "the queued cost, once");
        // A replay that writes it again adds nothing.
        log.insert_batch(&[queued, written_before]).await.unwrap();
        settled().await;
        assert_eq!(spent().await, 130_000_000);

        // A cost written while the ledger is being built (its spend being read) is kept for
        // its creation, which adds it: the read began before it was written.
        let during = record(0.07);
        shared
            .redis()
            .forget_ledgers(std::slice::from_ref(ledger))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        shared.redis().begin_build(ledger).await.unwrap();
        let built = Utc::now().timestamp_millis();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        log.insert_batch(std::slice::from_ref(&during))
            .await
            .unwrap();
        settled().await;
        assert!(shared.redis().ledger(ledger).await.unwrap().is_none());
        shared
            .redis()
            .init(ledger, 130_000_000, 3600, built)
            .await
            .unwrap();
        assert_eq!(
            spent().await,
            200_000_000,
            "the cost written during the read"
        );
    }

    #[tokio::test]
    async fn spend_redis_missed_while_unreachable_is_read_again_from_the_log() {
        let Some(Blip {
            _redis,
            link,
            shared,
            store,
            b,
            limits,
            ledger,
        }) = Blip::start().await
        else {
            return;
        };
        let settled = || tokio::time::sleep(std::time::Duration::from_millis(300));
        let spent = || async {
            let (spent, _) = shared.redis().ledger(&ledger).await.unwrap().unwrap();
            spent
        };
        // $0.10 through Redis; the log has it too.
        spend(&b, &limits, 0.05, 0.10).await;
        store
            .0
            .store(100_000_000, std::sync::atomic::Ordering::SeqCst);
        settled().await;
        assert_eq!(spent().await, 100_000_000);

        // Redis cannot be reached: the reservation fails open, and the $0.30 it settles never
        // reaches Redis; the log has it.
        link.cut();
        let r = b.reserve(&limits, 0.05).await.unwrap().unwrap();
        assert!(shared.is_down());
        r.settle(0.30);
        store
            .0
            .store(400_000_000, std::sync::atomic::Ordering::SeqCst);
        settled().await;

        // Redis answers again: the next reservation builds the ledger again from the log.
        link.mend();
        let start = std::time::Instant::now();
        while shared.is_down() {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let _ = b.reserve(&limits, 0.0).await;
        }
        b.reserve(&limits, 0.01).await.unwrap().unwrap().settle(0.0);
        settled().await;
        assert_eq!(
            spent().await,
            400_000_000,
            "the $0.30 spent meanwhile counts"
        );
    }

    /// A cost one replica settled while it could not reach Redis is not lost to the other
    /// replicas: the ledger is dropped from Redis after any call Redis answers again (or when
    /// that replica stops), and built again from the log. Only that replica's next budget
    /// reservation dropped it, and a replica that stopped first forgot it: the others kept
    /// trusting a short ledger.
    #[tokio::test]
    async fn a_cost_one_replica_missed_reaches_the_others() {
        let Some(Blip {
            _redis,
            link: link_a,
            shared: shared_a,
            store,
            b: a,
            limits,
            ledger,
        }) = Blip::start().await
        else {
            return;
        };
        let (link_b, shared_b, b) = Blip::replica(_redis.port(), &store).await;
        let settled = || tokio::time::sleep(std::time::Duration::from_millis(300));
        let set_log = |usd: f64| {
            store
                .0
                .store(nanos(usd), std::sync::atomic::Ordering::SeqCst)
        };
        // Replica A spends $0.10 through Redis.
        spend(&a, &limits, 0.05, 0.10).await;
        set_log(0.10);
        // Replica B cannot reach Redis: it fails open, and its $0.50 is only in the log.
        link_b.cut();
        let r = b.reserve(&limits, 0.05).await.unwrap().unwrap();
        r.settle(0.50);
        set_log(0.60);
        settled().await;
        assert_eq!(shared_b.stale_count(), 1);
        // Redis answers B again, and B stops before another request.
        link_b.mend();
        shared_b
            .catch_up_before_exit(std::time::Duration::from_secs(2))
            .await;
        assert_eq!(shared_b.stale_count(), 0);
        // Replica A now counts the $0.50: $0.45 more is refused.
        let e = a.reserve(&limits, 0.45).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota, "{e}");
        a.reserve(&limits, 0.35).await.unwrap().unwrap().settle(0.0);
        settled().await;
        let (spent, _) = shared_a.redis().ledger(&ledger).await.unwrap().unwrap();
        assert_eq!(spent, nanos(0.60));
        drop(link_a);
    }

    /// A give-back Redis missed through an outage is sent again after a call Redis answers, a
    /// refusal too: it was sent only after a reservation that fitted, so a hold that left no
    /// room refused every request until it lapsed (15 minutes).
    #[tokio::test]
    async fn a_missed_give_back_is_sent_after_a_refusal() {
        let Some(t) = Blip::start().await else { return };
        let (shared, b, limits, ledger) = (&t.shared, &t.b, &t.limits, &t.ledger);
        // A hold of $0.60 whose giving back failed through the retries (as in a long outage).
        let mut r = b.reserve(limits, 0.60).await.unwrap().unwrap();
        let (_, ledgers, holder) = r.shared.take().expect("held in Redis");
        r.settled = true;
        drop(r);
        shared.defer(crate::state::Deferred::GiveBack {
            ledgers,
            holder,
            worst: nanos(0.60),
        });
        let e = b.reserve(limits, 0.50).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientQuota, "{e}");
        let start = std::time::Instant::now();
        loop {
            let (_, reserved) = shared.redis().ledger(ledger).await.unwrap().unwrap();
            if reserved == 0 {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "the hold stayed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        b.reserve(limits, 0.50).await.unwrap().unwrap().settle(0.0);
    }

    /// A reservation whose settlement meets a Redis blip gives its hold back when Redis answers
    /// again, instead of holding the budget until the hold lapses (15 minutes).
    #[tokio::test]
    async fn a_hold_is_given_back_after_a_blip() {
        let Some(Blip {
            _redis,
            link,
            shared,
            store: _,
            b,
            limits,
            ledger,
        }) = Blip::start().await
        else {
            return;
        };
        let r = b.reserve(&limits, 0.50).await.unwrap().unwrap();
        let (_, reserved) = shared.redis().ledger(&ledger).await.unwrap().unwrap();
        assert_eq!(reserved, 500_000_000);
        link.cut();
        r.settle(0.20);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        link.mend();
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some((_, 0))) = shared.redis().ledger(&ledger).await {
                break;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the hold stayed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Ledgers of spenders seen once (a client naming a new user each time) do not pile up: an
    /// idle one with nothing reserved is dropped, and read from the store again when needed.
    #[tokio::test]
    async fn idle_ledgers_are_dropped_and_read_again() {
        let store = Arc::new(CountingSpend(std::sync::atomic::AtomicUsize::new(0)));
        let mut b = Budgets::new(Some(store.clone()), None);
        b.sweep_every = std::time::Duration::ZERO;
        b.idle = std::time::Duration::from_millis(50);
        for u in 0..100 {
            let limits = [daily(Spender::User(format!("u{u}")), 1.00)];
            spend(&b, &limits, 0.01, 0.01).await;
        }
        let held = b
            .reserve(&[daily(Spender::User("busy".into()), 1.00)], 0.01)
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        b.reserve(&[daily(Spender::User("next".into()), 1.00)], 0.01)
            .await
            .unwrap()
            .unwrap()
            .settle(0.0);
        // Only the one just used and the one with a reservation in flight are left.
        assert_eq!(b.local.lock().len(), 2);
        drop(held);
        let reads = store.0.load(std::sync::atomic::Ordering::SeqCst);
        b.reserve(&[daily(Spender::User("u0".into()), 1.00)], 0.01)
            .await
            .unwrap()
            .unwrap()
            .settle(0.0);
        assert_eq!(
            store.0.load(std::sync::atomic::Ordering::SeqCst),
            reads + 1,
            "read from the store again"
        );
    }

    /// Counts the spend reads.
    struct CountingSpend(std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl UsageStore for CountingSpend {
        async fn spend(&self, _: &Spender, _: DateTime<Utc>) -> Result<f64, StoreError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            Ok(0.25)
        }
        async fn usage(&self, _: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn requests_arriving_together_read_the_spend_once() {
        let store = Arc::new(CountingSpend(std::sync::atomic::AtomicUsize::new(0)));
        let b = Arc::new(Budgets::new(Some(store.clone()), None));
        let limits = [daily(Spender::User("u".into()), 1.0)];
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (b, limits) = (b.clone(), limits.clone());
                tokio::spawn(async move { b.reserve(&limits, 0.05).await.map(|r| r.is_some()) })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
        assert_eq!(store.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refusal_on_one_budget_charges_none() {
        let b = Budgets::new(None, None);
        let key = daily(Spender::Key("k".into()), 10.0);
        let user = daily(Spender::User("u".into()), 0.30);
        let both = [key.clone(), user];
        let r = b.reserve(&both, 0.25).await.unwrap().unwrap();
        assert!(b.reserve(&both, 0.25).await.is_err());
        // The key's ledger only holds the first reservation.
        let only_key = [key];
        let r2 = b.reserve(&only_key, 9.75).await.unwrap().unwrap();
        assert!(b.reserve(&only_key, 0.01).await.is_err());
        drop((r, r2));
        // Dropped unsettled: released with no cost.
        b.reserve(&only_key, 10.0).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn dropped_reservations_release_everything() {
        let b = Budgets::new(None, None);
        let limits = [daily(Spender::Team("t".into()), 1.0)];
        for _ in 0..100 {
            let r = b.reserve(&limits, 0.9).await.unwrap();
            drop(r);
        }
        b.reserve(&limits, 1.0).await.unwrap().unwrap().settle(0.0);
    }

    #[test]
    fn periods_start_and_end_in_utc() {
        let now = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 0).unwrap();
        assert_eq!(
            Period::Day.start(now),
            Utc.with_ymd_and_hms(2026, 12, 31, 0, 0, 0).unwrap()
        );
        assert_eq!(
            Period::Month.end(now),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).single()
        );
        assert_eq!(Period::Day.bucket(now), "day:2026-12-31");
        assert_eq!(Period::Month.bucket(now), "month:2026-12");
        assert_eq!(Period::Total.end(now), None);
    }

    #[test]
    fn the_covering_budgets_are_the_keys_the_users_and_the_teams() {
        let mut cfg = BudgetsConfig {
            per_user: Budget {
                daily_usd: Some(1.0),
                ..Budget::default()
            },
            ..BudgetsConfig::default()
        };
        cfg.users.insert(
            "vip".into(),
            Budget {
                monthly_usd: Some(100.0),
                ..Budget::default()
            },
        );
        cfg.teams.insert(
            "ml".into(),
            Budget {
                total_usd: Some(5.0),
                ..Budget::default()
            },
        );
        let l = limits_for(&cfg, None, Some("alice"), Some("ml"));
        assert_eq!(
            l,
            vec![
                daily(Spender::User("alice".into()), 1.0),
                Limit {
                    spender: Spender::Team("ml".into()),
                    period: Period::Total,
                    usd: 5.0
                }
            ]
        );
        let vip = limits_for(&cfg, None, Some("vip"), None);
        assert_eq!(vip[0].period, Period::Month);
        assert!(limits_for(&cfg, None, None, Some("other")).is_empty());
        assert!(cfg.validate().is_ok());
        cfg.teams.get_mut("ml").unwrap().daily_usd = Some(-1.0);
        assert!(cfg.validate().unwrap_err().contains("teams.ml.daily_usd"));
    }
}
