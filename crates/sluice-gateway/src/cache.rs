//! The exact cache: answers to requests seen before, served without calling a provider.
//!
//! A request is looked up by [`cache_key`]: a SHA-256 over its namespace ([`CacheConfig::namespace_for`])
//! and a canonical JSON of every field that can change the answer. [`is_deterministic`] (or the
//! operator's `nondeterministic = true`) decides whether it may be cached at all, and
//! [`CacheControl`] carries what the client asked for (`cache: {ttl, no_store, no_cache}` in the
//! body, or `Cache-Control`).
//!
//! [`Cache`] has two tiers: a bounded [`MemoryCache`] in the process (TinyLFU admission, LRU
//! eviction, per-entry expiry) in front of an optional persistent [`CacheStore`] (SQLite by
//! default, PostgreSQL or Redis when configured). A lookup tries memory, then the store, and puts
//! a store hit in memory; a store that fails or hangs only makes misses. [`Cache::store`] writes
//! memory at once and the store in the background, through a bounded number of writes in flight.
//!
//! Entries hold a whole `chat.completion` as JSON; [`replay`] turns one back into the chunks of
//! an OpenAI stream, so streaming requests are served from the same entries.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sluice_core::error::Error;
use sluice_core::usage::{CacheEntry, CacheStore};
use sluice_types::anthropic::{THINKING_BLOCKS, TOOL_CALLS_BEFORE};
use sluice_types::openai::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, ChunkChoice, Delta, Extra, FunctionCallDelta,
    Role, ToolCallDelta,
};
use tokio::sync::Semaphore;

/// The longest an entry may live, whatever the configuration or the request asks: one year.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long a lookup waits for the persistent tier before counting a miss.
const REMOTE_GET_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a background write to the persistent tier may take before it is abandoned.
const REMOTE_PUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Background writes to the persistent tier in flight at once; beyond this, writes are dropped
/// (the answer stays in memory).
const MAX_REMOTE_PUTS: u32 = 64;

/// At most one warning about the persistent tier per this long; the next one says how many
/// were left out.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Bytes an entry is taken to use besides its strings (the entry, its `Arc`, the cache's node).
const ENTRY_OVERHEAD: u64 = 160;

/// Characters per content chunk of a replayed stream.
const REPLAY_PIECE_CHARS: usize = 32;

/// Top-level request fields that do not change the answer and so are not part of the key.
/// Everything else is, unknown vendor fields included.
const IGNORED_FIELDS: &[&str] = &[
    // How the answer is delivered, not what it is ([`replay`] serves either way).
    "stream",
    "stream_options",
    // Attribution and provider-side bookkeeping.
    "user",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    // This cache's own control.
    "cache",
];

/// Whose answers a request may be served: the namespace entries are kept in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// One namespace for everyone.
    Global,
    /// One namespace per virtual key.
    #[default]
    Key,
    /// One namespace per team (the key owner's team).
    Team,
}

/// `[cache]` in `sluice.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Serve repeated requests from the cache (default false).
    pub enabled: bool,
    /// How long an answer is kept, in seconds, unless the request asks otherwise (default 3600,
    /// at most a year).
    pub ttl_secs: u64,
    /// The most answers the in-memory tier keeps (default 10 000).
    pub max_entries: u64,
    /// The most bytes of answers the in-memory tier keeps (default 64 MiB).
    pub max_bytes: u64,
    /// Who shares answers: `global`, `key` (default) or `team`. A request without a key (or, for
    /// `team`, without a team) falls back as [`CacheConfig::namespace_for`] says.
    pub namespace: Namespace,
    /// Keep answers in the persistent store too, across restarts and replicas (default true).
    pub persist: bool,
    /// Also cache requests that sample (temperature above 0 and no seed): every later identical
    /// request then gets the same answer (default false).
    pub nondeterministic: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            ttl_secs: 3600,
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            namespace: Namespace::Key,
            persist: true,
            nondeterministic: false,
        }
    }
}

impl CacheConfig {
    /// Checks the bounds; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl_secs == 0 {
            return Err(
                "cache.ttl_secs: must be at least 1 (to cache nothing, set enabled = false)".into(),
            );
        }
        if self.ttl_secs > MAX_TTL.as_secs() {
            return Err(format!(
                "cache.ttl_secs: must be at most {} (one year), got {}",
                MAX_TTL.as_secs(),
                self.ttl_secs
            ));
        }
        if self.max_entries == 0 {
            return Err("cache.max_entries: must be at least 1".into());
        }
        if self.max_bytes < 1024 {
            return Err(format!(
                "cache.max_bytes: must be at least 1024, got {}",
                self.max_bytes
            ));
        }
        Ok(())
    }

    /// The default time to live.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs).min(MAX_TTL)
    }

    /// The namespace of a request made with `key_id` by a key of `team`: `global`, `key:ID` or
    /// `team:NAME`. Under `team`, a key without a team keeps its answers to itself (`key:ID`)
    /// rather than sharing them with everyone; a request without a key uses `global`.
    pub fn namespace_for(&self, key_id: Option<&str>, team: Option<&str>) -> String {
        match (self.namespace, key_id, team) {
            (Namespace::Team, _, Some(t)) => format!("team:{t}"),
            (Namespace::Team | Namespace::Key, Some(k), _) => format!("key:{k}"),
            _ => "global".to_string(),
        }
    }
}

/// What the client asked of the cache for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// How long to keep this answer, instead of the configured TTL (at most [`MAX_TTL`]). Also
    /// the oldest answer the client accepts: see [`CacheControl::accepts`].
    pub ttl: Option<Duration>,
    /// Do not store this answer (also set by a TTL of 0).
    pub no_store: bool,
    /// Do not serve a cached answer; fetch a fresh one (which is stored unless `no_store`).
    pub no_cache: bool,
}

/// One source's settings before merging: `None` where it says nothing.
#[derive(Default)]
struct Asked {
    ttl: Option<Duration>,
    no_store: Option<bool>,
    no_cache: Option<bool>,
}

impl CacheControl {
    /// Reads the request's `cache` object (`body`: the value of the body's `cache` field, e.g.
    /// `req.extra.get("cache")`) and its `Cache-Control` header. Where both set a thing, the body
    /// wins. Unknown body fields, wrong types and a malformed `max-age` are 400s; unknown header
    /// directives are ignored, as HTTP does.
    pub fn parse(body: Option<&Value>, header: Option<&str>) -> Result<CacheControl, Error> {
        let b = match body {
            Some(v) => parse_body(v)?,
            None => Asked::default(),
        };
        let h = match header {
            Some(s) => parse_header(s)?,
            None => Asked::default(),
        };
        let ttl = b.ttl.or(h.ttl).map(|d| d.min(MAX_TTL));
        Ok(CacheControl {
            ttl,
            no_store: b.no_store.or(h.no_store).unwrap_or(false) || ttl == Some(Duration::ZERO),
            no_cache: b.no_cache.or(h.no_cache).unwrap_or(false),
        })
    }

    /// Whether a cached answer may be served.
    pub fn may_serve(&self) -> bool {
        !self.no_cache
    }

    /// Whether the answer may be stored.
    pub fn may_store(&self) -> bool {
        !self.no_store
    }

    /// Whether `entry` is fresh enough for this request: no older than its TTL, when it set
    /// one (as `max-age` means in HTTP). An entry stored under a longer TTL by another request
    /// is then a miss for this one.
    pub fn accepts(&self, entry: &CacheEntry, now: DateTime<Utc>) -> bool {
        match self.ttl {
            None => true,
            Some(ttl) => (now - entry.created_at)
                .to_std()
                .map_or(true, |age| age < ttl),
        }
    }
}

fn parse_body(v: &Value) -> Result<Asked, Error> {
    let obj = match v {
        Value::Null => return Ok(Asked::default()),
        Value::Object(o) => o,
        other => {
            return Err(invalid(format!(
                "`cache` must be an object such as {{\"ttl\": 60, \"no_store\": false, \"no_cache\": false}}, got {}",
                describe(other)
            )));
        }
    };
    let mut asked = Asked::default();
    for (name, value) in obj {
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            "ttl" => {
                let secs = value.as_u64().ok_or_else(|| {
                    invalid(format!(
                        "`cache.ttl` must be a whole number of seconds, 0 or more; got {}",
                        describe(value)
                    ))
                })?;
                asked.ttl = Some(Duration::from_secs(secs));
            }
            "no_store" | "no_cache" => {
                let b = value.as_bool().ok_or_else(|| {
                    invalid(format!(
                        "`cache.{name}` must be true or false, got {}",
                        describe(value)
                    ))
                })?;
                if name == "no_store" {
                    asked.no_store = Some(b);
                } else {
                    asked.no_cache = Some(b);
                }
            }
            _ => {
                return Err(invalid(format!(
                    "unknown field `cache.{}`; `cache` takes `ttl`, `no_store` and `no_cache`",
                    clip(name)
                )));
            }
        }
    }
    Ok(asked)
}

fn parse_header(s: &str) -> Result<Asked, Error> {
    let mut asked = Asked::default();
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (name, arg) = match directive.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (directive, None),
        };
        if name.eq_ignore_ascii_case("no-store") {
            asked.no_store = Some(true);
        } else if name.eq_ignore_ascii_case("no-cache") {
            asked.no_cache = Some(true);
        } else if name.eq_ignore_ascii_case("max-age") {
            let raw = arg.unwrap_or("");
            let digits = raw
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or(raw);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(format!(
                    "`Cache-Control: max-age` must be a whole number of seconds, got `{}`",
                    clip(raw)
                )));
            }
            // All digits: only overflow can fail, and a huge age means "as long as allowed".
            let secs = digits.parse::<u64>().unwrap_or(u64::MAX);
            asked.ttl = Some(Duration::from_secs(secs));
        }
    }
    Ok(asked)
}

fn invalid(message: String) -> Error {
    Error::invalid(message).with_param("cache")
}

/// A JSON value for an error message: its kind, and the value itself when short.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string \"{}\"", clip(s)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// At most 40 characters of client input for a message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The cache key of `req` in `namespace`: hex SHA-256 over the namespace and the request's
/// canonical JSON. The canonical JSON leaves out the fields that do not change the answer
/// (`stream`, `stream_options`, `user`, `safety_identifier`, `metadata`, `store`,
/// `service_tier`, `prompt_cache_key`, `cache`) and sorts object keys at every depth but inside
/// JSON Schemas (a tool's `parameters`, a `response_format`'s `schema`, any object with
/// `properties` such as vLLM's `guided_json`), where the order of properties is the order the
/// model writes them in; every other field is kept, unknown ones
/// included (tools, `tool_choice`, `response_format`,
/// `parallel_tool_calls`, `logit_bias`, `reasoning_effort`, a prompt reference and its version,
/// …). Numbers are kept as written, so `1` and `1.0` in an unknown field make different keys: a
/// miss, never a wrong hit.
pub fn cache_key(namespace: &str, req: &ChatRequest) -> String {
    let mut h = Sha256::new();
    h.update(b"sluice-cache-v1\0");
    h.update((namespace.len() as u64).to_le_bytes());
    h.update(namespace.as_bytes());
    match canonical_json(req) {
        Some(json) => h.update(json.as_bytes()),
        // Not reachable for a parsed request; the debug form still tells requests apart.
        None => h.update(format!("debug:{req:?}").as_bytes()),
    }
    hex(&h.finalize())
}

/// The request as compact JSON with the ignored fields left out and keys sorted.
fn canonical_json(req: &ChatRequest) -> Option<String> {
    let mut v = serde_json::to_value(req).ok()?;
    if let Value::Object(m) = &mut v {
        for f in IGNORED_FIELDS {
            m.remove(*f);
        }
    }
    Some(sorted(v).to_string())
}

/// The fields whose value is a JSON Schema: kept in their order.
const SCHEMA_FIELDS: [&str; 3] = ["parameters", "schema", "input_schema"];

/// `v` with every object's keys inserted in sorted order, which both of serde_json's map types
/// (sorted, or in insertion order with `preserve_order`) then write in that order; JSON Schemas
/// ([`SCHEMA_FIELDS`], and any object with `properties`, such as vLLM's `guided_json`) as they
/// are.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) if m.contains_key("properties") => Value::Object(m),
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::with_capacity(entries.len());
            for (k, v) in entries {
                let v = if SCHEMA_FIELDS.contains(&k.as_str()) {
                    v
                } else {
                    sorted(v)
                };
                out.insert(k, v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Removes the body's `cache` object so that it is never sent upstream.
pub fn strip_control(req: &mut ChatRequest) {
    req.extra.remove("cache");
}

/// Whether the request asks for a reproducible answer: `temperature` 0, or a `seed`. Without
/// either it samples (OpenAI's default temperature is 1) and is cached only when the operator
/// opts in. `top_p` alone does not count: providers treat `top_p: 0` differently (rejected,
/// clamped to a small value, or greedy).
pub fn is_deterministic(req: &ChatRequest) -> bool {
    req.temperature == Some(0.0) || req.seed.is_some()
}

/// The in-process tier: at most `max_entries` entries and `max_bytes` bytes, TinyLFU admission
/// and LRU eviction (moka), each entry dropped at its `expires_at`.
///
/// moka has one capacity, so both bounds go through the weigher: the capacity is `max_bytes`,
/// and an entry weighs its size in bytes (strings plus a fixed overhead) but at least
/// `max_bytes / max_entries` (rounded up). Then the weights' sum bounds the bytes, and no more
/// than `max_entries` entries fit; small entries count against the entry bound, large ones
/// against the byte bound. Like moka's, the bounds hold once pending maintenance has run (moka
/// runs it on its own as the cache is used).
pub struct MemoryCache {
    inner: moka::sync::Cache<String, Arc<CacheEntry>>,
    capacity: u64,
    floor: u32,
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.inner.entry_count())
            .field("weighted_size", &self.inner.weighted_size())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl MemoryCache {
    /// An empty tier with these bounds (each at least 1).
    pub fn new(max_entries: u64, max_bytes: u64) -> Self {
        let max_entries = max_entries.max(1);
        let floor = u32::try_from(max_bytes.max(1).div_ceil(max_entries)).unwrap_or(u32::MAX);
        // Keeps `capacity / floor <= max_entries` when the floor had to be cut to fit a u32.
        let capacity = max_bytes
            .max(1)
            .min(u64::from(floor).saturating_mul(max_entries));
        let inner = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(move |_key: &String, e: &Arc<CacheEntry>| weight(e, floor))
            .expire_after(ExpiresAt)
            .build();
        MemoryCache {
            inner,
            capacity,
            floor,
        }
    }

    /// The entry under `key`, unless it is missing or expired at `now`.
    pub fn get(&self, key: &str, now: DateTime<Utc>) -> Option<Arc<CacheEntry>> {
        self.inner.get(key).filter(|e| e.expires_at > now)
    }

    /// Adds or replaces an entry under its key. Returns false, storing nothing, for an entry
    /// larger than the whole tier. Admission is TinyLFU's: when the tier is full, a new entry
    /// may be turned away in favour of more popular ones.
    pub fn insert(&self, entry: Arc<CacheEntry>) -> bool {
        if size(&entry) > u64::from(u32::MAX)
            || u64::from(weight(&entry, self.floor)) > self.capacity
        {
            return false;
        }
        self.inner.insert(entry.key.clone(), entry);
        true
    }

    /// Removes the entries of `namespace`, or all; returns how many there were.
    pub fn clear(&self, namespace: Option<&str>) -> u64 {
        let mut n = 0;
        for (key, e) in self.inner.iter() {
            if namespace.is_none_or(|ns| e.namespace == ns) {
                self.inner.invalidate(key.as_str());
                n += 1;
            }
        }
        n
    }

    /// Entries held (approximate until pending maintenance runs).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// The weights' sum: bytes held, with small entries counted at the floor weight.
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Runs pending evictions and expirations now.
    pub fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks();
    }
}

/// An entry's size in bytes.
fn size(e: &CacheEntry) -> u64 {
    (e.body.len() + e.key.len() + e.namespace.len() + e.model.len()) as u64 + ENTRY_OVERHEAD
}

fn weight(e: &CacheEntry, floor: u32) -> u32 {
    u32::try_from(size(e)).unwrap_or(u32::MAX).max(floor)
}

/// moka's per-entry expiry: at the entry's `expires_at`.
struct ExpiresAt;

impl moka::Expiry<String, Arc<CacheEntry>> for ExpiresAt {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<CacheEntry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(remaining(value))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<CacheEntry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining(value))
    }
}

fn remaining(e: &CacheEntry) -> Duration {
    (e.expires_at - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO)
}

/// A cache entry for an answer made now: expires after `ttl` or the configured TTL, whichever
/// is shorter (at most [`MAX_TTL`]). A TTL of 0 gives an entry that is already expired, which [`Cache::store`]
/// drops; a cost that is not a non-negative number is stored as 0.
pub fn entry(
    config: &CacheConfig,
    key: &str,
    namespace: &str,
    model: &str,
    completion_json: String,
    cost_usd: f64,
    ttl: Option<Duration>,
) -> CacheEntry {
    let created_at = Utc::now();
    // A request may keep its answer for less than the configured time, not for longer (a
    // client asking a year filled the shared tier for a year).
    let ttl = ttl
        .map_or_else(|| config.ttl(), |t| t.min(config.ttl()))
        .min(MAX_TTL);
    let expires_at = chrono::TimeDelta::from_std(ttl)
        .ok()
        .and_then(|d| created_at.checked_add_signed(d))
        .unwrap_or(created_at);
    CacheEntry {
        key: key.to_string(),
        namespace: namespace.to_string(),
        model: model.to_string(),
        body: completion_json,
        cost_usd: if cost_usd.is_finite() && cost_usd > 0.0 {
            cost_usd
        } else {
            0.0
        },
        created_at,
        expires_at,
    }
}

/// Lets one warning through per [`WARN_EVERY`], counting the ones held back.
struct Throttle {
    origin: Instant,
    /// Milliseconds after `origin` of the last warning; `u64::MAX` before the first.
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    fn new() -> Self {
        Throttle {
            origin: Instant::now(),
            last_ms: AtomicU64::new(u64::MAX),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(warnings held back since the last one)` when a warning may go out at `now`.
    fn allow(&self, now: Instant) -> Option<u64> {
        let at = u64::try_from(now.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX - 1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || at >= last.saturating_add(WARN_EVERY.as_millis() as u64);
        if due
            && self
                .last_ms
                .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn warn(&self, op: &'static str, error: &dyn fmt::Display) {
        if let Some(held_back) = self.allow(Instant::now()) {
            tracing::warn!(
                op,
                error = %error,
                held_back,
                "cache store failed; the cache goes on with its in-memory tier (a failed lookup is a miss)"
            );
        }
    }
}

/// The tiered exact cache: [`MemoryCache`] in front of an optional persistent [`CacheStore`].
///
/// It does not look at [`CacheConfig::enabled`]: build one only when the cache is on. Use
/// [`Cache::cacheable`], [`CacheControl`] and [`cache_key`] to decide what to look up and
/// store.
pub struct Cache {
    config: CacheConfig,
    memory: MemoryCache,
    remote: Option<Arc<dyn CacheStore>>,
    puts: Arc<Semaphore>,
    warnings: Arc<Throttle>,
    /// Clears running now, and begun so far: a lookup keeps what it read from the shared tier
    /// in memory only if no clear ran meanwhile.
    clearing: AtomicUsize,
    clears: AtomicU64,
    /// The shared tier's generation last seen (see [`follow_clears`](Self::follow_clears)).
    generation: parking_lot::Mutex<Option<u64>>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.config)
            .field("memory", &self.memory)
            .field("remote", &self.remote.is_some())
            .finish()
    }
}

/// The cache's shared tier: Redis when configured (shared by the replicas, whatever `persist`
/// says), else the store when `persist` is on, else none.
pub fn shared_tier(
    persist: bool,
    redis: Option<Arc<dyn CacheStore>>,
    store: Arc<dyn CacheStore>,
) -> Option<Arc<dyn CacheStore>> {
    redis.or_else(|| persist.then_some(store))
}

impl Cache {
    /// A cache with `config`'s memory bounds and `remote` as its shared tier (Redis, or the store;
    /// the caller leaves the store out when `config.persist` is off).
    pub fn new(config: CacheConfig, remote: Option<Arc<dyn CacheStore>>) -> Self {
        let memory = MemoryCache::new(config.max_entries, config.max_bytes);
        Cache {
            config,
            memory,
            remote,
            puts: Arc::new(Semaphore::new(MAX_REMOTE_PUTS as usize)),
            warnings: Arc::new(Throttle::new()),
            clearing: AtomicUsize::new(0),
            clears: AtomicU64::new(0),
            generation: parking_lot::Mutex::new(None),
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The in-memory tier (for its size in metrics).
    pub fn memory(&self) -> &MemoryCache {
        &self.memory
    }

    /// Whether `req` may be cached: it is deterministic, or the operator opted in to caching
    /// requests that sample.
    pub fn cacheable(&self, req: &ChatRequest) -> bool {
        self.config.nondeterministic || is_deterministic(req)
    }

    /// The unexpired entry under `key`: from memory, else from the persistent tier (which then
    /// goes in memory). A persistent tier that fails or takes longer than 250 ms makes a miss
    /// and a (rate-limited) warning.
    pub async fn lookup(&self, key: &str) -> Option<Arc<CacheEntry>> {
        let now = Utc::now();
        if let Some(e) = self.memory.get(key, now) {
            return Some(e);
        }
        let remote = self.remote.as_ref()?;
        let clears = self.clears.load(Ordering::Acquire);
        match tokio::time::timeout(REMOTE_GET_TIMEOUT, remote.cache_get(key, now)).await {
            Ok(Ok(Some(e))) if e.key == key && e.expires_at > now => {
                let e = Arc::new(e);
                // An entry read while a clear ran may be one it deletes: it answers this
                // request, but memory does not keep it.
                if self.clearing.load(Ordering::Acquire) == 0
                    && self.clears.load(Ordering::Acquire) == clears
                {
                    self.memory.insert(e.clone());
                }
                Some(e)
            }
            Ok(Ok(_)) => None,
            Ok(Err(err)) => {
                self.warnings.warn("get", &err);
                None
            }
            Err(_) => {
                self.warnings.warn("get", &"no answer within 250 ms");
                None
            }
        }
    }

    /// Stores an entry: in memory now, in the persistent tier in the background (errors are
    /// logged; with too many writes in flight, or outside a Tokio runtime, the write is
    /// skipped). An entry already expired is dropped.
    pub fn store(&self, entry: CacheEntry) {
        if entry.expires_at <= Utc::now() {
            return;
        }
        let entry = Arc::new(entry);
        self.memory.insert(entry.clone());
        let Some(remote) = &self.remote else { return };
        let Ok(permit) = self.puts.clone().try_acquire_owned() else {
            self.warnings.warn(
                "put",
                &"too many writes in flight; this answer is kept in memory only",
            );
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.warnings.warn("put", &"no Tokio runtime to write from");
            return;
        };
        let remote = remote.clone();
        let warnings = self.warnings.clone();
        runtime.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(REMOTE_PUT_TIMEOUT, remote.cache_put(&entry)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warnings.warn("put", &err),
                Err(_) => warnings.warn("put", &"no answer within 5 s"),
            }
        });
    }

    /// Waits for the background writes in flight to finish (for shutdown, and before a clear).
    pub async fn flush(&self) {
        let _all = self.puts.acquire_many(MAX_REMOTE_PUTS).await;
    }

    /// Deletes every entry, or those of one namespace, in both tiers. Returns the larger of the
    /// two tiers' counts: at least that many distinct answers went. `Err` when the shared tier
    /// (Redis or the store) could not be cleared: its entries would still be served.
    pub async fn clear(&self, namespace: Option<&str>) -> Result<u64, String> {
        struct Clearing<'a>(&'a Cache);
        impl Drop for Clearing<'_> {
            fn drop(&mut self) {
                self.0.clearing.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.clearing.fetch_add(1, Ordering::AcqRel);
        self.clears.fetch_add(1, Ordering::AcqRel);
        let _clearing = Clearing(self);
        self.flush().await;
        let in_memory = self.memory.clear(namespace);
        let stored = match &self.remote {
            Some(r) => r.cache_clear(namespace).await.map_err(|err| {
                tracing::warn!(namespace, error = %err, "clearing the cache store failed");
                err.to_string()
            })?,
            None => 0,
        };
        // Again: a lookup that read the shared tier just before the clear began may have put
        // its entry in memory meanwhile.
        self.memory.clear(namespace);
        // This clear's own generation is no news to this replica (its memory is cleared), so
        // the next poll does not drop the rest of memory for it.
        if let Some(r) = &self.remote
            && let Ok(Some(now)) = r.cache_generation().await
        {
            *self.generation.lock() = Some(now);
        }
        Ok(in_memory.max(stored))
    }

    /// Drops this replica's memory copies once another replica cleared the shared tier (its
    /// [generation](CacheStore::cache_generation) moved on since last seen), so that a clear
    /// reaches every replica. For a background task, every second; does nothing without a
    /// shared tier.
    pub async fn follow_clears(&self) {
        let Some(remote) = &self.remote else { return };
        if let Ok(Some(now)) = remote.cache_generation().await {
            let mut seen = self.generation.lock();
            if seen.is_some_and(|before| before != now) {
                // Like a clear here: a lookup that read the shared tier meanwhile keeps nothing.
                self.clears.fetch_add(1, Ordering::AcqRel);
                let dropped = self.memory.clear(None);
                tracing::debug!(
                    dropped,
                    "the cache was cleared elsewhere; memory copies dropped"
                );
            }
            *seen = Some(now);
        }
    }

    /// Whether the cache has a shared tier.
    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    /// Deletes the persistent tier's expired entries (memory expires its own); returns how many.
    /// For a periodic background task.
    pub async fn purge(&self) -> u64 {
        self.memory.run_pending_tasks();
        match &self.remote {
            Some(r) => r.cache_purge(Utc::now()).await.unwrap_or_else(|err| {
                self.warnings.warn("purge", &err);
                0
            }),
            None => 0,
        }
    }
}

/// The chunks of the OpenAI stream that would have delivered `completion`: per choice, a chunk
/// with `role: assistant` (and `content: ""` when the message has content), the content in
/// pieces of [`REPLAY_PIECE_CHARS`] characters, the refusal likewise, each tool call as one
/// chunk with its index, id, type and name then pieces of its arguments, and a chunk with the
/// finish reason; then, with `include_usage`, a chunk with no choices and the usage (left out
/// when the completion has none). Every chunk carries the completion's id, created, model,
/// system fingerprint and unknown top-level fields (e.g. `service_tier`). A choice's logprobs
/// go whole on its first content chunk (or its finish chunk), the message's unknown fields
/// (e.g. `annotations`) on the role chunk's delta, but thinking blocks that came between tool
/// calls (interleaved thinking), which go in a chunk of their own before the call they preceded.
///
/// Earlier chunks leave `usage` out rather than writing `"usage": null`, which
/// [`ChatCompletionChunk`] cannot express; clients read both the same way.
pub fn replay(completion: &ChatCompletion, include_usage: bool) -> Vec<ChatCompletionChunk> {
    let chunk = |choice: Option<ChunkChoice>| ChatCompletionChunk {
        choices: choice.into_iter().collect(),
        system_fingerprint: completion.system_fingerprint.clone(),
        extra: completion.extra.clone(),
        ..ChatCompletionChunk::new(&completion.id, &completion.model, completion.created)
    };
    let mut out = Vec::new();
    for choice in &completion.choices {
        let msg = &choice.message;
        let i = choice.index;
        let mut logprobs = choice.logprobs.clone();
        // Thinking blocks that came between tool calls (Anthropic's interleaved thinking) go
        // where they stood, not all up front: a client sends the signed blocks back in order.
        let (mut role_extra, mut later) = (msg.extra.clone(), Vec::new());
        if let Some(Value::Array(blocks)) = msg.extra.get(THINKING_BLOCKS) {
            let before = |b: &Value| {
                b.get(TOOL_CALLS_BEFORE)
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            if blocks.iter().any(|b| before(b) > 0) {
                // Each entry says its place in the whole list: the OpenAI SDKs' stream helpers
                // merge list deltas by `index`, and refuse a second one without it.
                let (first, rest): (Vec<Value>, Vec<Value>) = blocks
                    .iter()
                    .enumerate()
                    .map(|(n, b)| {
                        let mut b = b.clone();
                        if let Some(o) = b.as_object_mut() {
                            o.insert("index".into(), n.into());
                        }
                        b
                    })
                    .partition(|b| before(b) == 0);
                role_extra.insert(THINKING_BLOCKS.into(), Value::Array(first));
                later = rest.into_iter().map(|b| (before(&b), b)).collect();
            }
        }
        let thinking_after = |calls: u64, later: &[(u64, Value)]| {
            let blocks: Vec<Value> = later
                .iter()
                .filter(|(n, _)| *n == calls)
                .map(|(_, b)| b.clone())
                .collect();
            (!blocks.is_empty()).then(|| {
                let mut extra = Extra::new();
                extra.insert(THINKING_BLOCKS.into(), Value::Array(blocks));
                chunk(Some(ChunkChoice::new(
                    i,
                    Delta {
                        extra,
                        ..Delta::default()
                    },
                    None,
                )))
            })
        };
        out.push(chunk(Some(ChunkChoice::new(
            i,
            Delta {
                role: Some(Role::Assistant),
                content: msg.content.as_ref().map(|_| String::new()),
                extra: role_extra,
                ..Delta::default()
            },
            None,
        ))));
        for piece in pieces(msg.content.as_deref().unwrap_or("")) {
            let mut c = ChunkChoice::new(
                i,
                Delta {
                    content: Some(piece.to_string()),
                    ..Delta::default()
                },
                None,
            );
            c.logprobs = logprobs.take();
            out.push(chunk(Some(c)));
        }
        for piece in pieces(msg.refusal.as_deref().unwrap_or("")) {
            out.push(chunk(Some(ChunkChoice::new(
                i,
                Delta {
                    refusal: Some(piece.to_string()),
                    ..Delta::default()
                },
                None,
            ))));
        }
        let calls = msg.tool_calls.as_ref().map_or(0, Vec::len);
        for (t, call) in msg.tool_calls.iter().flatten().enumerate() {
            out.extend(thinking_after(t as u64, &later));
            let index = u32::try_from(t).unwrap_or(u32::MAX);
            let tool_delta = |d: ToolCallDelta| {
                chunk(Some(ChunkChoice::new(
                    i,
                    Delta {
                        tool_calls: Some(vec![d]),
                        ..Delta::default()
                    },
                    None,
                )))
            };
            out.push(tool_delta(ToolCallDelta {
                index,
                id: Some(call.id.clone()),
                kind: Some(call.kind.clone()),
                // A call of another type (`custom`) has no function: its object is in `extra`.
                function: (!call.function.is_absent()).then(|| FunctionCallDelta {
                    name: Some(call.function.name.clone()),
                    arguments: Some(String::new()),
                }),
                extra: call.extra.clone(),
            }));
            for piece in pieces(&call.function.arguments) {
                out.push(tool_delta(ToolCallDelta {
                    index,
                    function: Some(FunctionCallDelta {
                        name: None,
                        arguments: Some(piece.to_string()),
                    }),
                    ..ToolCallDelta::default()
                }));
            }
        }
        // Thinking after the last call (or said to follow calls that are not there).
        let stray: Vec<(u64, Value)> = later
            .into_iter()
            .filter(|(n, _)| *n >= calls as u64)
            .map(|(_, b)| (0, b))
            .collect();
        out.extend(thinking_after(0, &stray));
        let mut last = ChunkChoice::new(i, Delta::default(), choice.finish_reason.clone());
        last.logprobs = logprobs;
        last.extra = choice.extra.clone();
        out.push(chunk(Some(last)));
    }
    if include_usage && let Some(usage) = &completion.usage {
        let mut c = chunk(None);
        c.usage = Some(usage.clone());
        out.push(c);
    }
    out
}

/// `s` in pieces of [`REPLAY_PIECE_CHARS`] characters (the last shorter), cut on char
/// boundaries.
fn pieces(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = rest
            .char_indices()
            .nth(REPLAY_PIECE_CHARS)
            .map_or(rest.len(), |(i, _)| i);
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use serde_json::json;
    use sluice_core::record::StoreError;
    use sluice_types::openai::ChunkAccumulator;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    fn req(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> Value {
        json!({
            "model": "gpt-4o",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "temperature": 0,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}}}],
            "logit_bias": {"50256": -100, "42": 5}
        })
    }

    #[test]
    fn key_ignores_key_order_and_delivery_fields() {
        let a = req(base());
        // Same request written in another order, with every ignored field set.
        let b = req(json!({
            "logit_bias": {"42": 5, "50256": -100},
            "tools": [{"function": {"parameters": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}, "name": "f"}, "type": "function"}],
            "temperature": 0.0,
            "messages": [{"content": "be brief", "role": "system"}, {"content": "hi", "role": "user"}],
            "model": "gpt-4o",
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u1",
            "safety_identifier": "s",
            "metadata": {"session_id": "x"},
            "store": true,
            "service_tier": "flex",
            "prompt_cache_key": "p",
            "cache": {"ttl": 5}
        }));
        let k = cache_key("key:1", &a);
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(k, cache_key("key:1", &b));
        // Stable across releases unless the scheme is changed on purpose.
        assert_eq!(
            canonical_json(&a).unwrap(),
            r#"{"logit_bias":{"42":5,"50256":-100},"messages":[{"content":"be brief","role":"system"},{"content":"hi","role":"user"}],"model":"gpt-4o","temperature":0.0,"tools":[{"function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}},"type":"function"}]}"#
        );
        // A schema's property order is the order the model writes the properties in: another
        // order is another request.
        let mut reordered = base();
        reordered["tools"][0]["function"]["parameters"]["properties"] =
            json!({"b": {"type": "integer"}, "a": {"type": "string"}});
        assert_ne!(k, cache_key("key:1", &req(reordered)));
        let schema = |props: Value| {
            let mut v = base();
            v["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": props}}});
            cache_key("key:1", &req(v))
        };
        assert_ne!(
            schema(json!({"x": {"type": "string"}, "y": {"type": "string"}})),
            schema(json!({"y": {"type": "string"}, "x": {"type": "string"}}))
        );
        // So is a server's own field, which may be a schema too (vLLM's guided_json).
        let guided = |props: Value| {
            let mut v = base();
            v["guided_json"] = json!({"type": "object", "properties": props});
            cache_key("key:1", &req(v))
        };
        assert_ne!(
            guided(json!({"x": {"type": "string"}, "y": {"type": "string"}})),
            guided(json!({"y": {"type": "string"}, "x": {"type": "string"}}))
        );
    }

    #[test]
    fn key_changes_with_anything_that_changes_the_answer() {
        let k0 = cache_key("key:1", &req(base()));
        assert_ne!(k0, cache_key("key:2", &req(base())), "namespace");
        assert_ne!(k0, cache_key("global", &req(base())), "namespace");
        let changes: Vec<(&str, Value)> = vec![
            ("model", json!("gpt-4o-mini")),
            (
                "messages",
                json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}]),
            ),
            (
                "messages",
                json!([{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}]),
            ),
            (
                "messages",
                json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "bob"}]),
            ),
            ("temperature", json!(0.5)),
            ("top_p", json!(0.9)),
            ("n", json!(2)),
            ("seed", json!(7)),
            ("stop", json!(["\n"])),
            ("max_tokens", json!(10)),
            ("max_completion_tokens", json!(10)),
            ("tools", json!([])),
            ("tool_choice", json!("required")),
            ("parallel_tool_calls", json!(false)),
            ("response_format", json!({"type": "json_object"})),
            ("logit_bias", json!({"50256": -100, "42": 6})),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(2)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(0.5)),
            ("reasoning_effort", json!("high")),
            ("prompt", json!({"id": "greeter", "version": "2"})),
            ("vendor_flag", json!(true)),
        ];
        let mut seen = std::collections::HashSet::from([k0.clone()]);
        for (field, value) in changes {
            let mut v = base();
            v[field] = value.clone();
            let k = cache_key("key:1", &req(v));
            assert!(seen.insert(k), "{field} = {value} must change the key");
        }
    }

    #[test]
    fn strip_control_removes_only_the_cache_object() {
        let mut r = req(json!({"model": "m", "messages": [], "cache": {"ttl": 1}, "x": 1}));
        strip_control(&mut r);
        assert!(!r.extra.contains_key("cache"));
        assert_eq!(r.extra["x"], 1);
    }

    #[test]
    fn determinism() {
        let d = |v: Value| is_deterministic(&req(v));
        assert!(d(json!({"model": "m", "messages": [], "temperature": 0})));
        assert!(d(
            json!({"model": "m", "messages": [], "temperature": 0.0, "top_p": 0.5})
        ));
        assert!(d(
            json!({"model": "m", "messages": [], "temperature": 1.2, "seed": 1})
        ));
        assert!(d(json!({"model": "m", "messages": [], "seed": 0})));
        assert!(
            !d(json!({"model": "m", "messages": []})),
            "default temperature is 1"
        );
        assert!(!d(
            json!({"model": "m", "messages": [], "temperature": 0.1})
        ));
        assert!(!d(json!({"model": "m", "messages": [], "top_p": 0})));

        let sampling = req(json!({"model": "m", "messages": [], "temperature": 0.7}));
        assert!(!Cache::new(CacheConfig::default(), None).cacheable(&sampling));
        let opted_in = CacheConfig {
            nondeterministic: true,
            ..CacheConfig::default()
        };
        assert!(Cache::new(opted_in, None).cacheable(&sampling));
    }

    #[test]
    fn control_from_body_and_header() {
        let p = |b: Option<Value>, h: Option<&str>| CacheControl::parse(b.as_ref(), h).unwrap();
        assert_eq!(p(None, None), CacheControl::default());
        assert_eq!(p(Some(Value::Null), None), CacheControl::default());
        assert_eq!(
            p(Some(json!({"ttl": 60, "no_cache": true})), None),
            CacheControl {
                ttl: Some(Duration::from_secs(60)),
                no_store: false,
                no_cache: true
            }
        );
        assert_eq!(
            p(None, Some("No-Cache, max-age=30, private, NO-STORE")),
            CacheControl {
                ttl: Some(Duration::from_secs(30)),
                no_store: true,
                no_cache: true
            }
        );
        assert_eq!(
            p(None, Some("max-age=\"7\"")).ttl,
            Some(Duration::from_secs(7))
        );
        assert_eq!(p(None, Some(" , ,")), CacheControl::default());
        // The body wins field by field.
        let c = p(
            Some(json!({"ttl": 10, "no_store": false})),
            Some("max-age=99, no-store, no-cache"),
        );
        assert_eq!(
            c,
            CacheControl {
                ttl: Some(Duration::from_secs(10)),
                no_store: false,
                no_cache: true
            }
        );
        // A TTL of 0 means "do not store".
        assert!(p(Some(json!({"ttl": 0})), None).no_store);
        assert!(p(None, Some("max-age=0")).no_store);
        assert!(!p(None, Some("max-age=0")).may_store());
        assert!(p(None, Some("max-age=0")).may_serve());
        // Huge ages are capped.
        assert_eq!(
            p(None, Some("max-age=99999999999999999999999")).ttl,
            Some(MAX_TTL)
        );
        assert_eq!(p(Some(json!({"ttl": u64::MAX})), None).ttl, Some(MAX_TTL));
    }

    #[test]
    fn control_errors_name_the_field() {
        let err = |b: Option<Value>, h: Option<&str>| {
            let e = CacheControl::parse(b.as_ref(), h).unwrap_err();
            assert_eq!(e.code, sluice_core::ErrorCode::InvalidRequest);
            assert_eq!(e.param.as_deref(), Some("cache"));
            e.message
        };
        let m = err(Some(json!({"ttl": -1})), None);
        assert!(m.contains("`cache.ttl`") && m.contains("-1"), "{m}");
        let m = err(Some(json!({"ttl": 1.5})), None);
        assert!(m.contains("`cache.ttl`"), "{m}");
        let m = err(Some(json!({"ttl": "60"})), None);
        assert!(m.contains("`cache.ttl`") && m.contains("string"), "{m}");
        let m = err(Some(json!({"no_store": "yes"})), None);
        assert!(m.contains("`cache.no_store` must be true or false"), "{m}");
        let m = err(Some(json!({"no_cache": 1})), None);
        assert!(m.contains("`cache.no_cache`"), "{m}");
        let m = err(Some(json!({"tll": 5})), None);
        assert!(m.contains("unknown field `cache.tll`"), "{m}");
        let m = err(Some(json!(true)), None);
        assert!(m.contains("`cache` must be an object"), "{m}");
        for h in [
            "max-age=abc",
            "max-age=",
            "max-age",
            "max-age=-3",
            "max-age=1.5",
        ] {
            let m = err(None, Some(h));
            assert!(m.contains("max-age"), "{h}: {m}");
        }
    }

    #[test]
    fn control_ttl_limits_the_age_served() {
        let now = Utc::now();
        let mut e = entry(
            &CacheConfig::default(),
            "k",
            "global",
            "m",
            "{}".into(),
            0.0,
            None,
        );
        e.created_at = now - chrono::TimeDelta::seconds(120);
        assert!(CacheControl::default().accepts(&e, now));
        let c = CacheControl::parse(None, Some("max-age=60")).unwrap();
        assert!(!c.accepts(&e, now));
        let c = CacheControl::parse(None, Some("max-age=600")).unwrap();
        assert!(c.accepts(&e, now));
    }

    #[test]
    fn config_defaults_namespaces_and_validation() {
        let c: CacheConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c, CacheConfig::default());
        assert!(!c.enabled && c.persist && !c.nondeterministic);
        assert_eq!(
            (c.ttl_secs, c.max_entries, c.max_bytes),
            (3600, 10_000, 64 << 20)
        );
        assert_eq!(c.namespace, Namespace::Key);
        c.validate().unwrap();
        let back: CacheConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        let e = serde_json::from_value::<CacheConfig>(json!({"ttl": 5})).unwrap_err();
        assert!(e.to_string().contains("unknown field `ttl`"), "{e}");
        let t: CacheConfig = serde_json::from_value(json!({"namespace": "team"})).unwrap();
        assert_eq!(t.namespace, Namespace::Team);

        assert_eq!(c.namespace_for(Some("k1"), Some("ml")), "key:k1");
        assert_eq!(c.namespace_for(None, Some("ml")), "global");
        assert_eq!(t.namespace_for(Some("k1"), Some("ml")), "team:ml");
        assert_eq!(t.namespace_for(Some("k1"), None), "key:k1");
        assert_eq!(t.namespace_for(None, None), "global");
        let g = CacheConfig {
            namespace: Namespace::Global,
            ..CacheConfig::default()
        };
        assert_eq!(g.namespace_for(Some("k1"), Some("ml")), "global");

        for (bad, field) in [
            (
                CacheConfig {
                    ttl_secs: 0,
                    ..c.clone()
                },
                "ttl_secs",
            ),
            (
                CacheConfig {
                    ttl_secs: MAX_TTL.as_secs() + 1,
                    ..c.clone()
                },
                "ttl_secs",
            ),
            (
                CacheConfig {
                    max_entries: 0,
                    ..c.clone()
                },
                "max_entries",
            ),
            (
                CacheConfig {
                    max_bytes: 1023,
                    ..c.clone()
                },
                "max_bytes",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }

    fn mem_entry(key: &str, ns: &str, body_len: usize, ttl: Duration) -> Arc<CacheEntry> {
        Arc::new(entry(
            &CacheConfig::default(),
            key,
            ns,
            "m",
            "x".repeat(body_len),
            0.01,
            Some(ttl),
        ))
    }

    #[test]
    fn entry_helper_sets_times() {
        let e = entry(
            &CacheConfig::default(),
            "k",
            "ns",
            "m",
            "{}".into(),
            -1.0,
            None,
        );
        assert_eq!(
            e.expires_at - e.created_at,
            chrono::TimeDelta::seconds(3600)
        );
        assert_eq!(e.cost_usd, 0.0);
        let e = entry(
            &CacheConfig::default(),
            "k",
            "ns",
            "m",
            "{}".into(),
            0.5,
            Some(Duration::from_secs(9)),
        );
        assert_eq!(e.expires_at - e.created_at, chrono::TimeDelta::seconds(9));
        assert_eq!(e.cost_usd, 0.5);
        let e = entry(
            &CacheConfig::default(),
            "k",
            "ns",
            "m",
            "{}".into(),
            0.5,
            Some(Duration::MAX),
        );
        // A request cannot keep its answer past the configured TTL (it could for a year).
        assert_eq!(
            e.expires_at - e.created_at,
            chrono::TimeDelta::seconds(3600)
        );
        let long = CacheConfig {
            ttl_secs: MAX_TTL.as_secs() * 2,
            ..CacheConfig::default()
        };
        let e = entry(&long, "k", "ns", "m", "{}".into(), 0.5, Some(Duration::MAX));
        assert_eq!(
            e.expires_at - e.created_at,
            chrono::TimeDelta::from_std(MAX_TTL).unwrap()
        );
    }

    #[test]
    fn memory_never_serves_an_expired_entry() {
        let m = MemoryCache::new(100, 1 << 20);
        let e = mem_entry("k", "global", 10, Duration::from_secs(3600));
        assert!(m.insert(e.clone()));
        let now = Utc::now();
        assert_eq!(m.get("k", now), Some(e.clone()));
        assert_eq!(m.get("k", e.expires_at), None);
        assert_eq!(m.get("k", now + chrono::TimeDelta::hours(2)), None);
        assert_eq!(m.get("other", now), None);

        // moka itself drops the entry at its `expires_at`.
        let short = mem_entry("s", "global", 10, Duration::from_millis(50));
        assert!(m.insert(short));
        assert!(m.inner.contains_key("s"));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!m.inner.contains_key("s"));
        assert_eq!(m.get("s", Utc::now()), None);
        // A replacement gets its own expiry.
        m.insert(mem_entry("s", "global", 10, Duration::from_millis(40)));
        m.insert(mem_entry("s", "global", 10, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(80));
        assert!(m.get("s", Utc::now()).is_some());
    }

    #[test]
    fn memory_is_bounded_by_entries_and_by_bytes() {
        let m = MemoryCache::new(3, 1 << 20);
        for i in 0..50 {
            m.insert(mem_entry(
                &format!("k{i}"),
                "global",
                10,
                Duration::from_secs(60),
            ));
            m.run_pending_tasks();
        }
        assert!(m.entry_count() <= 3 && m.entry_count() > 0, "{m:?}");

        let m = MemoryCache::new(1000, 10_000);
        for i in 0..50 {
            m.insert(mem_entry(
                &format!("k{i}"),
                "global",
                3000,
                Duration::from_secs(60),
            ));
            m.run_pending_tasks();
        }
        assert!(m.weighted_size() <= 10_000, "{m:?}");
        assert!(m.entry_count() <= 3 && m.entry_count() > 0, "{m:?}");
        let held: u64 = m.inner.iter().map(|(_, e)| size(&e)).sum();
        assert!(held <= 10_000, "{held}");

        // Larger than the whole tier: refused.
        assert!(!m.insert(mem_entry("big", "global", 20_000, Duration::from_secs(60))));
        assert!(m.get("big", Utc::now()).is_none());
    }

    #[test]
    fn memory_clear_by_namespace() {
        let m = MemoryCache::new(100, 1 << 20);
        m.insert(mem_entry("a1", "a", 1, Duration::from_secs(60)));
        m.insert(mem_entry("a2", "a", 1, Duration::from_secs(60)));
        m.insert(mem_entry("b1", "b", 1, Duration::from_secs(60)));
        assert_eq!(m.clear(Some("a")), 2);
        let now = Utc::now();
        assert!(m.get("a1", now).is_none() && m.get("a2", now).is_none());
        assert!(m.get("b1", now).is_some());
        assert_eq!(m.clear(None), 1);
        assert!(m.get("b1", now).is_none());
    }

    #[test]
    fn throttle_lets_one_warning_through_per_period() {
        let t = Throttle::new();
        let now = Instant::now();
        assert_eq!(t.allow(now), Some(0));
        assert_eq!(t.allow(now), None);
        assert_eq!(t.allow(now + Duration::from_secs(1)), None);
        assert_eq!(t.allow(now + WARN_EVERY + Duration::from_secs(1)), Some(2));
        assert_eq!(t.allow(now + WARN_EVERY + Duration::from_secs(2)), None);
    }

    /// A persistent tier in a map. Like the real ones, `cache_get` hides expired entries unless
    /// `stale` is set (to check the cache's own expiry check).
    #[derive(Default)]
    struct FakeStore {
        entries: Mutex<HashMap<String, CacheEntry>>,
        gets: AtomicUsize,
        stale: bool,
        /// When set, a clear waits for a permit before deleting.
        clear_gate: Option<Arc<Semaphore>>,
        generation: AtomicU64,
    }

    #[async_trait::async_trait]
    impl CacheStore for FakeStore {
        async fn cache_get(
            &self,
            key: &str,
            now: DateTime<Utc>,
        ) -> Result<Option<CacheEntry>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let e = self.entries.lock().get(key).cloned();
            Ok(e.filter(|e| self.stale || e.expires_at > now))
        }
        async fn cache_put(&self, entry: &CacheEntry) -> Result<(), StoreError> {
            self.entries.lock().insert(entry.key.clone(), entry.clone());
            Ok(())
        }
        async fn cache_purge(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
            let mut m = self.entries.lock();
            let before = m.len();
            m.retain(|_, e| e.expires_at > now);
            Ok((before - m.len()) as u64)
        }
        async fn cache_clear(&self, namespace: Option<&str>) -> Result<u64, StoreError> {
            if let Some(gate) = &self.clear_gate {
                gate.acquire().await.expect("gate open").forget();
            }
            let mut m = self.entries.lock();
            let before = m.len();
            m.retain(|_, e| namespace.is_some_and(|ns| e.namespace != ns));
            self.generation.fetch_add(1, Ordering::SeqCst);
            Ok((before - m.len()) as u64)
        }
        async fn cache_generation(&self) -> Result<Option<u64>, StoreError> {
            Ok(Some(self.generation.load(Ordering::SeqCst)))
        }
    }

    /// A persistent tier that fails every call, or never answers.
    struct BrokenStore {
        hang: bool,
    }

    impl BrokenStore {
        async fn fail<T>(&self) -> Result<T, StoreError> {
            if self.hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Err(StoreError::Database("connection refused".into()))
        }
    }

    #[async_trait::async_trait]
    impl CacheStore for BrokenStore {
        async fn cache_get(
            &self,
            _: &str,
            _: DateTime<Utc>,
        ) -> Result<Option<CacheEntry>, StoreError> {
            self.fail().await
        }
        async fn cache_put(&self, _: &CacheEntry) -> Result<(), StoreError> {
            self.fail().await
        }
        async fn cache_purge(&self, _: DateTime<Utc>) -> Result<u64, StoreError> {
            self.fail().await
        }
        async fn cache_clear(&self, _: Option<&str>) -> Result<u64, StoreError> {
            self.fail().await
        }
    }

    fn on() -> CacheConfig {
        CacheConfig {
            enabled: true,
            ..CacheConfig::default()
        }
    }

    fn answer(key: &str, ns: &str) -> CacheEntry {
        entry(&on(), key, ns, "m", r#"{"id":"x"}"#.into(), 0.02, None)
    }

    #[tokio::test]
    async fn store_writes_both_tiers_and_a_remote_hit_fills_memory() {
        let remote = Arc::new(FakeStore::default());
        let cache = Cache::new(on(), Some(remote.clone()));
        assert!(cache.lookup("k").await.is_none());
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);

        cache.store(answer("k", "global"));
        cache.flush().await;
        assert!(remote.entries.lock().contains_key("k"), "written through");
        assert_eq!(cache.lookup("k").await.unwrap().body, r#"{"id":"x"}"#);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1, "served from memory");

        // Another replica (or a restart): empty memory, same store.
        let other = Cache::new(on(), Some(remote.clone()));
        let hit = other.lookup("k").await.unwrap();
        assert_eq!(hit.cost_usd, 0.02);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2);
        other.lookup("k").await.unwrap();
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2, "now in memory");

        // Already expired: not stored anywhere.
        cache.store(entry(
            &on(),
            "z",
            "global",
            "m",
            "{}".into(),
            0.0,
            Some(Duration::ZERO),
        ));
        cache.flush().await;
        assert!(!remote.entries.lock().contains_key("z"));
        assert!(cache.lookup("z").await.is_none());
    }

    #[tokio::test]
    async fn a_lookup_during_a_clear_does_not_keep_what_the_clear_deletes() {
        let gate = Arc::new(Semaphore::new(0));
        let remote = Arc::new(FakeStore {
            clear_gate: Some(gate.clone()),
            ..FakeStore::default()
        });
        remote
            .entries
            .lock()
            .insert("k".into(), answer("k", "global"));
        let cache = Arc::new(Cache::new(on(), Some(remote.clone())));
        let clearing = tokio::spawn({
            let cache = cache.clone();
            async move { cache.clear(None).await }
        });
        while cache.clearing.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The shared tier still holds the entry: this lookup is answered from it, but memory
        // does not keep it.
        assert!(cache.lookup("k").await.is_some());
        gate.add_permits(1);
        assert_eq!(clearing.await.unwrap(), Ok(1));
        assert!(remote.entries.lock().is_empty());
        assert!(
            cache.lookup("k").await.is_none(),
            "the cleared answer is still served from memory"
        );
    }

    #[tokio::test]
    async fn an_expired_remote_entry_is_a_miss() {
        let remote = Arc::new(FakeStore {
            stale: true,
            ..FakeStore::default()
        });
        let mut e = answer("k", "global");
        e.expires_at = Utc::now() - chrono::TimeDelta::seconds(1);
        remote.entries.lock().insert("k".into(), e);
        let cache = Cache::new(on(), Some(remote.clone()));
        assert!(cache.lookup("k").await.is_none());
        assert_eq!(cache.purge().await, 1);
    }

    #[test]
    fn persist_off_leaves_out_the_store_but_not_redis() {
        let redis: Arc<dyn CacheStore> = Arc::new(FakeStore::default());
        let store: Arc<dyn CacheStore> = Arc::new(FakeStore::default());
        let picked = |persist, redis: Option<&Arc<dyn CacheStore>>| {
            shared_tier(persist, redis.cloned(), store.clone())
        };
        assert!(picked(false, None).is_none());
        assert!(Arc::ptr_eq(&picked(true, None).unwrap(), &store));
        for persist in [false, true] {
            assert!(Arc::ptr_eq(&picked(persist, Some(&redis)).unwrap(), &redis));
        }
    }

    #[tokio::test]
    async fn a_failing_remote_only_makes_misses() {
        for hang in [false, true] {
            let cache = Cache::new(on(), Some(Arc::new(BrokenStore { hang })));
            let started = Instant::now();
            assert!(cache.lookup("k").await.is_none());
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            // Memory still works.
            cache.store(answer("k", "global"));
            assert!(cache.lookup("k").await.is_some());
            if !hang {
                cache.flush().await;
                // The shared tier could not be cleared: that is an error, not a success.
                assert!(cache.clear(None).await.is_err());
                assert!(cache.lookup("k").await.is_none(), "memory is cleared");
                assert_eq!(cache.purge().await, 0);
            }
        }
    }

    #[tokio::test]
    async fn clear_one_namespace_in_both_tiers() {
        let remote = Arc::new(FakeStore::default());
        let cache = Cache::new(on(), Some(remote.clone()));
        for (k, ns) in [("a1", "key:a"), ("a2", "key:a"), ("b1", "key:b")] {
            cache.store(answer(k, ns));
        }
        // Only in the store (e.g. written by another replica).
        remote
            .entries
            .lock()
            .insert("a3".into(), answer("a3", "key:a"));
        assert_eq!(cache.clear(Some("key:a")).await.unwrap(), 3);
        for k in ["a1", "a2", "a3"] {
            assert!(cache.lookup(k).await.is_none(), "{k}");
        }
        assert!(cache.lookup("b1").await.is_some());
        assert_eq!(cache.clear(None).await.unwrap(), 1);
        assert!(remote.entries.lock().is_empty());
    }

    /// A clear on one replica reaches another's memory tier (it served its copy until the
    /// entry expired, an hour by default).
    #[tokio::test]
    async fn a_clear_elsewhere_empties_this_replicas_memory() {
        let remote = Arc::new(FakeStore::default());
        let a = Cache::new(on(), Some(remote.clone()));
        let b = Cache::new(on(), Some(remote.clone()));
        b.follow_clears().await;
        a.follow_clears().await;
        a.store(answer("k", "global"));
        a.flush().await;
        assert!(b.lookup("k").await.is_some(), "copied into b's memory");
        b.follow_clears().await;
        assert!(
            b.memory().get("k", Utc::now()).is_some(),
            "nothing cleared yet"
        );
        // a clears one namespace; what it keeps in memory stays there after its own poll.
        a.store(answer("other", "key:x"));
        assert_eq!(a.clear(Some("global")).await.unwrap(), 1);
        a.follow_clears().await;
        assert!(a.memory().get("other", Utc::now()).is_some());
        b.follow_clears().await;
        assert!(b.memory().get("k", Utc::now()).is_none());
        assert!(b.lookup("k").await.is_none());
    }

    #[test]
    fn without_a_runtime_store_keeps_the_answer_in_memory() {
        let remote = Arc::new(FakeStore::default());
        let cache = Cache::new(on(), Some(remote.clone()));
        cache.store(answer("k", "global"));
        assert!(cache.memory().get("k", Utc::now()).is_some());
        assert!(remote.entries.lock().is_empty());
    }

    fn completion() -> ChatCompletion {
        serde_json::from_value(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_1",
            "service_tier": "default",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Grüße aus Köln! 👋🏽 This answer is long enough to be split into several pieces, with emoji 🇩🇪 and ünïcödé on the cuts."},
                    "finish_reason": "stop",
                    "logprobs": {"content": [{"token": "Gr", "logprob": -0.1}]}
                },
                {
                    "index": 1,
                    "message": {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\", \"days\": 3}"}},
                        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}}
                    ]},
                    "finish_reason": "tool_calls"
                },
                {
                    "index": 2,
                    "message": {"role": "assistant", "content": ""},
                    "finish_reason": "length"
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}
        }))
        .unwrap()
    }

    #[test]
    fn replay_reassembles_into_the_completion() {
        let c = completion();
        let chunks = replay(&c, true);
        assert!(chunks.len() > 10, "content comes in pieces");
        for ch in &chunks {
            assert_eq!(ch.id, c.id);
            assert_eq!(ch.object, "chat.completion.chunk");
            assert_eq!(ch.created, c.created);
            assert_eq!(ch.model, c.model);
            assert_eq!(ch.system_fingerprint.as_deref(), Some("fp_1"));
            assert_eq!(ch.extra["service_tier"], "default");
            assert!(ch.choices.len() <= 1);
        }
        for ch in &chunks[..chunks.len() - 1] {
            assert!(ch.usage.is_none());
            for choice in &ch.choices {
                for piece in [&choice.delta.content, &choice.delta.refusal]
                    .into_iter()
                    .flatten()
                {
                    assert!(piece.chars().count() <= REPLAY_PIECE_CHARS);
                }
            }
        }
        let last = chunks.last().unwrap();
        assert!(last.choices.is_empty());
        assert_eq!(last.usage, c.usage);

        let mut acc = ChunkAccumulator::default();
        for ch in &chunks {
            // Through JSON, as a client reads it.
            let text = serde_json::to_string(ch).unwrap();
            acc.push(&serde_json::from_str(&text).unwrap());
        }
        let back = acc.finish();
        assert_eq!(back.id, c.id);
        assert_eq!(back.usage, c.usage);
        assert_eq!(back.choices.len(), 3);
        for (b, o) in back.choices.iter().zip(&c.choices) {
            assert_eq!(b.message.content, o.message.content, "choice {}", o.index);
            assert_eq!(
                b.message.tool_calls, o.message.tool_calls,
                "choice {}",
                o.index
            );
            assert_eq!(b.finish_reason, o.finish_reason, "choice {}", o.index);
        }
        let logprobs: Vec<_> = chunks
            .iter()
            .flat_map(|ch| &ch.choices)
            .filter_map(|c| c.logprobs.as_ref())
            .collect();
        assert_eq!(logprobs, vec![c.choices[0].logprobs.as_ref().unwrap()]);
    }

    /// A cached answer with interleaved thinking (a signed block between two tool calls) streams
    /// to a `/v1/messages` client in its turn's order (every thinking block came first, so the
    /// client sent them back out of order), and folds back to the same list for OpenAI clients.
    #[test]
    fn replay_keeps_interleaved_thinking_in_place() {
        let c: ChatCompletion = serde_json::from_value(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "claude",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant",
                "content": "Looking.",
                "reasoning_content": "AB",
                "thinking_blocks": [
                    {"type": "thinking", "thinking": "A", "signature": "sa"},
                    {"type": "thinking", "thinking": "B", "signature": "sb", "tool_calls_before": 1}
                ],
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}}
                ]
            }}]
        }))
        .unwrap();
        let chunks = replay(&c, false);
        let mut encoder = sluice_types::anthropic::StreamEncoder::new("c", "claude");
        let mut events = Vec::new();
        let mut acc = ChunkAccumulator::default();
        for ch in &chunks {
            acc.push(ch);
            events.extend(encoder.on_chunk(ch));
        }
        events.extend(encoder.finish());
        let order: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                sluice_types::anthropic::StreamEvent::ContentBlockStart {
                    content_block, ..
                } => Some(content_block.kind().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            order,
            ["thinking", "text", "tool_use", "thinking", "tool_use"]
        );
        // Every entry of the two list deltas has its place in the whole list.
        let listed: Vec<Value> = chunks
            .iter()
            .filter_map(|ch| ch.choices[0].delta.extra.get("thinking_blocks"))
            .flat_map(|v| v.as_array().unwrap().iter().map(|b| b["index"].clone()))
            .collect();
        assert_eq!(listed, [json!(0), json!(1)]);
        let back = acc.finish();
        let texts = |v: &Value| -> Vec<Value> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|b| b["thinking"].clone())
                .collect()
        };
        assert_eq!(
            texts(&back.choices[0].message.extra["thinking_blocks"]),
            texts(&c.choices[0].message.extra["thinking_blocks"])
        );
    }

    #[test]
    fn replay_chunks_look_like_openai_s() {
        let c = completion();
        let chunks = replay(&c, false);
        assert!(
            chunks
                .iter()
                .all(|ch| ch.usage.is_none() && !ch.choices.is_empty())
        );
        let v = |i: usize| serde_json::to_value(&chunks[i]).unwrap();
        assert_eq!(
            v(0)["choices"][0],
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null})
        );
        assert_eq!(
            v(1)["choices"][0]["delta"],
            json!({"content": "Grüße aus Köln! 👋🏽 This answer i"})
        );
        let first_tool = chunks
            .iter()
            .position(|ch| ch.choices[0].index == 1)
            .unwrap();
        assert_eq!(
            v(first_tool)["choices"][0]["delta"],
            json!({"role": "assistant"}),
            "no content for a tool-call message"
        );
        assert_eq!(
            v(first_tool + 1)["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            v(first_tool + 2)["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Paris\", \"unit\": \"celsi"}}]})
        );
        let end = chunks
            .iter()
            .rposition(|ch| ch.choices[0].index == 1)
            .unwrap();
        assert_eq!(
            v(end)["choices"][0],
            json!({"index": 1, "delta": {}, "finish_reason": "tool_calls"})
        );
        // No usage in the completion: no usage chunk either.
        let mut bare = c.clone();
        bare.usage = None;
        assert_eq!(replay(&bare, true).len(), chunks.len());
    }

    #[test]
    fn pieces_cut_on_char_boundaries() {
        assert_eq!(pieces("").count(), 0);
        let s = "é".repeat(REPLAY_PIECE_CHARS * 2 + 1);
        let p: Vec<&str> = pieces(&s).collect();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], "é");
        assert_eq!(p.concat(), s);
    }
}
