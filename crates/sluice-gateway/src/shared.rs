//! State shared by every replica through Redis: rate limits, budget reservations and the exact
//! cache, for when `state.redis_url` is set.
//!
//! [`RedisState`] holds one multiplexed, self-reconnecting connection
//! ([`ConnectionManager`]) and a key prefix. Every call is bounded: a connection attempt gives up
//! after [`CONNECT_TIMEOUT`], a reply after [`RESPONSE_TIMEOUT`], and the whole call after
//! [`CALL_TIMEOUT`], so a stopped or unreachable Redis turns into a [`SharedError`] quickly
//! instead of a stuck request; the caller then applies the operator's failure policy (fail open
//! on local limits, or fail closed with 503). The manager reconnects by itself once Redis is
//! back.
//!
//! * Rate limits ([`RedisState::admit`], [`settle`](RedisState::settle),
//!   [`release`](RedisState::release)) have the semantics of the in-process ones in
//!   [`crate::limits`] and [`crate::window::RateWindow`]: requests and tokens per minute are
//!   sliding windows of the last 60 one-second buckets, in-flight requests a counter. One Lua
//!   script checks every subject and charges all of them or none, on the Redis server's clock
//!   (`TIME`), so that replicas agree.
//! * Budgets ([`RedisState::reserve`], [`init`](RedisState::init),
//!   [`reconcile`](RedisState::reconcile)) reserve a request's worst-case cost before the call
//!   and replace it with the real cost after, so that a budget overshoots by at most what was in
//!   flight.
//! * The cache: [`RedisState`] implements [`CacheStore`]; Redis expires the entries.
//!
//! Keys, under the configured prefix `P`:
//!
//! | key                    | type    | holds                                                  |
//! |------------------------|---------|--------------------------------------------------------|
//! | `P:rl:SUBJECT:rpm`     | hash    | requests per epoch second (last 60 s; expires ~120 s) |
//! | `P:rl:SUBJECT:tpm`     | hash    | tokens per epoch second (last 60 s; expires ~120 s)   |
//! | `P:rl:SUBJECT:par`     | zset    | requests in flight by holder, scored by when each lapses (15 min); expires 900 s after the last use |
//! | `P:budget_nusd:LEDGER` | hash    | `spent`, nano-USD (expires with its period)            |
//! | `P:budget_nusd:LEDGER:holds` | zset | reservations in flight as `HOLDER:WORST` (nano-USD), scored by when each lapses (15 min) |
//! | `P:budget_nusd:settled:HOLDER` | string | marks a reservation settled (five minutes), so a retried settlement is applied once |
//! | `P:cache:KEY`          | string  | a cache entry as JSON, with a TTL                      |
//!
//! The scripts touch several keys at once, so the keys must live on one Redis node (a single
//! server or a primary with replicas; not Redis Cluster).

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use serde::{Deserialize, Serialize};
use sluice_core::record::StoreError;
use sluice_core::usage::{CacheEntry, CacheStore};

use crate::limits::LimitSpec;

/// How long one attempt to connect to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis may take to answer one command.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one call of [`RedisState`] may take in all, reconnection included.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a rate window's key outlives its last write: twice the window.
const WINDOW_TTL_SECS: u64 = 120;
/// How long an in-flight set outlives its last admission: as long as the hold of the slot that
/// admission took, so the set cannot lapse under a request still holding its slot.
const PARALLEL_TTL_SECS: u64 = HOLD_MS / 1000;
/// How long a request holds its in-flight slot and its budget reservation at most: each is an
/// entry with this deadline, so those of a replica that died mid-request lapse on their own
/// (a request that runs longer keeps going; only its hold lapses, and its cost is still
/// reconciled).
pub const HOLD_MS: u64 = 15 * 60 * 1000;
/// The largest token estimate sent to a script: far beyond any real request, and safe in
/// Redis's integers and Lua's doubles.
const MAX_AMOUNT: u64 = 1 << 50;

/// The largest amount of money (nano-USD: $2.3 billion) sent to a budget script: a spend, a
/// worst case or a cost. Redis keeps a ledger's spend as an exact 64-bit integer (this leaves
/// room for several such amounts to add up); the scripts compare amounts as doubles, exact to
/// the nano-dollar up to $9 million and to a few nano-dollars in a billion beyond.
const MAX_NANOS: i64 = 1 << 61;

fn clamp_amount(v: i64) -> i64 {
    v.clamp(0, MAX_NANOS)
}

/// A fresh id for one request's holds.
pub fn new_holder() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
/// Keys per SCAN step of [`CacheStore::cache_clear`].
const SCAN_COUNT: u64 = 500;

/// What went wrong talking to Redis. Every variant means that the shared state could not be
/// consulted; the caller applies the failure policy.
#[derive(Debug)]
#[non_exhaustive]
pub enum SharedError {
    /// Redis answered with an error, or the connection failed or dropped.
    Redis {
        /// What we were doing, e.g. "rate limit admission".
        op: &'static str,
        source: redis::RedisError,
    },
    /// No answer within [`CALL_TIMEOUT`].
    Timeout { op: &'static str, after: Duration },
    /// Redis answered something the script or command cannot have produced.
    Reply { op: &'static str, detail: String },
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedError::Redis { op, source } => {
                write!(f, "shared state (Redis) failed during {op}: {source}")?;
                if source.is_io_error() || source.is_connection_refusal() {
                    write!(
                        f,
                        "; check that Redis at `state.redis_url` is up and reachable"
                    )?;
                }
                Ok(())
            }
            SharedError::Timeout { op, after } => write!(
                f,
                "shared state (Redis) did not answer within {} ms during {op}; check that Redis \
                 at `state.redis_url` is up and reachable",
                after.as_millis()
            ),
            SharedError::Reply { op, detail } => write!(
                f,
                "shared state (Redis) gave an unexpected answer during {op}: {detail}"
            ),
        }
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SharedError::Redis { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<SharedError> for StoreError {
    fn from(e: SharedError) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// One window (requests or tokens per minute) of a subject, as the admission script saw it: for
/// the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUsage {
    /// The per-minute limit.
    pub limit: u64,
    /// The sum over the last 60 seconds.
    pub used: u64,
    /// Milliseconds until everything now in the window has expired (0 when it is empty): the
    /// `x-ratelimit-reset-*` value, like `RateWindow::wait_for(now, limit)`.
    pub reset_ms: u64,
}

impl WindowUsage {
    /// What is left of the limit (`x-ratelimit-remaining-*`).
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

/// The limits of one subject after an admission (or at a refusal, with nothing charged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowState {
    /// Requests per minute, when the subject has an `rpm` limit.
    pub rpm: Option<WindowUsage>,
    /// Tokens per minute, when the subject has a `tpm` limit.
    pub tpm: Option<WindowUsage>,
    /// Requests in flight, when the subject has a `max_parallel` limit.
    pub in_flight: Option<u64>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Rpm,
    /// Tokens per minute.
    Tpm,
    /// Requests in flight (`max_parallel`).
    Parallel,
}

/// The answer of [`RedisState::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedAdmit {
    /// Every subject had room and all were charged.
    Admitted {
        /// The epoch second (Redis clock) whose buckets were charged: pass it to
        /// [`RedisState::settle`].
        second: i64,
        /// One per subject, in the order given.
        windows: Vec<WindowState>,
        /// The id of the request's in-flight slots: pass it to [`RedisState::release`].
        holder: String,
    },
    /// A subject had no room; nothing was charged.
    Refused {
        /// The index of the first subject without room.
        index: usize,
        kind: LimitKind,
        /// The limit that refused.
        limit: u64,
        /// When enough of the window will have expired for this request to fit, like
        /// `RateWindow::wait_for`; `None` for [`LimitKind::Parallel`] (when a request finishes).
        retry_after_ms: Option<u64>,
        /// One per subject, in the order given, without any charge.
        windows: Vec<WindowState>,
    },
}

/// One budget a request must fit in, for [`RedisState::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetItem {
    /// Names the budget and its period, e.g. `key:abc:day:2026-12-02`.
    pub ledger: String,
    /// The budget, nano-USD.
    pub limit_nanos: i64,
    /// The most this request can cost, nano-USD.
    pub worst_nanos: i64,
    /// How long the ledger should live once created (at least the rest of its period); for
    /// [`RedisState::init`] after [`Reserve::NeedInit`].
    pub ttl_secs: u64,
}

/// The answer of [`RedisState::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Every budget had room: each ledger's `reserved` grew by the item's worst case.
    Ok,
    /// These items' ledgers do not exist yet (first use in the period, or Redis lost them):
    /// load the spend so far from the request log, [`init`](RedisState::init) them and try
    /// again. Nothing was changed.
    NeedInit(Vec<usize>),
    /// Item `index` would go over its limit (`spent + reserved + worst > limit`). Nothing was
    /// changed.
    Refused {
        index: usize,
        spent_nanos: i64,
        reserved_nanos: i64,
    },
}

/// Lua helpers shared by the rate-limit scripts.
///
/// `window(key, now_s)` reads a window hash, deleting the buckets that left it (and empty or
/// malformed ones) and returns `{secs = sorted seconds, vals = second -> count, used = sum}`.
/// `wait_ms(w, limit, n, now_ms)` is `RateWindow::wait_for` in milliseconds (-1: never).
const WINDOW_LUA: &str = r#"
local function int(x)
  return string.format('%d', x)
end

local function window(key, now_s)
  local raw = redis.call('HGETALL', key)
  local w = { secs = {}, vals = {}, used = 0 }
  local stale = {}
  for i = 1, #raw, 2 do
    local s = tonumber(raw[i])
    local v = tonumber(raw[i + 1])
    if s == nil or v == nil or v <= 0 or s <= now_s - 60 then
      stale[#stale + 1] = raw[i]
    else
      w.secs[#w.secs + 1] = s
      w.vals[s] = v
      w.used = w.used + v
    end
  end
  if #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  table.sort(w.secs)
  return w
end

local function window_add(w, s, v)
  if w.vals[s] == nil then
    w.secs[#w.secs + 1] = s
    table.sort(w.secs)
    w.vals[s] = 0
  end
  w.vals[s] = w.vals[s] + v
  w.used = w.used + v
end

local function fits(w, limit, n)
  return w.used + n <= limit or w.used == 0
end

local function wait_ms(w, limit, n, now_ms)
  if fits(w, limit, n) then
    return 0
  end
  local need
  if n > limit then
    need = w.used
  else
    need = w.used + n - limit
  end
  local freed = 0
  for _, s in ipairs(w.secs) do
    freed = freed + w.vals[s]
    if freed >= need then
      local ms = (s + 60) * 1000 - now_ms
      if ms < 0 then
        ms = 0
      end
      return ms
    end
  end
  return -1
end
"#;

/// KEYS: per subject `rpm`, `tpm`, `par`. ARGV: tokens, then per subject the rpm, tpm and
/// max_parallel limits (-1: none).
///
/// Returns `{1, second, W...}` when admitted, `{0, index, kind (1 rpm, 2 tpm, 3 parallel),
/// limit, retry_ms (-1: none), W...}` when refused, where `W` is seven numbers per subject:
/// rpm limit, used, reset ms; tpm limit, used, reset ms; in flight (-1 where no limit).
const ADMIT_LUA: &str = r#"
local tokens = tonumber(ARGV[1])
local holder = ARGV[2]
local n = (#ARGV - 2) / 3
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)

local subjects = {}
local refused = nil
for i = 1, n do
  local st = {
    rpm = tonumber(ARGV[3 * i]),
    tpm = tonumber(ARGV[3 * i + 1]),
    par = tonumber(ARGV[3 * i + 2]),
  }
  if st.rpm >= 0 then
    st.rw = window(KEYS[3 * i - 2], now_s)
  end
  if st.tpm >= 0 then
    st.tw = window(KEYS[3 * i - 1], now_s)
  end
  if st.par >= 0 then
    -- One entry per request in flight, scored by when its hold lapses.
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i], '-inf', now_ms)
    st.inflight = redis.call('ZCARD', KEYS[3 * i])
  end
  subjects[i] = st
  if refused == nil then
    if st.par >= 0 and st.inflight >= st.par then
      refused = { i - 1, 3, st.par, -1 }
    elseif st.rpm >= 0 and not fits(st.rw, st.rpm, 1) then
      refused = { i - 1, 1, st.rpm, wait_ms(st.rw, st.rpm, 1, now_ms) }
    elseif st.tpm >= 0 and tokens > 0 and not fits(st.tw, st.tpm, tokens) then
      refused = { i - 1, 2, st.tpm, wait_ms(st.tw, st.tpm, tokens, now_ms) }
    end
  end
end

-- A refusal's retry time is the longest wait of any limit without room, not the first one's.
if refused ~= nil then
  for i = 1, n do
    local st = subjects[i]
    local waits = {}
    if st.rpm >= 0 and not fits(st.rw, st.rpm, 1) then
      waits[#waits + 1] = wait_ms(st.rw, st.rpm, 1, now_ms)
    end
    if st.tpm >= 0 and tokens > 0 and not fits(st.tw, st.tpm, tokens) then
      waits[#waits + 1] = wait_ms(st.tw, st.tpm, tokens, now_ms)
    end
    for _, w in ipairs(waits) do
      if w > refused[4] then
        refused[4] = w
      end
    end
  end
end

local out
if refused == nil then
  for i = 1, n do
    local st = subjects[i]
    if st.rpm >= 0 then
      redis.call('HINCRBY', KEYS[3 * i - 2], now_s, 1)
      redis.call('EXPIRE', KEYS[3 * i - 2], ARGV_WINDOW_TTL)
      window_add(st.rw, now_s, 1)
    end
    if st.tpm >= 0 and tokens > 0 then
      redis.call('HINCRBY', KEYS[3 * i - 1], now_s, ARGV[1])
      redis.call('EXPIRE', KEYS[3 * i - 1], ARGV_WINDOW_TTL)
      window_add(st.tw, now_s, tokens)
    end
    if st.par >= 0 then
      redis.call('ZADD', KEYS[3 * i], now_ms + ARGV_HOLD_MS, holder)
      redis.call('EXPIRE', KEYS[3 * i], ARGV_PARALLEL_TTL)
      st.inflight = st.inflight + 1
    end
  end
  out = { 1, now_s }
else
  out = refused
  table.insert(out, 1, 0)
end

for i = 1, n do
  local st = subjects[i]
  for _, pair in ipairs({ { st.rpm, st.rw }, { st.tpm, st.tw } }) do
    local limit, w = pair[1], pair[2]
    if limit >= 0 then
      out[#out + 1] = limit
      out[#out + 1] = w.used
      out[#out + 1] = wait_ms(w, limit, limit, now_ms)
    else
      out[#out + 1] = -1
      out[#out + 1] = -1
      out[#out + 1] = -1
    end
  end
  if st.par >= 0 then
    out[#out + 1] = st.inflight
  else
    out[#out + 1] = -1
  end
end
return out
"#;

/// KEYS: rpm or tpm windows. ARGV: the second charged, delta. A positive delta is added to the
/// current second (the tokens were just counted); a negative one is taken from the second
/// charged only, while it is in the window, never below zero.
const SETTLE_LUA: &str = r#"
local second = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_s = tonumber(t[1])
for _, key in ipairs(KEYS) do
  if delta > 0 then
    redis.call('HINCRBY', key, now_s, ARGV[2])
    redis.call('EXPIRE', key, ARGV_WINDOW_TTL)
  elseif delta < 0 then
    -- Only the reservation's own second gives back: once it has left the window the estimate no
    -- longer counts, and other seconds hold other requests' tokens.
    local w = window(key, now_s)
    local v = w.vals[second]
    if v ~= nil then
      local take = math.min(v, -delta)
      if take >= v then
        redis.call('HDEL', key, second)
      else
        redis.call('HINCRBY', key, second, int(-take))
      end
    end
  end
end
return 1
"#;

/// KEYS: in-flight sets. ARGV: the holder. Removes its entry from each.
const RELEASE_LUA: &str = r#"
for _, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[1])
end
return 1
"#;

/// KEYS: per ledger its hash (`spent`) and its set of holds. ARGV: holder, hold ms, then per
/// ledger limit, worst, ttl (0: none). A hold is the member `HOLDER:WORST`, scored by when it
/// lapses; what is reserved is the sum of the live holds. Returns `{0}` (reserved), `{1, i...}`
/// (need init, 0-based) or `{2, i, spent, reserved}` (refused).
const RESERVE_LUA: &str = r#"
local holder = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now_ms + tonumber(ARGV[2])
local n = #KEYS / 2
local missing = { 1 }
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 0 then
    missing[#missing + 1] = i - 1
  end
end
if #missing > 1 then
  return missing
end
for i = 1, n do
  local limit = tonumber(ARGV[3 * i])
  local worst = tonumber(ARGV[3 * i + 1])
  local spent = tonumber(redis.call('HGET', KEYS[2 * i - 1], 'spent') or '0') or 0
  local reserved = held(KEYS[2 * i], now_ms)
  if spent + reserved + worst > limit then
    return { 2, i - 1, spent, reserved }
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[2 * i], deadline, holder .. ':' .. ARGV[3 * i + 1])
  local ttl = tonumber(ARGV[3 * i + 2])
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
    redis.call('EXPIRE', KEYS[2 * i], ttl)
  end
end
return { 0 }
"#;

/// `held(key, now_ms)`: drops the lapsed holds of a ledger and sums the worst cases of the rest.
const HELD_LUA: &str = r#"
local function held(key, now_ms)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
  local sum = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    sum = sum + (tonumber(string.match(m, ':(%d+)$')) or 0)
  end
  return sum
end
"#;

/// KEYS: a ledger's hash and its holds. Returns `{exists, spent, reserved}`.
const LEDGER_LUA: &str = r#"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exists = redis.call('EXISTS', KEYS[1])
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0') or 0
return { exists, spent, held(KEYS[2], now_ms) }
"#;

/// KEYS: one ledger, its build marker, its late costs. ARGV: spent, ttl (0: none), built (when
/// the spend started to be read from the store, ms). Creates the ledger only when missing, with
/// the late costs that arrived while it was being read and that the read cannot have seen
/// (written after `built`, of requests finished before it); returns 1 when it did.
const INIT_LUA: &str = r#"
local built = tonumber(ARGV[3])
local late = redis.call('LRANGE', KEYS[3], 0, -1)
redis.call('DEL', KEYS[2], KEYS[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local spent = tonumber(ARGV[1])
for _, entry in ipairs(late) do
  local at, finished, cost = string.match(entry, '^(%d+) (%d+) (%d+)$')
  if at and tonumber(at) > built and tonumber(finished) < built then
    spent = spent + tonumber(cost)
  end
end
spent = math.min(spent, 2305843009213693952)
redis.call('HSET', KEYS[1], 'spent', string.format('%d', spent), 'built', ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"#;

/// KEYS: per ledger the ledger, its build marker and its late costs. ARGV: when a batch of
/// records was committed to the store (ms), then per ledger the count of its costs and that
/// many pairs (when the request finished, ms; cost). A ledger built from the store before the
/// batch was committed, after a request finished, lacks that request's cost (it was settled
/// into the ledger's lost predecessor, or while none existed, and its record was not in the
/// store yet): it is added. A ledger being built (its marker set, its spend being read) keeps
/// the costs for its creation to judge. Returns the sum added.
const LATE_LUA: &str = r#"
local at = tonumber(ARGV[1])
local j = 2
local added = 0
for i = 1, #KEYS / 3 do
  local ledger, building, late = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local n = tonumber(ARGV[j])
  j = j + 1
  local built = tonumber(redis.call('HGET', ledger, 'built') or '')
  local pending = (not built) and redis.call('EXISTS', building) == 1
  local sum = 0
  for _ = 1, n do
    local finished = tonumber(ARGV[j])
    local cost = tonumber(ARGV[j + 1])
    j = j + 2
    if built and built < at and finished < built then
      sum = sum + cost
    elseif pending then
      redis.call('RPUSH', late, string.format('%d %d %d', at, finished, cost))
    end
  end
  if pending then
    redis.call('PEXPIRE', late, 60000)
  end
  if sum > 0 then
    sum = math.min(sum, 2305843009213693952)
    redis.call('HINCRBY', ledger, 'spent', string.format('%d', sum))
    added = added + sum
  end
end
return added
"#;

/// KEYS: per ledger its hash and its holds. ARGV: the hold (`HOLDER:WORST`), actual. Drops
/// the hold and adds `actual` to the spend of the ledgers that exist (one that is gone is
/// loaded again from the log, which holds this cost, on next use).
// KEYS[1] marks the reservation settled (a retry after a lost reply must not add the cost twice);
// then (ledger, holds) pairs.
const RECONCILE_LUA: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return 0
end
for i = 1, (#KEYS - 1) / 2 do
  redis.call('ZREM', KEYS[2 * i + 1], ARGV[1])
  if redis.call('EXISTS', KEYS[2 * i]) == 1 then
    redis.call('HINCRBY', KEYS[2 * i], 'spent', ARGV[2])
  end
end
return 1
"#;

/// How long a settled reservation's mark is kept: longer than any retry of its settlement (half
/// a minute, plus the command timeouts), short enough not to fill Redis under load.
const SETTLED_MARK_SECS: u64 = 300;

fn window_script(body: &str) -> Script {
    let source = format!("{WINDOW_LUA}\n{body}")
        .replace("ARGV_WINDOW_TTL", &WINDOW_TTL_SECS.to_string())
        .replace("ARGV_PARALLEL_TTL", &PARALLEL_TTL_SECS.to_string())
        .replace("ARGV_HOLD_MS", &HOLD_MS.to_string());
    Script::new(&source)
}

static ADMIT: LazyLock<Script> = LazyLock::new(|| window_script(ADMIT_LUA));
static SETTLE: LazyLock<Script> = LazyLock::new(|| window_script(SETTLE_LUA));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
static RESERVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{HELD_LUA}\n{RESERVE_LUA}")));
static LEDGER: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{HELD_LUA}\n{LEDGER_LUA}")));
static INIT: LazyLock<Script> = LazyLock::new(|| Script::new(INIT_LUA));
static LATE: LazyLock<Script> = LazyLock::new(|| Script::new(LATE_LUA));
static RECONCILE: LazyLock<Script> = LazyLock::new(|| Script::new(RECONCILE_LUA));

/// An entry as stored: [`CacheEntry`] with times in epoch milliseconds.
#[derive(Serialize, Deserialize)]
struct StoredEntry<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    cost_usd: f64,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl<'a> StoredEntry<'a> {
    fn of(e: &'a CacheEntry) -> Self {
        StoredEntry {
            key: Cow::Borrowed(&e.key),
            namespace: Cow::Borrowed(&e.namespace),
            model: Cow::Borrowed(&e.model),
            body: Cow::Borrowed(&e.body),
            cost_usd: e.cost_usd,
            created_at_ms: e.created_at.timestamp_millis(),
            expires_at_ms: e.expires_at.timestamp_millis(),
        }
    }

    fn into_entry(self) -> Option<CacheEntry> {
        Some(CacheEntry {
            key: self.key.into_owned(),
            namespace: self.namespace.into_owned(),
            model: self.model.into_owned(),
            body: self.body.into_owned(),
            cost_usd: self.cost_usd,
            created_at: DateTime::from_timestamp_millis(self.created_at_ms)?,
            expires_at: DateTime::from_timestamp_millis(self.expires_at_ms)?,
        })
    }
}

/// Escapes the glob characters of `s` for SCAN's MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a script may hold in Redis for a holder.
enum Held {
    /// In-flight slots: the holder in these subjects' `par` sets.
    Slots(Vec<String>),
    /// Budget holds: `HOLDER:WORST` in these ledgers' holds.
    Budget { ledgers: Vec<String>, worst: i64 },
}

/// Guards a script call that takes holds. Dropped armed (the call failed or timed out, or the
/// request was abandoned while it waited), it takes the holds back in the background: Redis may
/// have run the script though its answer never came, and the holds would otherwise block a
/// limit or a budget until they lapse ([`HOLD_MS`]). Taking back holds that were never taken
/// changes nothing. On the shared connection the undo runs after the script it follows.
struct Undo<'a> {
    state: &'a RedisState,
    holder: &'a str,
    held: Option<Held>,
}

impl Undo<'_> {
    fn disarm(&mut self) {
        self.held = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (state, holder) = (self.state.clone(), self.holder.to_string());
        runtime.spawn(async move {
            // Redis may be down: retried for half a minute, then the holds lapse.
            let _ = with_retries(|| async {
                match &held {
                    Held::Slots(ids) => state.release(ids, &holder).await,
                    Held::Budget { ledgers, worst } => {
                        state.reconcile(ledgers, &holder, *worst, 0).await
                    }
                }
            })
            .await;
        });
    }
}

/// Runs `op` until it succeeds, waiting 1, 2, 4, 8 and 16 s between tries (half a minute in
/// all): for settlements that must not be lost to a Redis blip (each is idempotent). Returns the
/// last error when every try failed.
pub async fn with_retries<F, Fut>(mut op: F) -> Result<(), SharedError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), SharedError>>,
{
    let mut last = Ok(());
    for wait in [0u64, 1, 2, 4, 8, 16] {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        last = op().await;
        if last.is_ok() {
            return last;
        }
    }
    last
}

/// A command the main runtime dropped unsent: the process is stopping.
fn shutting_down() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "the gateway is shutting down"))
}

/// The shared connection, sending a command once more when it failed on a connection that had
/// already dropped: after Redis restarts (or a proxy in front of it closes idle connections) the
/// first command finds the old connection closed, and the manager reconnects only after that
/// failure. Without the second try every replica would count that command as a Redis failure
/// (its limits and budgets go local for a while, or requests are refused with
/// `on_redis_failure = "closed"`) although Redis is up.
#[derive(Clone)]
struct Conn(ConnectionManager);

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        if sluice_core::shard::away_from_main() {
            // From a connection thread: on the main runtime, where a reconnect then puts the
            // new connection (see `sluice_core::shard::on_main`).
            let (mut conn, cmd) = (self.clone(), cmd.clone());
            return Box::pin(async move {
                sluice_core::shard::on_main(async move { conn.req_packed_command(&cmd).await })
                    .await
                    .unwrap_or_else(|| Err(shutting_down()))
            });
        }
        Box::pin(async move {
            match self.0.send_packed_command(cmd).await {
                Err(e) if e.is_connection_dropped() => self.0.send_packed_command(cmd).await,
                answer => answer,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        if sluice_core::shard::away_from_main() {
            let (mut conn, pipeline) = (self.clone(), pipeline.clone());
            return Box::pin(async move {
                sluice_core::shard::on_main(async move {
                    conn.req_packed_commands(&pipeline, offset, count).await
                })
                .await
                .unwrap_or_else(|| Err(shutting_down()))
            });
        }
        Box::pin(async move {
            match self.0.send_packed_commands(pipeline, offset, count).await {
                Err(e) if e.is_connection_dropped() => {
                    self.0.send_packed_commands(pipeline, offset, count).await
                }
                answer => answer,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// A Redis connection and key prefix: the state replicas share. Cloning is cheap; clones share
/// the connection.
#[derive(Clone)]
pub struct RedisState {
    conn: Conn,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisState {
    fn config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
    }

    fn client(url: &str) -> Result<redis::Client, String> {
        redis::Client::open(url).map_err(|e| {
            format!("`state.redis_url` is not a valid Redis URL (redis://HOST:PORT/DB): {e}")
        })
    }

    /// Connects to the Redis at `url` (`redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://`
    /// when the build has TLS) and names every key `{prefix}:…`. Fails when the URL is invalid
    /// or Redis does not answer within [`CALL_TIMEOUT`].
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisState, String> {
        let client = Self::client(url)?;
        let conn = tokio::time::timeout(
            CALL_TIMEOUT,
            ConnectionManager::new_with_config(client, Self::config()),
        )
        .await
        .map_err(|_| {
            format!(
                "cannot connect to Redis at `state.redis_url`: no answer within {} ms; check \
                 that it is up and reachable",
                CALL_TIMEOUT.as_millis()
            )
        })?
        .map_err(|e| format!("cannot connect to Redis at `state.redis_url`: {e}"))?;
        Ok(RedisState {
            conn: Conn(conn),
            prefix: Arc::from(prefix),
        })
    }

    /// Like [`connect`](Self::connect) but without waiting for Redis: the connection is made
    /// on first use, so a gateway can start (and fail open) while Redis is down. Fails only on
    /// an invalid URL. Must be called inside a Tokio runtime.
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<RedisState, String> {
        let client = Self::client(url)?;
        let conn = ConnectionManager::new_lazy_with_config(client, Self::config())
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        Ok(RedisState {
            conn: Conn(conn),
            prefix: Arc::from(prefix),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs `fut` within [`CALL_TIMEOUT`].
    async fn bounded<T>(
        op: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(SharedError::Redis { op, source }),
            Err(_) => Err(SharedError::Timeout {
                op,
                after: CALL_TIMEOUT,
            }),
        }
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let answer: String =
            Self::bounded("ping", redis::cmd("PING").query_async(&mut conn)).await?;
        if answer == "PONG" {
            Ok(())
        } else {
            Err(SharedError::Reply {
                op: "ping",
                detail: format!("PING answered {answer:?}"),
            })
        }
    }

    fn limit_key(&self, subject: &str, kind: &str) -> String {
        format!("{}:rl:{subject}:{kind}", self.prefix)
    }

    fn ledger_key(&self, ledger: &str) -> String {
        format!("{}:budget_nusd:{ledger}", self.prefix)
    }

    /// Set while a ledger's spend is read from the store to build it (see [`LATE_LUA`]).
    fn building_key(&self, ledger: &str) -> String {
        format!("{}:budget_nusd:{ledger}:building", self.prefix)
    }

    /// Costs written to the store while a ledger was being built (see [`LATE_LUA`]).
    fn late_key(&self, ledger: &str) -> String {
        format!("{}:budget_nusd:{ledger}:late", self.prefix)
    }

    /// Marks `ledger` as being built: costs written to the store from now until it is created
    /// are kept for its creation to judge. Lapses after 10 s (a read that never ended).
    pub async fn begin_build(&self, ledger: &str) -> Result<(), SharedError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.building_key(ledger))
            .arg(1)
            .arg("PX")
            .arg(10_000);
        let mut conn = self.conn.clone();
        let _: () = Self::bounded("budget ledger build", cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// The set of a ledger's holds (reservations in flight).
    fn holds_key(&self, ledger: &str) -> String {
        format!("{}:budget_nusd:{ledger}:holds", self.prefix)
    }

    fn cache_key(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.prefix)
    }

    /// The cache's generation, moved on by every clear (outside the `cache:` keys a clear
    /// deletes).
    fn cache_generation_key(&self) -> String {
        format!("{}:cache_generation", self.prefix)
    }

    /// Lets a request estimated at `tokens` through the limits of every subject (id and
    /// limits, e.g. `("key:abc", spec)`), or refuses it, atomically: either every subject is
    /// charged (a request, the tokens when it has a `tpm` limit and `tokens > 0`, and an
    /// in-flight slot when it has `max_parallel`) or none is.
    ///
    /// The checks are those of the in-process limits: a window admits when the new total stays
    /// within the limit or when it is empty (so an oversized request is not starved forever);
    /// `max_parallel` admits while fewer requests are in flight. After an admission, call
    /// [`settle`](Self::settle) with the real token count and [`release`](Self::release) when
    /// the request ends.
    pub async fn admit(
        &self,
        subjects: &[(String, LimitSpec)],
        tokens: u64,
    ) -> Result<SharedAdmit, SharedError> {
        const OP: &str = "rate limit admission";
        let holder = new_holder();
        let mut undo = Undo {
            state: self,
            holder: &holder,
            held: Some(Held::Slots(
                (subjects.iter())
                    .filter(|(_, spec)| spec.max_parallel.is_some())
                    .map(|(id, _)| id.clone())
                    .collect(),
            )),
        };
        let mut inv = ADMIT.prepare_invoke();
        inv.arg(tokens.min(MAX_AMOUNT)).arg(&holder);
        for (id, spec) in subjects {
            inv.key(self.limit_key(id, "rpm"))
                .key(self.limit_key(id, "tpm"))
                .key(self.limit_key(id, "par"))
                .arg(spec.rpm.map_or(-1, as_i64))
                .arg(spec.tpm.map_or(-1, as_i64))
                .arg(spec.max_parallel.map_or(-1, i64::from));
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = Self::bounded(OP, inv.invoke_async(&mut conn)).await?;
        let bad = |what: &str| SharedError::Reply {
            op: OP,
            detail: format!("{what}: {out:?}"),
        };
        let head = match out.first() {
            Some(1) => 2,
            Some(0) => 5,
            _ => return Err(bad("no verdict")),
        };
        let rest = out.get(head..).ok_or_else(|| bad("too short"))?;
        if rest.len() != subjects.len() * 7 {
            return Err(bad("wrong number of window values"));
        }
        let usage = |w: &[i64]| match w {
            [limit, used, reset, ..] if *limit >= 0 => Some(WindowUsage {
                limit: as_u64(*limit),
                used: as_u64(*used),
                reset_ms: as_u64(*reset),
            }),
            _ => None,
        };
        let windows = rest
            .chunks_exact(7)
            .map(|w| WindowState {
                rpm: usage(&w[0..3]),
                tpm: usage(&w[3..6]),
                in_flight: (w[6] >= 0).then(|| as_u64(w[6])),
            })
            .collect();
        undo.disarm();
        drop(undo);
        match out.as_slice() {
            [1, second, ..] => Ok(SharedAdmit::Admitted {
                second: *second,
                windows,
                holder,
            }),
            [0, index, kind, limit, retry, ..] => Ok(SharedAdmit::Refused {
                index: usize::try_from(*index).map_err(|_| bad("bad index"))?,
                kind: match kind {
                    1 => LimitKind::Rpm,
                    2 => LimitKind::Tpm,
                    3 => LimitKind::Parallel,
                    _ => return Err(bad("bad limit kind")),
                },
                limit: as_u64(*limit),
                retry_after_ms: (*retry >= 0).then(|| as_u64(*retry)),
                windows,
            }),
            _ => Err(bad("malformed")),
        }
    }

    /// Corrects the token estimate of an admitted request by `delta` (real count minus
    /// estimate) in the `tpm` windows of `subjects` (the ids of those with a `tpm` limit).
    /// `second` is [`SharedAdmit::Admitted::second`]. Tokens over the estimate count at the
    /// current second; tokens under it are given back from the bucket charged, while it is still
    /// in the window (never below zero): other buckets hold other requests' tokens.
    pub async fn settle(
        &self,
        subjects: &[String],
        second: i64,
        delta: i64,
    ) -> Result<(), SharedError> {
        self.settle_window(subjects, "tpm", second, delta).await
    }

    /// Gives back the request an admission counted on the `rpm` windows of `subjects` (it was
    /// refused by a budget), from the second charged.
    pub async fn give_back_request(
        &self,
        subjects: &[String],
        second: i64,
    ) -> Result<(), SharedError> {
        self.settle_window(subjects, "rpm", second, -1).await
    }

    /// [`settle`](Self::settle) on the `kind` windows (`rpm` or `tpm`).
    async fn settle_window(
        &self,
        subjects: &[String],
        kind: &str,
        second: i64,
        delta: i64,
    ) -> Result<(), SharedError> {
        if subjects.is_empty() || delta == 0 {
            return Ok(());
        }
        let mut inv = SETTLE.prepare_invoke();
        // A count an upstream got absurdly wrong must not overflow the bucket in Redis.
        inv.arg(second)
            .arg(delta.clamp(-(MAX_AMOUNT as i64), MAX_AMOUNT as i64));
        for id in subjects {
            inv.key(self.limit_key(id, kind));
        }
        let mut conn = self.conn.clone();
        let _: i64 = Self::bounded("token settlement", inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Gives back the in-flight slot of an admitted request in `subjects` (the ids of those
    /// with a `max_parallel` limit), never below zero.
    pub async fn release(&self, subjects: &[String], holder: &str) -> Result<(), SharedError> {
        if subjects.is_empty() {
            return Ok(());
        }
        let mut inv = RELEASE.prepare_invoke();
        inv.arg(holder);
        for id in subjects {
            inv.key(self.limit_key(id, "par"));
        }
        let mut conn = self.conn.clone();
        let _: i64 = Self::bounded("in-flight release", inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Reserves each item's worst case in its ledger, all or none: see [`Reserve`].
    pub async fn reserve(
        &self,
        items: &[BudgetItem],
        holder: &str,
    ) -> Result<Reserve, SharedError> {
        const OP: &str = "budget reservation";
        if items.is_empty() {
            return Ok(Reserve::Ok);
        }
        let mut undo = Undo {
            state: self,
            holder,
            held: Some(Held::Budget {
                ledgers: items.iter().map(|i| i.ledger.clone()).collect(),
                worst: items[0].worst_nanos,
            }),
        };
        let mut inv = RESERVE.prepare_invoke();
        inv.arg(holder).arg(HOLD_MS);
        for item in items {
            inv.key(self.ledger_key(&item.ledger))
                .key(self.holds_key(&item.ledger))
                .arg(item.limit_nanos)
                .arg(clamp_amount(item.worst_nanos))
                .arg(item.ttl_secs);
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = Self::bounded(OP, inv.invoke_async(&mut conn)).await?;
        let index = |i: i64| {
            usize::try_from(i).map_err(|_| SharedError::Reply {
                op: OP,
                detail: format!("bad index {i}"),
            })
        };
        let verdict = match out.as_slice() {
            [0] => Ok(Reserve::Ok),
            [1, missing @ ..] => Ok(Reserve::NeedInit(
                missing
                    .iter()
                    .map(|i| index(*i))
                    .collect::<Result<_, _>>()?,
            )),
            [2, i, spent, reserved] => Ok(Reserve::Refused {
                index: index(*i)?,
                spent_nanos: *spent,
                reserved_nanos: *reserved,
            }),
            _ => Err(SharedError::Reply {
                op: OP,
                detail: format!("malformed: {out:?}"),
            }),
        };
        if verdict.is_ok() {
            undo.disarm();
        }
        verdict
    }

    /// Forgets ledgers whose spend Redis may lack (costs settled while it could not be
    /// reached): each is built again from the request log on next use. Their holds are kept.
    pub async fn forget_ledgers(&self, ledgers: &[String]) -> Result<(), SharedError> {
        if ledgers.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        for ledger in ledgers {
            cmd.arg(self.ledger_key(ledger));
        }
        let mut conn = self.conn.clone();
        let _: i64 = Self::bounded("budget ledger reset", cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Creates `ledger` with `spent_nanos` spent and nothing reserved, expiring after
    /// `ttl_secs` (0: never), unless it exists already (another replica was first). `built_ms`
    /// is when the read of that spend from the store began (after [`begin_build`](Self::begin_build));
    /// the costs [`late_costs`](Self::late_costs) kept meanwhile that the read cannot have seen
    /// are added. Returns whether it created it.
    pub async fn init(
        &self,
        ledger: &str,
        spent_nanos: i64,
        ttl_secs: u64,
        built_ms: i64,
    ) -> Result<bool, SharedError> {
        let mut inv = INIT.prepare_invoke();
        inv.key(self.ledger_key(ledger))
            .key(self.building_key(ledger))
            .key(self.late_key(ledger))
            .arg(clamp_amount(spent_nanos))
            .arg(ttl_secs)
            .arg(built_ms);
        let mut conn = self.conn.clone();
        let created: i64 = Self::bounded("budget ledger init", inv.invoke_async(&mut conn)).await?;
        Ok(created == 1)
    }

    /// Costs whose records were written to the store at `written_ms`, by ledger: `(ledger,
    /// [(finished_ms, cost_nanos)])`. Each goes to a ledger that was built from the store after
    /// its request finished and before its record was written, which therefore lacks it (its
    /// record was queued or spilled when the ledger was lost and read again). Returns the sum
    /// added.
    pub async fn late_costs(
        &self,
        written_ms: i64,
        costs: &[(String, Vec<(i64, i64)>)],
    ) -> Result<i64, SharedError> {
        if costs.is_empty() {
            return Ok(0);
        }
        let mut inv = LATE.prepare_invoke();
        inv.arg(written_ms);
        for (ledger, items) in costs {
            inv.key(self.ledger_key(ledger))
                .key(self.building_key(ledger))
                .key(self.late_key(ledger))
                .arg(items.len());
            for (finished, cost) in items {
                inv.arg(*finished).arg(clamp_amount(*cost));
            }
        }
        let mut conn = self.conn.clone();
        Self::bounded("budget late costs", inv.invoke_async(&mut conn)).await
    }

    /// After a call: takes `worst_nanos` off each ledger's reservation (not below zero) and
    /// adds `actual_nanos` to its spend, atomically. Ledgers that no longer exist are left
    /// alone: they are loaded again from the request log, which holds this cost, on next use.
    pub async fn reconcile(
        &self,
        ledgers: &[String],
        holder: &str,
        worst_nanos: i64,
        actual_nanos: i64,
    ) -> Result<(), SharedError> {
        if ledgers.is_empty() {
            return Ok(());
        }
        let mut inv = RECONCILE.prepare_invoke();
        inv.arg(format!("{holder}:{}", clamp_amount(worst_nanos)))
            .arg(clamp_amount(actual_nanos))
            .arg(SETTLED_MARK_SECS);
        inv.key(format!("{}:budget_nusd:settled:{holder}", self.prefix));
        for ledger in ledgers {
            inv.key(self.ledger_key(ledger)).key(self.holds_key(ledger));
        }
        let mut conn = self.conn.clone();
        let _: i64 = Self::bounded("budget reconciliation", inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// The `spent` and `reserved` of a ledger, if it exists (for tests and admin views).
    pub async fn ledger(&self, ledger: &str) -> Result<Option<(i64, i64)>, SharedError> {
        let mut inv = LEDGER.prepare_invoke();
        inv.key(self.ledger_key(ledger)).key(self.holds_key(ledger));
        let mut conn = self.conn.clone();
        let out: Vec<i64> =
            Self::bounded("budget ledger read", inv.invoke_async(&mut conn)).await?;
        match out.as_slice() {
            [0, ..] => Ok(None),
            [1, spent, reserved] => Ok(Some((*spent, *reserved))),
            _ => Err(SharedError::Reply {
                op: "budget ledger read",
                detail: format!("malformed: {out:?}"),
            }),
        }
    }

    /// Deletes `keys`; returns how many existed.
    async fn delete(&self, keys: &[Vec<u8>]) -> Result<u64, SharedError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        Self::bounded(
            "cache clear",
            redis::cmd("DEL").arg(keys).query_async(&mut conn),
        )
        .await
    }
}

#[async_trait]
impl CacheStore for RedisState {
    async fn cache_get(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CacheEntry>, StoreError> {
        let rkey = self.cache_key(key);
        let mut conn = self.conn.clone();
        let raw: Option<String> = Self::bounded(
            "cache read",
            redis::cmd("GET").arg(&rkey).query_async(&mut conn),
        )
        .await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let entry = serde_json::from_str::<StoredEntry<'_>>(&raw)
            .ok()
            .and_then(StoredEntry::into_entry);
        match entry {
            Some(e) if e.expires_at > now => Ok(Some(e)),
            Some(_) => Ok(None),
            None => {
                tracing::warn!(key = %rkey, "corrupt cache entry in Redis; deleting it");
                let _: i64 = Self::bounded(
                    "cache delete",
                    redis::cmd("DEL").arg(&rkey).query_async(&mut conn),
                )
                .await?;
                Ok(None)
            }
        }
    }

    async fn cache_put(&self, entry: &CacheEntry) -> Result<(), StoreError> {
        let ttl_ms = (entry.expires_at - Utc::now()).num_milliseconds();
        if ttl_ms <= 0 {
            return Ok(());
        }
        let json = serde_json::to_string(&StoredEntry::of(entry))
            .map_err(|e| StoreError::Corrupt(format!("cannot encode a cache entry: {e}")))?;
        let mut conn = self.conn.clone();
        let () = Self::bounded(
            "cache write",
            redis::cmd("SET")
                .arg(self.cache_key(&entry.key))
                .arg(json)
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Redis expires entries by itself: nothing to do.
    async fn cache_purge(&self, _now: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn cache_clear(&self, namespace: Option<&str>) -> Result<u64, StoreError> {
        let deleted = self.delete_cache_entries(namespace).await?;
        // After the deletion: a replica that drops its memory copies on the new generation then
        // finds nothing here to copy again.
        let mut conn = self.conn.clone();
        let _: u64 = Self::bounded(
            "cache clear",
            redis::cmd("INCR")
                .arg(self.cache_generation_key())
                .query_async(&mut conn),
        )
        .await?;
        Ok(deleted)
    }

    async fn cache_generation(&self) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let g: Option<u64> = Self::bounded(
            "cache generation read",
            redis::cmd("GET")
                .arg(self.cache_generation_key())
                .query_async(&mut conn),
        )
        .await?;
        Ok(Some(g.unwrap_or(0)))
    }
}

impl RedisState {
    /// Deletes the cache's entries, or those of one namespace; returns how many.
    async fn delete_cache_entries(&self, namespace: Option<&str>) -> Result<u64, StoreError> {
        let pattern = format!("{}:cache:*", glob_escape(&self.prefix));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = Self::bounded(
                "cache clear",
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut conn),
            )
            .await?;
            let doomed = match namespace {
                None => keys,
                Some(ns) if !keys.is_empty() => {
                    let values: Vec<Option<String>> = Self::bounded(
                        "cache clear",
                        redis::cmd("MGET").arg(&keys).query_async(&mut conn),
                    )
                    .await?;
                    keys.into_iter()
                        .zip(values)
                        .filter(|(_, v)| {
                            v.as_deref()
                                .and_then(|v| serde_json::from_str::<StoredEntry<'_>>(v).ok())
                                .is_some_and(|e| e.namespace == ns)
                        })
                        .map(|(k, _)| k)
                        .collect()
                }
                Some(_) => Vec::new(),
            };
            deleted += self.delete(&doomed).await?;
            cursor = next;
            if cursor == 0 {
                return Ok(deleted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_testkit::redis::{TempRedis, redis_available};
    use std::time::Instant;

    fn server() -> Option<TempRedis> {
        if !redis_available() {
            assert_ne!(
                std::env::var("SLUICE_REQUIRE_REDIS").as_deref(),
                Ok("1"),
                "redis-server is required (SLUICE_REQUIRE_REDIS=1) but was not found"
            );
            eprintln!("skipping: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        Some(TempRedis::start().expect("redis-server starts"))
    }

    async fn state(redis: &TempRedis, prefix: &str) -> RedisState {
        RedisState::connect(&redis.url(), prefix)
            .await
            .expect("connects")
    }

    fn spec(rpm: Option<u64>, tpm: Option<u64>, par: Option<u32>) -> LimitSpec {
        LimitSpec {
            rpm,
            tpm,
            max_parallel: par,
        }
    }

    fn admitted(a: &SharedAdmit) -> bool {
        matches!(a, SharedAdmit::Admitted { .. })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_admit_exactly_the_rpm_limit() {
        let Some(redis) = server() else { return };
        let a = state(&redis, "t").await;
        let b = state(&redis, "t").await;
        a.ping().await.expect("ping");
        let subjects = Arc::new(vec![("key:k".to_string(), spec(Some(25), None, None))]);
        let mut tasks = Vec::new();
        for i in 0..100 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let subjects = subjects.clone();
            tasks.push(tokio::spawn(async move { s.admit(&subjects, 0).await }));
        }
        let mut ok = 0;
        let mut refused = 0;
        for t in tasks {
            match t.await.expect("task").expect("admit") {
                SharedAdmit::Admitted { .. } => ok += 1,
                SharedAdmit::Refused {
                    index,
                    kind,
                    limit,
                    retry_after_ms,
                    windows,
                } => {
                    assert_eq!((index, kind, limit), (0, LimitKind::Rpm, 25));
                    let wait = retry_after_ms.expect("a window wait");
                    assert!(wait > 0 && wait <= 60_000, "{wait}");
                    let rpm = windows[0].rpm.expect("rpm window");
                    assert_eq!((rpm.used, rpm.remaining()), (25, 0));
                    refused += 1;
                }
            }
        }
        assert_eq!((ok, refused), (25, 75));
        // Another prefix is another keyspace.
        let other = state(&redis, "other").await;
        assert!(admitted(&other.admit(&subjects, 0).await.expect("admit")));
    }

    #[tokio::test]
    async fn headers_data_after_admission() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let subjects = [("key:k".to_string(), spec(Some(3), Some(1000), None))];
        let first = s.admit(&subjects, 100).await.expect("admit");
        let SharedAdmit::Admitted {
            second, windows, ..
        } = first
        else {
            panic!("admitted: {first:?}")
        };
        assert!(second > 1_700_000_000, "an epoch second: {second}");
        let w = windows[0];
        let rpm = w.rpm.expect("rpm");
        let tpm = w.tpm.expect("tpm");
        assert_eq!((rpm.limit, rpm.used, rpm.remaining()), (3, 1, 2));
        assert_eq!((tpm.limit, tpm.used, tpm.remaining()), (1000, 100, 900));
        // Everything expires when the bucket just charged leaves the window: within 59-60 s.
        assert!(
            (59_000..=60_000).contains(&rpm.reset_ms),
            "{}",
            rpm.reset_ms
        );
        assert_eq!(w.in_flight, None);
    }

    /// The Redis server's clock, in seconds.
    async fn server_second(s: &RedisState) -> i64 {
        let mut conn = s.conn.clone();
        let (secs, _micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .expect("time");
        secs
    }

    /// Sets buckets (second, count) of a window hash.
    async fn seed(s: &RedisState, key: &str, buckets: &[(i64, i64)]) {
        let mut conn = s.conn.clone();
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (second, n) in buckets {
            cmd.arg(second).arg(n);
        }
        let () = cmd.query_async(&mut conn).await.expect("seed");
    }

    #[tokio::test]
    async fn old_buckets_leave_the_window() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let now = server_second(&s).await;
        // Seed the window as if requests had come 60 s (just out) and 59 s ago (still in).
        seed(&s, "t:rl:key:k:rpm", &[(now - 60, 5), (now - 59, 2)]).await;
        let mut conn = s.conn.clone();
        let subjects = [("key:k".to_string(), spec(Some(3), None, None))];
        let SharedAdmit::Admitted {
            second, windows, ..
        } = s.admit(&subjects, 0).await.expect("admit")
        else {
            panic!("2 of 3 used: one more fits");
        };
        assert_eq!(windows[0].rpm.map(|r| r.used), Some(3));
        // The expired bucket is gone.
        let old: Option<i64> = redis::cmd("HGET")
            .arg("t:rl:key:k:rpm")
            .arg(now - 60)
            .query_async(&mut conn)
            .await
            .expect("hget");
        assert_eq!(old, None);
        match s.admit(&subjects, 0).await.expect("admit") {
            SharedAdmit::Refused { retry_after_ms, .. } => {
                // One request must go: the bucket of 59 s ago leaves within a second (or two,
                // should the clock have ticked between the calls).
                let wait = retry_after_ms.expect("a wait");
                let bound = u64::try_from((now - 59 + 60 - second + 1) * 1000).unwrap_or(0);
                assert!(
                    wait > 0 && wait <= bound.max(1000),
                    "{wait} (bound {bound})"
                );
            }
            other => panic!("full: {other:?}"),
        }
    }

    /// Refused by a key whose minute frees up in about a second while the gateway's tokens stay
    /// full for about 55 s: the retry time is the longer wait.
    #[tokio::test]
    async fn a_refusal_waits_for_the_slowest_full_limit() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let now = server_second(&s).await;
        seed(&s, "t:rl:key:k:rpm", &[(now - 59, 1)]).await;
        seed(&s, "t:rl:global:tpm", &[(now - 5, 100)]).await;
        let subjects = [
            ("key:k".to_string(), spec(Some(1), None, None)),
            ("global".to_string(), spec(None, Some(100), None)),
        ];
        match s.admit(&subjects, 10).await.expect("admit") {
            SharedAdmit::Refused {
                index,
                kind,
                retry_after_ms,
                ..
            } => {
                assert_eq!((index, kind), (0, LimitKind::Rpm), "the key refuses first");
                let wait = retry_after_ms.expect("a wait");
                assert!((50_000..=56_000).contains(&wait), "{wait}");
            }
            other => panic!("both full: {other:?}"),
        }
    }

    #[tokio::test]
    async fn tokens_are_reserved_then_settled() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let subjects = [("key:k".to_string(), spec(None, Some(1000), None))];
        let SharedAdmit::Admitted { second, .. } = s.admit(&subjects, 800).await.expect("admit")
        else {
            panic!("the first request fits");
        };
        match s.admit(&subjects, 300).await.expect("admit") {
            SharedAdmit::Refused {
                kind,
                limit,
                retry_after_ms,
                ..
            } => {
                assert_eq!((kind, limit), (LimitKind::Tpm, 1000));
                assert!(retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 60_000));
            }
            other => panic!("800 + 300 > 1000: {other:?}"),
        }
        // The request used only 100 tokens: the rest is released.
        let ids = ["key:k".to_string()];
        s.settle(&ids, second, 100 - 800).await.expect("settle");
        let SharedAdmit::Admitted {
            windows,
            second: later,
            ..
        } = s.admit(&subjects, 300).await.expect("admit")
        else {
            panic!("100 + 300 fits");
        };
        assert_eq!(windows[0].tpm.map(|t| t.used), Some(400));
        // A second that holds nothing of the request's gives nothing back: the window's other
        // tokens belong to other requests.
        s.settle(&ids, second - 5, -1000).await.expect("settle");
        let SharedAdmit::Admitted { windows, .. } = s.admit(&subjects, 0).await.expect("admit")
        else {
            panic!("no tokens always fit");
        };
        assert_eq!(windows[0].tpm.map(|t| t.used), Some(400));
        // Never below zero.
        s.settle(&ids, second, -1_000_000).await.expect("settle");
        s.settle(&ids, later, -1_000_000).await.expect("settle");
        let SharedAdmit::Admitted { windows, .. } = s.admit(&subjects, 1).await.expect("admit")
        else {
            panic!("an empty window admits");
        };
        assert_eq!(windows[0].tpm.map(|t| t.used), Some(1));
        // More than estimated counts too.
        s.settle(&ids, second, 2000).await.expect("settle");
        assert!(!admitted(&s.admit(&subjects, 1).await.expect("admit")));
        // A request without tokens is not held back by tpm (like the in-process limits).
        assert!(admitted(&s.admit(&subjects, 0).await.expect("admit")));
        // A count an upstream got absurdly wrong (u64::MAX tokens) settles, twice, without
        // overflowing the bucket (Redis refused it, and the refusal took Redis for down).
        for _ in 0..2 {
            s.settle(&ids, later, i64::MAX - 10)
                .await
                .expect("settle clamped");
        }
        assert!(!admitted(&s.admit(&subjects, 1).await.expect("admit")));
    }

    #[tokio::test]
    async fn parallel_slots_are_bounded_and_released() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let subjects = [("key:k".to_string(), spec(None, None, Some(2)))];
        let ids = ["key:k".to_string()];
        let holder = |a: SharedAdmit| match a {
            SharedAdmit::Admitted { holder, .. } => holder,
            other => panic!("admitted: {other:?}"),
        };
        let first = holder(s.admit(&subjects, 0).await.expect("admit"));
        // The set lives as long as the slot's hold: it cannot lapse under a running request.
        let mut conn = s.conn.clone();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(s.limit_key("key:k", "par"))
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(ttl > 0 && ttl as u64 + 5_000 >= HOLD_MS, "ttl {ttl} ms");
        let second = s.admit(&subjects, 0).await.expect("admit");
        let SharedAdmit::Admitted { windows, .. } = &second else {
            panic!("two fit: {second:?}")
        };
        assert_eq!(windows[0].in_flight, Some(2));
        match s.admit(&subjects, 0).await.expect("admit") {
            SharedAdmit::Refused {
                kind,
                limit,
                retry_after_ms,
                ..
            } => assert_eq!(
                (kind, limit, retry_after_ms),
                (LimitKind::Parallel, 2, None)
            ),
            other => panic!("a third does not: {other:?}"),
        }
        s.release(&ids, &first).await.expect("release");
        let third = holder(s.admit(&subjects, 0).await.expect("admit"));
        // Releasing the same slot again, or one never taken, frees nothing more.
        for _ in 0..5 {
            s.release(&ids, &first).await.expect("release");
            s.release(&ids, "never-admitted").await.expect("release");
        }
        assert!(!admitted(&s.admit(&subjects, 0).await.expect("admit")));
        s.release(&ids, &third).await.expect("release");
        assert!(admitted(&s.admit(&subjects, 0).await.expect("admit")));
    }

    #[tokio::test]
    async fn a_slot_taken_by_an_admission_whose_answer_never_came_is_given_back() {
        let Some(redis) = server() else { return };
        let link =
            sluice_testkit::partition::Partition::start(&format!("127.0.0.1:{}", redis.port()))
                .await
                .unwrap();
        let s = RedisState::connect(&format!("redis://{}", link.addr()), "t")
            .await
            .expect("connects");
        let subjects = [("key:k".to_string(), spec(None, None, Some(1)))];
        // One admission and release first, so that Redis has the scripts.
        let SharedAdmit::Admitted { holder, .. } = s.admit(&subjects, 0).await.expect("admit")
        else {
            panic!("the slot is free")
        };
        s.release(&["key:k".to_string()], &holder)
            .await
            .expect("release");
        // The script runs and takes the only slot, but its answer is lost and the connection
        // breaks: the admission fails here.
        link.mute();
        let lost = s.admit(&subjects, 0).await;
        assert!(lost.is_err(), "{lost:?}");
        link.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        link.mend();
        // The slot was given back: the next request is admitted, not refused for 15 minutes.
        let start = Instant::now();
        loop {
            let again = s.admit(&subjects, 0).await;
            if again.as_ref().is_ok_and(admitted) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the lost admission still holds the slot: {again:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn slots_of_a_request_that_never_released_lapse() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        // A slot whose hold already lapsed (as if its replica died long ago) is not counted.
        let mut conn = s.conn.clone();
        let key = s.limit_key("key:k", "par");
        let _: i64 = redis::cmd("ZADD")
            .arg(&key)
            .arg(1)
            .arg("dead-replica-request")
            .query_async(&mut conn)
            .await
            .expect("zadd");
        let subjects = [("key:k".to_string(), spec(None, None, Some(1)))];
        let SharedAdmit::Admitted { windows, .. } = s.admit(&subjects, 0).await.expect("admit")
        else {
            panic!("the lapsed slot is free");
        };
        assert_eq!(windows[0].in_flight, Some(1));
    }

    #[tokio::test]
    async fn a_refusal_charges_nothing() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let key = ("key:k".to_string(), spec(Some(10), Some(1000), Some(5)));
        let model = ("model:m".to_string(), spec(Some(1), None, None));
        let subjects = [key.clone(), model];
        assert!(admitted(&s.admit(&subjects, 100).await.expect("first")));
        match s.admit(&subjects, 100).await.expect("second") {
            SharedAdmit::Refused {
                index,
                kind,
                windows,
                ..
            } => {
                assert_eq!((index, kind), (1, LimitKind::Rpm));
                // The key's limits show only the first request.
                let w = windows[0];
                assert_eq!(w.rpm.map(|r| r.used), Some(1));
                assert_eq!(w.tpm.map(|t| t.used), Some(100));
                assert_eq!(w.in_flight, Some(1));
            }
            other => panic!("the model allows one: {other:?}"),
        }
        // The key alone: still one request, 100 tokens, one in flight before this one.
        let SharedAdmit::Admitted { windows, .. } = s.admit(&[key], 100).await.expect("third")
        else {
            panic!("the key has room");
        };
        assert_eq!(windows[0].rpm.map(|r| r.used), Some(2));
        assert_eq!(windows[0].tpm.map(|t| t.used), Some(200));
        assert_eq!(windows[0].in_flight, Some(2));
        // A subject without limits touches nothing.
        let none = [("user:u".to_string(), LimitSpec::default())];
        let SharedAdmit::Admitted { windows, .. } = s.admit(&none, 5).await.expect("admit") else {
            panic!("no limits, no refusal");
        };
        assert_eq!(windows, vec![WindowState::default()]);
    }

    #[tokio::test]
    async fn budgets_reserve_refuse_and_reconcile() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let item = |ledger: &str, limit: i64, worst: i64| BudgetItem {
            ledger: ledger.into(),
            limit_nanos: limit,
            worst_nanos: worst,
            ttl_secs: 3600,
        };
        let items = [
            item("key:a:day:d", 1_000, 300),
            item("team:t:month:m", 10_000, 300),
        ];
        assert_eq!(
            s.reserve(&items, "r0").await.expect("reserve"),
            Reserve::NeedInit(vec![0, 1])
        );
        assert!(s.init("key:a:day:d", 200, 3600, 0).await.expect("init"));
        // Another replica was first: the ledger is kept as it is.
        assert!(!s.init("key:a:day:d", 999, 3600, 0).await.expect("init"));
        assert_eq!(
            s.reserve(&items, "r0").await.expect("reserve"),
            Reserve::NeedInit(vec![1])
        );
        assert_eq!(s.ledger("key:a:day:d").await.expect("read"), Some((200, 0)));
        assert!(s.init("team:t:month:m", 0, 0, 0).await.expect("init"));

        // 200 spent: two reservations of 300 fit (800), a third does not (1100 > 1000).
        assert_eq!(s.reserve(&items, "r1").await.expect("reserve"), Reserve::Ok);
        assert_eq!(s.reserve(&items, "r2").await.expect("reserve"), Reserve::Ok);
        assert_eq!(
            s.reserve(&items, "r3").await.expect("reserve"),
            Reserve::Refused {
                index: 0,
                spent_nanos: 200,
                reserved_nanos: 600
            }
        );
        // Nothing was reserved on the team ledger by the refusal.
        assert_eq!(
            s.ledger("team:t:month:m").await.expect("read"),
            Some((0, 600))
        );

        // The first call cost 50.
        let ledgers = ["key:a:day:d".to_string(), "team:t:month:m".to_string()];
        s.reconcile(&ledgers, "r1", 300, 50)
            .await
            .expect("reconcile");
        assert_eq!(
            s.ledger("key:a:day:d").await.expect("read"),
            Some((250, 300))
        );
        assert_eq!(
            s.ledger("team:t:month:m").await.expect("read"),
            Some((50, 300))
        );
        // Reconciling again (a retry) releases nothing more, and never another's hold.
        s.reconcile(&ledgers, "r1", 300, 0)
            .await
            .expect("reconcile");
        assert_eq!(
            s.ledger("key:a:day:d").await.expect("read"),
            Some((250, 300))
        );
        assert_eq!(s.reserve(&items, "r4").await.expect("reserve"), Reserve::Ok);
        s.reconcile(&ledgers, "r2", 300, 0)
            .await
            .expect("reconcile");
        s.reconcile(&ledgers, "r4", 300, 0)
            .await
            .expect("reconcile");
        assert_eq!(s.ledger("key:a:day:d").await.expect("read"), Some((250, 0)));
        // A ledger that is gone is not recreated by a reconciliation.
        s.reconcile(&["key:gone".to_string()], "r5", 1, 1)
            .await
            .expect("reconcile");
        assert_eq!(s.ledger("key:gone").await.expect("read"), None);

        // A hold whose request never reconciled (its replica died) lapses.
        let mut conn = s.conn.clone();
        let _: i64 = redis::cmd("ZADD")
            .arg(s.holds_key("key:a:day:d"))
            .arg(1)
            .arg("dead:700")
            .query_async(&mut conn)
            .await
            .expect("zadd");
        assert_eq!(s.ledger("key:a:day:d").await.expect("read"), Some((250, 0)));
        assert_eq!(
            s.reserve(&[item("key:a:day:d", 1_000, 750)], "r6")
                .await
                .expect("reserve"),
            Reserve::Ok
        );
    }

    fn entry(key: &str, namespace: &str, ttl: chrono::Duration) -> CacheEntry {
        let now = Utc::now();
        CacheEntry {
            key: key.into(),
            namespace: namespace.into(),
            model: "m".into(),
            body: r#"{"id":"x","choices":[{"message":{"content":"hi \"there\""}}]}"#.into(),
            cost_usd: 0.0125,
            created_at: DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now),
            expires_at: DateTime::from_timestamp_millis((now + ttl).timestamp_millis())
                .unwrap_or(now),
        }
    }

    #[tokio::test]
    async fn cache_put_get_expire_and_clear() {
        let Some(redis) = server() else { return };
        let s = state(&redis, "t").await;
        let e = entry("k1", "ns1", chrono::Duration::seconds(60));
        s.cache_put(&e).await.expect("put");
        assert_eq!(
            s.cache_get("k1", Utc::now()).await.expect("get"),
            Some(e.clone())
        );
        assert_eq!(s.cache_get("missing", Utc::now()).await.expect("get"), None);
        // Expired at the time asked about.
        let later = e.expires_at + chrono::Duration::seconds(1);
        assert_eq!(s.cache_get("k1", later).await.expect("get"), None);
        // An entry that is already expired is not stored.
        s.cache_put(&entry("old", "ns1", chrono::Duration::seconds(-1)))
            .await
            .expect("put");
        assert_eq!(s.cache_get("old", Utc::now()).await.expect("get"), None);
        // Redis expires entries by itself.
        s.cache_put(&entry("short", "ns1", chrono::Duration::milliseconds(150)))
            .await
            .expect("put");
        assert!(
            s.cache_get("short", Utc::now())
                .await
                .expect("get")
                .is_some()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut conn = s.conn.clone();
        let exists: i64 = redis::cmd("EXISTS")
            .arg("t:cache:short")
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert_eq!(exists, 0);
        assert_eq!(s.cache_purge(Utc::now()).await.expect("purge"), 0);

        // A corrupt entry is a miss, and is deleted.
        let () = redis::cmd("SET")
            .arg("t:cache:bad")
            .arg("not json")
            .query_async(&mut conn)
            .await
            .expect("set");
        assert_eq!(s.cache_get("bad", Utc::now()).await.expect("get"), None);
        let exists: i64 = redis::cmd("EXISTS")
            .arg("t:cache:bad")
            .query_async(&mut conn)
            .await
            .expect("exists");
        assert_eq!(exists, 0);

        // Clear by namespace, over more keys than one SCAN step.
        for i in 0..1200 {
            let ns = if i % 3 == 0 { "ns2" } else { "ns1" };
            s.cache_put(&entry(&format!("k{i}"), ns, chrono::Duration::seconds(60)))
                .await
                .expect("put");
        }
        // Other prefixes and other keys of this prefix are left alone.
        let other = state(&redis, "u").await;
        other
            .cache_put(&entry("k0", "ns2", chrono::Duration::seconds(60)))
            .await
            .expect("put");
        s.init("keep", 0, 0, 0).await.expect("init");
        let generation = || async { s.cache_generation().await.expect("generation") };
        assert_eq!(generation().await, Some(0));
        assert_eq!(s.cache_clear(Some("ns2")).await.expect("clear"), 400);
        // Every clear moves the generation on; other prefixes have their own.
        assert_eq!(generation().await, Some(1));
        assert_eq!(other.cache_generation().await.expect("generation"), Some(0));
        assert_eq!(s.cache_get("k0", Utc::now()).await.expect("get"), None);
        assert!(s.cache_get("k1", Utc::now()).await.expect("get").is_some());
        assert_eq!(s.cache_clear(Some("ns2")).await.expect("clear"), 0);
        assert_eq!(s.cache_clear(None).await.expect("clear"), 800);
        assert_eq!(generation().await, Some(3));
        assert!(
            other
                .cache_get("k0", Utc::now())
                .await
                .expect("get")
                .is_some()
        );
        assert!(s.ledger("keep").await.expect("read").is_some());
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("sluice"), "sluice");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_redis_fails_fast_and_recovers() {
        let Some(mut redis) = server() else { return };
        let s = state(&redis, "t").await;
        let subjects = [("key:k".to_string(), spec(Some(100), None, Some(10)))];
        assert!(admitted(&s.admit(&subjects, 0).await.expect("admit")));

        redis.stop();
        for _ in 0..3 {
            let started = Instant::now();
            let e = s.admit(&subjects, 0).await.expect_err("Redis is down");
            assert!(started.elapsed() < Duration::from_secs(2), "{e}");
            assert!(e.to_string().contains("shared state (Redis)"), "{e}");
            let started = Instant::now();
            assert!(s.ping().await.is_err());
            assert!(s.cache_get("x", Utc::now()).await.is_err());
            assert!(started.elapsed() < Duration::from_secs(4));
        }
        // A client made while Redis is down: connect fails fast, connect_lazy succeeds.
        let started = Instant::now();
        assert!(RedisState::connect(&redis.url(), "t").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        let lazy = RedisState::connect_lazy(&redis.url(), "t").expect("lazy");
        assert!(lazy.ping().await.is_err());

        redis.restart().expect("restart");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.admit(&subjects, 0).await {
                Ok(a) => {
                    assert!(admitted(&a));
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "still failing: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = lazy.ping().await {
            assert!(Instant::now() < deadline, "lazy still failing: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_call_after_a_redis_restart_succeeds() {
        let Some(mut redis) = server() else { return };
        let s = state(&redis, "t").await;
        let subjects = [("key:k".to_string(), spec(Some(100), None, None))];
        assert!(admitted(&s.admit(&subjects, 0).await.expect("admit")));
        for _ in 0..2 {
            redis.stop();
            redis.restart().expect("restart");
            // Redis answers again (restart waits for PING); the old connection is closed.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let a = s
                .admit(&subjects, 0)
                .await
                .expect("the first call after the restart");
            assert!(admitted(&a));
        }
    }

    #[test]
    fn errors_say_what_failed() {
        let e = SharedError::Timeout {
            op: "rate limit admission",
            after: CALL_TIMEOUT,
        };
        assert_eq!(
            e.to_string(),
            "shared state (Redis) did not answer within 1500 ms during rate limit admission; \
             check that Redis at `state.redis_url` is up and reachable"
        );
        let store: StoreError = e.into();
        assert!(matches!(store, StoreError::Database(_)));
    }
}
