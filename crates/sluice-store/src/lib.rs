//! Sluice's stores.
//!
//! [`open`] reads a store URL (`sqlite://PATH`, `sqlite::memory:`, `postgres://…`) and returns
//! the [`LogStore`] for it, with its schema migrated. [`SqliteStore`] (the embedded default) and
//! [`PgStore`] share one implementation of every query (the `store_impl!` macro) and differ only
//! in their connection setup and DDL, so they pass the same test suite. The same store also
//! serves virtual keys ([`KeyStore`]), the admin audit log ([`AuditStore`]), spend and usage
//! aggregated from the request log ([`UsageStore`]) and the persistent tier of the exact cache
//! ([`CacheStore`]); [`open_all`] returns every view of one opened store as [`Stores`].
//!
//! [`writer::LogWriter`] drains the request-log queue in batches into a store, off the hot path.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sluice_core::keys::{AuditEntry, AuditStore, KeyStore, Role, VirtualKey};
use sluice_core::record::{
    LogStore, RawJson, RecordQuery, RecordStatus, RequestRecord, StoreError, UsageSource,
};
use sluice_core::usage::{
    CacheEntry, CacheStore, Spender, UsageDim, UsageQuery, UsageRow, UsageStore,
};
use sqlx::{Row, postgres::PgPoolOptions, sqlite::SqlitePoolOptions};
use uuid::Uuid;

pub mod writer;

/// `[store]` configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://./sluice-data/sluice.db` (default), `sqlite::memory:`, or `postgres://…`.
    #[serde(default = "default_url")]
    pub url: String,
    /// Request and response bodies on records: `full` (default) or `none`.
    #[serde(default)]
    pub bodies: BodyModeConfig,
    /// Records the log queue holds before senders wait.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Bytes of bodies and error text the log queue holds before senders wait (each record also
    /// counts 1 KiB for itself).
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    /// Most records written in one transaction.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Connections in the pool.
    #[serde(default = "default_pool")]
    pub max_connections: u32,
    /// How long the writer waits for a batch to fill once its first record arrived, in
    /// milliseconds (0 writes whatever is queued at once).
    #[serde(default = "default_flush")]
    pub flush_interval_ms: u64,
    /// Where records go while the store is unavailable, written back when it answers again
    /// (default: `spill.jsonl` beside the SQLite file, or `./sluice-data/spill.jsonl` for
    /// PostgreSQL). In a container, a persistent volume.
    #[serde(default)]
    pub spill_path: Option<std::path::PathBuf>,
}

/// Which bodies records keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyModeConfig {
    #[default]
    Full,
    None,
}

/// A store URL fit to print: a password in it (`postgres://user:secret@host/db`, or a
/// `password=` parameter) is shown as `***`. The user part runs to the last `@` after the
/// scheme, so a password holding `/`, `?` or `#` is hidden whole. SQLite URLs hold none.
pub fn redact_url(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.to_string();
    }
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        if let Some(at) = out[rest..].rfind('@')
            && let Some(colon) = out[rest..rest + at].find(':')
        {
            out.replace_range(rest + colon + 1..rest + at, "***");
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

pub fn default_url() -> String {
    "sqlite://./sluice-data/sluice.db".into()
}
fn default_queue() -> usize {
    16_384
}
fn default_queue_bytes() -> u64 {
    sluice_core::record::DEFAULT_QUEUE_BYTES
}
fn default_batch() -> usize {
    512
}
fn default_pool() -> u32 {
    8
}
fn default_flush() -> u64 {
    20
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: default_url(),
            bodies: BodyModeConfig::default(),
            queue_capacity: default_queue(),
            queue_bytes: default_queue_bytes(),
            batch_size: default_batch(),
            max_connections: default_pool(),
            flush_interval_ms: default_flush(),
            spill_path: None,
        }
    }
}

impl StoreConfig {
    /// Checks the settings; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        backend_of(&self.url).map_err(|e| format!("url: {e}"))?;
        if self.queue_capacity == 0 {
            return Err("queue_capacity: must be at least 1".into());
        }
        if self.queue_bytes < 1024 * 1024 {
            return Err("queue_bytes: must be at least 1048576 (1 MiB)".into());
        }
        if self.batch_size == 0 || self.batch_size > 2000 {
            return Err("batch_size: must be between 1 and 2000".into());
        }
        if self.flush_interval_ms > 10_000 {
            return Err("flush_interval_ms: at most 10000".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections: must be at least 1".into());
        }
        if let Some(p) = &self.spill_path
            && (p.as_os_str().is_empty() || p.is_dir())
        {
            return Err(format!(
                "spill_path: {} is a directory; name a file in it (for example {})",
                p.display(),
                p.join("spill.jsonl").display()
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Checks that `url` names a store Sluice can open (the scheme, and a file for SQLite), without
/// opening it.
pub fn check_url(url: &str) -> Result<(), String> {
    backend_of(url).map(|_| ())
}

fn backend_of(url: &str) -> Result<Backend, String> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.split('?').next().unwrap_or("").is_empty() {
            // An empty name is a private temporary database per connection: nothing would be
            // kept, and the connections would not see each other's tables.
            return Err(format!(
                "`{}` names no file; use sqlite://PATH (for example sqlite://./sluice-data/sluice.db) or sqlite::memory:",
                redact_url(url)
            ));
        }
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(format!(
            "`{}` is not a store URL; use sqlite://PATH, sqlite::memory: or postgres://USER@HOST:PORT/DB",
            redact_url(url)
        ))
    }
}

/// SQLite's SQLITE_BUSY / SQLITE_LOCKED, as the driver words them.
fn is_locked(message: &str) -> bool {
    message.contains("database is locked")
        || message.contains("(code: 5)")
        || message.contains("(code: 6)")
}

fn db_err(e: sqlx::Error) -> StoreError {
    if let Some(d) = e.as_database_error()
        && refuses_data(d)
    {
        return StoreError::Rejected(e.to_string());
    }
    StoreError::Database(e.to_string())
}

/// Whether a database error is about the data sent (it would fail again however often it is
/// sent), rather than the database being unreachable, busy or out of space.
fn refuses_data(d: &dyn sqlx::error::DatabaseError) -> bool {
    if !matches!(d.kind(), sqlx::error::ErrorKind::Other) {
        return true;
    }
    let Some(code) = d.code() else {
        return false;
    };
    if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        // SQLSTATE classes: 22 data exception, 23 integrity constraint violation, 54 program
        // limit exceeded (an index row too large, say).
        return ["22", "23", "54"].iter().any(|c| code.starts_with(c));
    }
    // SQLite's (extended) result code; its low byte is the primary code: SQLITE_TOOBIG 18,
    // SQLITE_CONSTRAINT 19, SQLITE_MISMATCH 20.
    code.parse::<i64>()
        .is_ok_and(|c| matches!(c & 0xff, 18..=20))
}

/// For a SQLite URL whose file exists: whether it holds a Sluice store (its migrations table),
/// read without changing it, so that a command that only reads never turns another program's
/// database into one. `None` for other stores, an in-memory one, a missing file, or a file that
/// cannot be read now.
pub async fn sqlite_holds_sluice(url: &str) -> Option<bool> {
    use sqlx::ConnectOptions;
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .ok()?
        .read_only(true)
        .create_if_missing(false);
    if !opts.get_filename().is_file() {
        return None;
    }
    let mut conn = opts.connect().await.ok()?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
    )
    .fetch_one(&mut conn)
    .await
    .ok()?;
    Some(tables > 0)
}

/// Opens (creating where needed) and migrates the store at `url`.
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn LogStore>, StoreError> {
    Ok(open_stores(url, max_connections).await?.0)
}

/// Opens the store at `url` once and returns it as both the request log and the key store.
pub async fn open_stores(
    url: &str,
    max_connections: u32,
) -> Result<(Arc<dyn LogStore>, Arc<dyn KeyStore>), StoreError> {
    let s = open_all(url, max_connections).await?;
    Ok((s.log, s.keys))
}

/// Every view of one opened store.
pub struct Stores {
    pub log: Arc<dyn LogStore>,
    pub keys: Arc<dyn KeyStore>,
    pub audit: Arc<dyn AuditStore>,
    pub usage: Arc<dyn UsageStore>,
    pub cache: Arc<dyn CacheStore>,
}

impl Stores {
    fn of<S: LogStore + KeyStore + AuditStore + UsageStore + CacheStore>(s: S) -> Self {
        let s = Arc::new(s);
        Stores {
            log: s.clone(),
            keys: s.clone(),
            audit: s.clone(),
            usage: s.clone(),
            cache: s,
        }
    }
}

/// Opens the store at `url` once, as the request log, the key store, the audit log, the usage
/// reports and the cache.
pub async fn open_all(url: &str, max_connections: u32) -> Result<Stores, StoreError> {
    match backend_of(url).map_err(StoreError::Config)? {
        Backend::Sqlite => Ok(Stores::of(SqliteStore::open(url, max_connections).await?)),
        Backend::Postgres => Ok(Stores::of(PgStore::open(url, max_connections).await?)),
    }
}

/// The embedded store: one SQLite file in WAL mode.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
}

/// The scale-out store: PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: sqlx::PgPool,
}

/// Schema versions, oldest first: (version, SQLite DDL, PostgreSQL DDL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT,
        deployment TEXT,
        attempts INTEGER NOT NULL,
        status TEXT NOT NULL,
        http_status INTEGER NOT NULL,
        error_code TEXT,
        error_message TEXT,
        stream BOOLEAN NOT NULL,
        latency_ms REAL NOT NULL,
        ttft_ms REAL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        usage_source TEXT NOT NULL,
        cost_usd REAL NOT NULL,
        finish_reason TEXT,
        user_id TEXT,
        session_id TEXT,
        tags TEXT NOT NULL,
        metadata TEXT NOT NULL,
        request_body TEXT,
        response_body TEXT
    );
    CREATE INDEX IF NOT EXISTS requests_model ON requests (model, id);
    CREATE INDEX IF NOT EXISTS requests_user ON requests (user_id, id);
    CREATE INDEX IF NOT EXISTS requests_status ON requests (status, id);",
        "CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT,
        deployment TEXT,
        attempts BIGINT NOT NULL,
        status TEXT NOT NULL,
        http_status BIGINT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        stream BOOLEAN NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL,
        usage_source TEXT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        finish_reason TEXT,
        user_id TEXT,
        session_id TEXT,
        tags TEXT NOT NULL,
        metadata TEXT NOT NULL,
        request_body TEXT,
        response_body TEXT
    );
    CREATE INDEX IF NOT EXISTS requests_model ON requests (model, id);
    CREATE INDEX IF NOT EXISTS requests_user ON requests (user_id, id);
    CREATE INDEX IF NOT EXISTS requests_status ON requests (status, id);",
    ),
    (
        2,
        "ALTER TABLE requests ADD COLUMN attempt_log TEXT NOT NULL DEFAULT '[]';
         ALTER TABLE requests ADD COLUMN route TEXT;",
        "ALTER TABLE requests ADD COLUMN attempt_log TEXT NOT NULL DEFAULT '[]';
         ALTER TABLE requests ADD COLUMN route TEXT;",
    ),
    (3, KEYS_DDL_SQLITE, KEYS_DDL_PG),
    (
        4,
        "ALTER TABLE api_keys ADD COLUMN role TEXT;
         ALTER TABLE api_keys ADD COLUMN created_by TEXT;
         CREATE TABLE IF NOT EXISTS audit_log (
            id TEXT PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            role TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL
         );",
        "ALTER TABLE api_keys ADD COLUMN role TEXT;
         ALTER TABLE api_keys ADD COLUMN created_by TEXT;
         CREATE TABLE IF NOT EXISTS audit_log (
            id TEXT PRIMARY KEY,
            at TIMESTAMPTZ NOT NULL,
            actor TEXT NOT NULL,
            role TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL
         );",
    ),
    (
        5,
        "ALTER TABLE requests ADD COLUMN cache TEXT;
         ALTER TABLE requests ADD COLUMN cost_saved_usd REAL NOT NULL DEFAULT 0.0;
         CREATE TABLE IF NOT EXISTS cache_entries (
            key TEXT PRIMARY KEY,
            namespace TEXT NOT NULL,
            model TEXT NOT NULL,
            body TEXT NOT NULL,
            cost_usd REAL NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS cache_entries_expires ON cache_entries (expires_at);
         CREATE INDEX IF NOT EXISTS cache_entries_namespace ON cache_entries (namespace);",
        "ALTER TABLE requests ADD COLUMN cache TEXT;
         ALTER TABLE requests ADD COLUMN cost_saved_usd DOUBLE PRECISION NOT NULL DEFAULT 0;
         CREATE TABLE IF NOT EXISTS cache_entries (
            key TEXT PRIMARY KEY,
            namespace TEXT NOT NULL,
            model TEXT NOT NULL,
            body TEXT NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL,
            created_at TIMESTAMPTZ NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL
         );
         CREATE INDEX IF NOT EXISTS cache_entries_expires ON cache_entries (expires_at);
         CREATE INDEX IF NOT EXISTS cache_entries_namespace ON cache_entries (namespace);",
    ),
    (6, TEAM_DDL_SQLITE, TEAM_DDL_PG),
    (7, PARTIAL_INDEXES_DDL, PARTIAL_INDEXES_DDL),
    (8, SPEND_INDEXES_SQLITE, SPEND_INDEXES_PG),
];

/// The user, key and team indexes also hold each record's cost (and, for a team, whether it
/// came through a key), so a spender's spend is summed from the index alone: a total-period
/// budget's first check reads a spender's whole history, which through the table took about
/// 0.66 s per 500,000 records (a local SQLite measurement) and ran into the 2 s the budget check
/// waits; from the index it took 0.056 s.
const SPEND_INDEXES_SQLITE: &str = "DROP INDEX IF EXISTS requests_user;
    CREATE INDEX requests_user ON requests (user_id, id, cost_usd) WHERE user_id IS NOT NULL;
    DROP INDEX IF EXISTS requests_team;
    CREATE INDEX requests_team ON requests (team, id, key_id, cost_usd) WHERE team IS NOT NULL;
    DROP INDEX IF EXISTS requests_key;
    CREATE INDEX requests_key ON requests (key_id, id, cost_usd) WHERE key_id IS NOT NULL;";

/// [`SPEND_INDEXES_SQLITE`] for PostgreSQL, whose `INCLUDE` columns ride along without being
/// part of the key.
const SPEND_INDEXES_PG: &str = "DROP INDEX IF EXISTS requests_user;
    CREATE INDEX requests_user ON requests (user_id, id) INCLUDE (cost_usd) WHERE user_id IS NOT NULL;
    DROP INDEX IF EXISTS requests_team;
    CREATE INDEX requests_team ON requests (team, id) INCLUDE (key_id, cost_usd) WHERE team IS NOT NULL;
    DROP INDEX IF EXISTS requests_key;
    CREATE INDEX requests_key ON requests (key_id, id) INCLUDE (cost_usd) WHERE key_id IS NOT NULL;";

/// The user, team and key indexes hold only the records that have one. Most records have none
/// of some (no virtual key, no user id), and every such record used to add an entry to each of
/// these indexes on the writer's path. The queries that use them compare the column with `=`,
/// which implies `IS NOT NULL`, so both databases still use them.
const PARTIAL_INDEXES_DDL: &str = "DROP INDEX IF EXISTS requests_user;
    CREATE INDEX requests_user ON requests (user_id, id) WHERE user_id IS NOT NULL;
    DROP INDEX IF EXISTS requests_team;
    CREATE INDEX requests_team ON requests (team, id) WHERE team IS NOT NULL;
    DROP INDEX IF EXISTS requests_key;
    CREATE INDEX requests_key ON requests (key_id, id) WHERE key_id IS NOT NULL;";

/// The team of each record in its own indexed column (team budgets read a team's spend since a
/// point in time), filled from the metadata of the records already stored.
/// As on the write path: only a string is a team, and one longer than [`MAX_INDEXED_BYTES`] is
/// left out (it would not fit PostgreSQL's index, and the migration would fail).
const TEAM_DDL_SQLITE: &str = "ALTER TABLE requests ADD COLUMN team TEXT;
    UPDATE requests SET team = json_extract(metadata, '$.team')
        WHERE json_valid(metadata) AND json_type(metadata) = 'object'
            AND json_type(metadata, '$.team') = 'text'
            AND length(CAST(json_extract(metadata, '$.team') AS BLOB)) <= 1024;
    CREATE INDEX IF NOT EXISTS requests_team ON requests (team, id);";

const TEAM_DDL_PG: &str = r"ALTER TABLE requests ADD COLUMN team TEXT;
    UPDATE requests SET team = metadata::jsonb ->> 'team'
        WHERE strpos(metadata, E'\\u0000') = 0 AND left(ltrim(metadata), 1) = '{'
            AND jsonb_typeof(metadata::jsonb -> 'team') = 'string'
            AND octet_length(metadata::jsonb ->> 'team') <= 1024;
    CREATE INDEX IF NOT EXISTS requests_team ON requests (team, id);";

/// Virtual keys (only their hashes), and the key each request was made with.
const KEYS_DDL_SQLITE: &str = "CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        owner TEXT NOT NULL,
        models TEXT NOT NULL,
        rpm INTEGER,
        tpm INTEGER,
        max_parallel INTEGER,
        budget TEXT NOT NULL,
        expires_at TEXT,
        metadata TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX IF NOT EXISTS api_keys_updated ON api_keys (updated_at);
    ALTER TABLE requests ADD COLUMN key_id TEXT;
    CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, id);";

const KEYS_DDL_PG: &str = "CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        owner TEXT NOT NULL,
        models TEXT NOT NULL,
        rpm BIGINT,
        tpm BIGINT,
        max_parallel BIGINT,
        budget TEXT NOT NULL,
        expires_at TIMESTAMPTZ,
        metadata TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        revoked_at TIMESTAMPTZ
    );
    CREATE INDEX IF NOT EXISTS api_keys_updated ON api_keys (updated_at);
    ALTER TABLE requests ADD COLUMN key_id TEXT;
    CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, id);";

const KEY_COLUMNS: &str = "id, name, key_hash, owner, models, rpm, tpm, max_parallel, budget, \
    expires_at, metadata, created_at, updated_at, revoked_at, role, created_by";

const COLUMNS: &str = "id, started_at, finished_at, endpoint, model, provider, deployment, attempts, \
    status, http_status, error_code, error_message, stream, latency_ms, ttft_ms, prompt_tokens, \
    completion_tokens, cached_tokens, usage_source, cost_usd, finish_reason, user_id, session_id, \
    tags, metadata, request_body, response_body, attempt_log, route, key_id, cache, cost_saved_usd, \
    team";

/// [`COLUMNS`] with the bodies left out (read as NULL).
const COLUMNS_WITHOUT_BODIES: &str = "id, started_at, finished_at, endpoint, model, provider, \
    deployment, attempts, status, http_status, error_code, error_message, stream, latency_ms, \
    ttft_ms, prompt_tokens, completion_tokens, cached_tokens, usage_source, cost_usd, \
    finish_reason, user_id, session_id, tags, metadata, CAST(NULL AS TEXT) AS request_body, \
    CAST(NULL AS TEXT) AS response_body, attempt_log, route, key_id, cache, cost_saved_usd, team";

impl SqliteStore {
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("store url `{url}`: {e}")))?
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            let path = opts.get_filename();
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Config(format!("cannot create `{}`: {e}", dir.display()))
                })?;
            }
        }
        // Two connections converting a fresh file to WAL at the same moment can get SQLITE_BUSY
        // without the busy handler being consulted, so opens in this process take turns and an
        // open that still meets a lock (another process) retries for a bounded time.
        static OPENING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = OPENING.lock().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut pause = Duration::from_millis(20);
        loop {
            match Self::open_once(url, opts.clone(), in_memory, max_connections).await {
                Err(StoreError::Database(msg))
                    if is_locked(&msg) && std::time::Instant::now() < deadline =>
                {
                    tracing::debug!(url, "store is locked during open; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    async fn open_once(
        url: &str,
        opts: sqlx::sqlite::SqliteConnectOptions,
        in_memory: bool,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            // An in-memory database lives in one connection.
            .max_connections(if in_memory { 1 } else { max_connections })
            .min_connections(if in_memory { 1 } else { 0 })
            // A connection to a file in this process does not go stale the way a network one
            // does: no ping (a round trip to the connection's thread) before each use.
            .test_before_acquire(false)
            .idle_timeout(if in_memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if in_memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Database(format!("cannot open `{url}`: {e}")))?;
        let store = SqliteStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock up front, so two migrating connections queue on the
        // busy handler instead of deadlocking on a read-to-write upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        for (version, ddl, _) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
            if done.is_none() {
                sqlx::raw_sql(*ddl)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(version)
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
            }
        }
        tx.commit().await.map_err(db_err)
    }
}

impl PgStore {
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // One connection first, without the pool's retries: a server that refuses or a wrong
        // password is said at once, with its reason (the pool waits out its timeout and says
        // only that it timed out).
        {
            use sqlx::Connection;
            let cannot = |why: String| {
                StoreError::Database(format!(
                    "cannot connect to PostgreSQL: {why}; check that the server runs and the URL (host, port, user, password, database) is right"
                ))
            };
            match tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(url))
                .await
            {
                Ok(Ok(c)) => {
                    let _ = c.close().await;
                }
                Ok(Err(e)) => return Err(cannot(e.to_string())),
                Err(_) => return Err(cannot("no answer within 10 s".into())),
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| StoreError::Database(format!("cannot connect to PostgreSQL: {e}")))?;
        let store = PgStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Replicas starting together migrate one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock(7261626)")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        for (version, _, ddl) in MIGRATIONS {
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
            if done.is_none() {
                sqlx::raw_sql(*ddl)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(version)
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_err)?;
            }
        }
        tx.commit().await.map_err(db_err)
    }
}

/// The lowest UUIDv7 for a moment: ids at or after `t` compare greater or equal.
fn v7_floor(t: DateTime<Utc>) -> String {
    let ms = t.timestamp_millis().max(0) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Uuid::from_bytes(bytes).hyphenated().to_string()
}

macro_rules! store_impl {
    ($store:ty, $db:ty, $placeholders:expr) => {
        impl $store {
            /// Writes `records` in one transaction; with `returning`, also says which were new
            /// (their ids), else returns none.
            async fn insert_rows(
                &self,
                records: &[RequestRecord],
                returning: bool,
            ) -> Result<Vec<Uuid>, StoreError> {
                let mut new = Vec::new();
                if records.is_empty() {
                    return Ok(new);
                }
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                // The batch goes in as statements of a few fixed sizes (see `insert_chunk`), so
                // each size is parsed once per connection and then served from sqlx's statement
                // cache; the transaction keeps the batch atomic.
                let mut rest = records;
                while !rest.is_empty() {
                    let (sql, n) = insert_chunk(rest.len(), $placeholders, returning);
                    let (rows, tail) = rest.split_at(n);
                    rest = tail;
                    let mut q = sqlx::query::<$db>(sql);
                    for r in rows {
                        q = q
                            .bind(r.id.hyphenated().to_string())
                            .bind(r.started_at)
                            .bind(r.finished_at)
                            .bind(text(&r.endpoint))
                            .bind(indexed(&r.model))
                            .bind(opt_text(&r.provider))
                            .bind(opt_text(&r.deployment))
                            .bind(i64::from(r.attempts))
                            .bind(r.status.as_str())
                            .bind(i64::from(r.http_status))
                            .bind(opt_text(&r.error_code))
                            .bind(opt_text(&r.error_message))
                            .bind(r.stream)
                            .bind(r.latency_ms)
                            .bind(r.ttft_ms)
                            .bind(stored_tokens(r.prompt_tokens))
                            .bind(stored_tokens(r.completion_tokens))
                            .bind(stored_tokens(r.cached_tokens))
                            .bind(r.usage_source.as_str())
                            .bind(r.cost_usd)
                            .bind(opt_text(&r.finish_reason))
                            .bind(r.user.as_deref().map(indexed))
                            .bind(opt_text(&r.session))
                            .bind(json_text(&r.tags))
                            .bind(json_text(&r.metadata))
                            .bind(r.request_body.as_ref().map(|b| b.get().to_string()))
                            .bind(r.response_body.as_ref().map(|b| b.get().to_string()))
                            .bind(json_text(&r.attempt_log))
                            .bind(r.route.as_ref().map(json_text))
                            .bind(r.key_id.as_deref().map(indexed))
                            .bind(opt_text(&r.cache))
                            .bind(r.cost_saved_usd)
                            .bind(r.team().map(indexed));
                    }
                    if returning {
                        for row in q.fetch_all(&mut *tx).await.map_err(db_err)? {
                            let id: String = row.try_get(0).map_err(db_err)?;
                            new.push(Uuid::parse_str(&id).map_err(|e| {
                                StoreError::Database(format!("a stored id is not a UUID: {e}"))
                            })?);
                        }
                    } else {
                        q.execute(&mut *tx).await.map_err(db_err)?;
                    }
                }
                tx.commit().await.map_err(db_err)?;
                Ok(new)
            }
        }

        #[async_trait]
        impl LogStore for $store {
            async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
                self.insert_rows(records, false).await.map(|_| ())
            }

            async fn insert_reporting_new(
                &self,
                records: &[RequestRecord],
            ) -> Result<Vec<Uuid>, StoreError> {
                self.insert_rows(records, true).await
            }

            async fn get(&self, id: Uuid) -> Result<Option<RequestRecord>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM requests WHERE id = $1"
                )))
                .bind(id.hyphenated().to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
                row.map(|r| decode_row!(r)).transpose()
            }

            async fn list(&self, q: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError> {
                let columns = if q.without_bodies {
                    COLUMNS_WITHOUT_BODIES
                } else {
                    COLUMNS
                };
                let mut qb = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {columns} FROM requests WHERE 1 = 1"
                ));
                if let Some(m) = &q.model {
                    qb.push(" AND model = ").push_bind(indexed(m));
                }
                if let Some(s) = q.status {
                    qb.push(" AND status = ").push_bind(s.as_str());
                }
                if let Some(u) = &q.user {
                    qb.push(" AND user_id = ").push_bind(indexed(u));
                }
                if let Some(k) = &q.key {
                    qb.push(" AND key_id = ").push_bind(indexed(k));
                }
                if let Some(t) = q.since {
                    qb.push(" AND id >= ").push_bind(v7_floor(t));
                }
                if let Some(t) = q.finished_since {
                    qb.push(" AND finished_at >= ").push_bind(t);
                }
                if let Some(b) = q.before {
                    qb.push(" AND id < ").push_bind(b.hyphenated().to_string());
                }
                qb.push(" ORDER BY id DESC LIMIT ")
                    .push_bind(i64::from(q.limit.clamp(1, 1000)));
                let rows = qb.build().fetch_all(&self.pool).await.map_err(db_err)?;
                rows.into_iter().map(|r| decode_row!(r)).collect()
            }

            async fn count(&self) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM requests")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(n.max(0) as u64)
            }

            async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}

macro_rules! decode_row {
    ($r:expr) => {{
        let r = $r;
        (|| -> Result<RequestRecord, sqlx::Error> {
            let id: String = r.try_get("id")?;
            let status: String = r.try_get("status")?;
            let usage_source: String = r.try_get("usage_source")?;
            let tags: Vec<String> = from_json_text(&r.try_get::<String, _>("tags")?)?;
            let metadata: serde_json::Value = from_json_text(&r.try_get::<String, _>("metadata")?)?;
            let request_body = r
                .try_get::<Option<String>, _>("request_body")?
                .map(|t| RawJson::from_text(t).map_err(|e| sqlx::Error::Decode(Box::new(e))))
                .transpose()?;
            let response_body = r
                .try_get::<Option<String>, _>("response_body")?
                .map(|t| RawJson::from_text(t).map_err(|e| sqlx::Error::Decode(Box::new(e))))
                .transpose()?;
            let attempt_log: Vec<sluice_core::record::Attempt> =
                from_json_text(&r.try_get::<String, _>("attempt_log")?)?;
            let route: Option<serde_json::Value> = r
                .try_get::<Option<String>, _>("route")?
                .map(|t| from_json_text(&t))
                .transpose()?;
            Ok(RequestRecord {
                id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
                endpoint: r.try_get("endpoint")?,
                model: r.try_get("model")?,
                provider: r.try_get("provider")?,
                deployment: r.try_get("deployment")?,
                attempts: r
                    .try_get::<i64, _>("attempts")?
                    .clamp(0, i64::from(u32::MAX)) as u32,
                status: RecordStatus::parse(&status).unwrap_or(RecordStatus::Error),
                http_status: r.try_get::<i64, _>("http_status")?.clamp(0, 999) as u16,
                error_code: r.try_get("error_code")?,
                error_message: r.try_get("error_message")?,
                stream: r.try_get("stream")?,
                latency_ms: r.try_get("latency_ms")?,
                ttft_ms: r.try_get("ttft_ms")?,
                prompt_tokens: r.try_get::<i64, _>("prompt_tokens")?.max(0) as u64,
                completion_tokens: r.try_get::<i64, _>("completion_tokens")?.max(0) as u64,
                cached_tokens: r.try_get::<i64, _>("cached_tokens")?.max(0) as u64,
                usage_source: UsageSource::parse(&usage_source),
                cost_usd: r.try_get("cost_usd")?,
                finish_reason: r.try_get("finish_reason")?,
                user: r.try_get("user_id")?,
                session: r.try_get("session_id")?,
                tags,
                metadata,
                request_body,
                response_body,
                attempt_log,
                route,
                key_id: r.try_get("key_id")?,
                cache: r.try_get("cache")?,
                cost_saved_usd: r.try_get("cost_saved_usd")?,
            })
        })()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
    }};
}

/// Rows in the largest INSERT statement. A batch is split into statements of this many rows and
/// then powers of two below it (a batch of 100 is 64 + 32 + 4), so at most
/// `INSERT_SIZES` statements are ever prepared per connection, each parsed once and reused from
/// the statement cache. 64 rows × 33 columns stays far under SQLite's 32766 bound variables.
const MAX_INSERT_ROWS: usize = 64;
const INSERT_SIZES: usize = MAX_INSERT_ROWS.trailing_zeros() as usize + 1;

/// How a backend's SQL writes bound parameters. SQLite takes anonymous `?`: it resolves a
/// numbered `$N` by searching its list of parameter names, which over thousands of parameters
/// costs more than the insert itself. PostgreSQL only takes `$N`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Placeholders {
    Anonymous,
    Numbered,
}

/// The next statement for a batch with `remaining` records left: its SQL and how many rows it
/// takes (the largest power of two not above `remaining`, capped at `MAX_INSERT_ROWS`).
fn insert_chunk(remaining: usize, style: Placeholders, returning: bool) -> (&'static str, usize) {
    type Sizes = std::sync::OnceLock<Vec<String>>;
    static CELLS: [Sizes; 4] = [Sizes::new(), Sizes::new(), Sizes::new(), Sizes::new()];
    let cell = &CELLS[usize::from(style == Placeholders::Numbered) * 2 + usize::from(returning)];
    let sql = cell.get_or_init(|| {
        (0..INSERT_SIZES)
            .map(|k| insert_sql(1 << k, style, returning))
            .collect()
    });
    let rows = remaining.clamp(1, MAX_INSERT_ROWS);
    let k = rows.ilog2() as usize;
    (sql[k].as_str(), 1 << k)
}

/// `INSERT INTO requests (…) VALUES (…), (…) ON CONFLICT (id) DO NOTHING` for `rows` rows
/// (`RETURNING id` with `returning`: the ids of the rows it inserted).
fn insert_sql(rows: usize, style: Placeholders, returning: bool) -> String {
    let columns = COLUMNS.split(',').count();
    let mut sql = format!("INSERT INTO requests ({COLUMNS}) VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..columns {
            if c > 0 {
                sql.push_str(", ");
            }
            match style {
                Placeholders::Anonymous => sql.push('?'),
                Placeholders::Numbered => sql.push_str(&format!("${}", row * columns + c + 1)),
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (id) DO NOTHING");
    if returning {
        sql.push_str(" RETURNING id");
    }
    sql
}

/// Text for a TEXT column. PostgreSQL's text cannot hold NUL, so both backends store it as U+FFFD
/// (JSON columns keep `\u0000` escapes exactly).
fn text(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// JSON columns are TEXT on both backends: JSON text keeps every string exactly (a NUL is the
/// escape `\u0000`, which PostgreSQL's jsonb would refuse).
fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn from_json_text<T: serde::de::DeserializeOwned>(t: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(t).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn opt_text(s: &Option<String>) -> Option<String> {
    s.as_deref().map(text)
}

/// The most tokens a record stores per count: far beyond any real request, and low enough that
/// millions of records still sum within a 64-bit integer (a broken upstream may report anything).
const MAX_STORED_TOKENS: u64 = 1 << 40;

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A token count as stored (see [`MAX_STORED_TOKENS`]).
fn stored_tokens(v: u64) -> i64 {
    v.min(MAX_STORED_TOKENS) as i64
}

/// The most bytes of an indexed text column (model, user, key id, team): PostgreSQL cannot index
/// a much longer value, and one such record would fail its whole batch. Longer values are cut at
/// a character boundary, when stored and when looked up alike.
const MAX_INDEXED_BYTES: usize = 1024;

/// An indexed text value as stored (see [`MAX_INDEXED_BYTES`]).
fn indexed(s: &str) -> String {
    let mut s = text(s);
    let mut end = s.len().min(MAX_INDEXED_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

store_impl!(SqliteStore, sqlx::Sqlite, Placeholders::Anonymous);
store_impl!(PgStore, sqlx::Postgres, Placeholders::Numbered);

macro_rules! key_store_impl {
    ($store:ty) => {
        #[async_trait]
        impl KeyStore for $store {
            async fn insert_key(&self, k: &VirtualKey) -> Result<(), StoreError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
                )))
                .bind(&k.id)
                .bind(text(&k.name))
                .bind(&k.hash)
                .bind(json_text(&k.owner))
                .bind(json_text(&k.models))
                .bind(k.rpm.map(clamp_i64))
                .bind(k.tpm.map(clamp_i64))
                .bind(k.max_parallel.map(i64::from))
                .bind(json_text(&k.budget))
                .bind(k.expires_at)
                .bind(json_text(&k.metadata))
                .bind(k.created_at)
                .bind(k.updated_at)
                .bind(k.revoked_at)
                .bind(k.role.map(|r| r.as_str()))
                .bind(k.created_by.as_deref().map(text))
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(())
            }

            async fn get_key(&self, id: &str) -> Result<Option<VirtualKey>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"
                )))
                // A NUL (which no id holds) would be refused by PostgreSQL: no such key.
                .bind(text(id))
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
                row.map(|r| decode_key!(r)).transpose()
            }

            async fn list_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at DESC, id"
                )))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.into_iter().map(|r| decode_key!(r)).collect()
            }

            async fn keys_changed_since(
                &self,
                since: DateTime<Utc>,
            ) -> Result<Vec<VirtualKey>, StoreError> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE updated_at >= $1"
                )))
                .bind(since)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.into_iter().map(|r| decode_key!(r)).collect()
            }

            async fn rotate_key(
                &self,
                id: &str,
                hash: &str,
                at: DateTime<Utc>,
            ) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE api_keys SET key_hash = $1, updated_at = $2 WHERE id = $3 AND revoked_at IS NULL",
                )
                .bind(hash)
                .bind(at)
                .bind(text(id))
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1, updated_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                )
                .bind(at)
                .bind(text(id))
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}

macro_rules! decode_key {
    ($r:expr) => {{
        let r = $r;
        (|| -> Result<VirtualKey, sqlx::Error> {
            Ok(VirtualKey {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                hash: r.try_get("key_hash")?,
                owner: from_json_text(&r.try_get::<String, _>("owner")?)?,
                models: from_json_text(&r.try_get::<String, _>("models")?)?,
                rpm: r.try_get::<Option<i64>, _>("rpm")?.map(|v| v.max(0) as u64),
                tpm: r.try_get::<Option<i64>, _>("tpm")?.map(|v| v.max(0) as u64),
                max_parallel: r
                    .try_get::<Option<i64>, _>("max_parallel")?
                    .map(|v| v.clamp(0, i64::from(u32::MAX)) as u32),
                budget: from_json_text(&r.try_get::<String, _>("budget")?)?,
                expires_at: r.try_get("expires_at")?,
                metadata: from_json_text(&r.try_get::<String, _>("metadata")?)?,
                created_at: r.try_get("created_at")?,
                updated_at: r.try_get("updated_at")?,
                revoked_at: r.try_get("revoked_at")?,
                role: r
                    .try_get::<Option<String>, _>("role")?
                    .and_then(|s| Role::parse(&s)),
                created_by: r.try_get("created_by")?,
            })
        })()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
    }};
}

key_store_impl!(SqliteStore);
key_store_impl!(PgStore);

macro_rules! audit_store_impl {
    ($store:ty) => {
        #[async_trait]
        impl AuditStore for $store {
            async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
                sqlx::query(
                    // An entry written again (a retry after a lost answer) is kept once.
                    "INSERT INTO audit_log (id, at, actor, role, action, target, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&e.id)
                .bind(e.at)
                .bind(text(&e.actor))
                .bind(&e.role)
                .bind(text(&e.action))
                .bind(e.target.as_deref().map(text))
                .bind(text(&e.outcome))
                .bind(json_text(&e.detail))
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(())
            }

            async fn list_audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, at, actor, role, action, target, outcome, detail FROM audit_log ORDER BY id DESC LIMIT $1",
                )
                .bind(i64::from(limit.clamp(1, 1000)))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
                rows.into_iter()
                    .map(|r| {
                        (|| -> Result<AuditEntry, sqlx::Error> {
                            Ok(AuditEntry {
                                id: r.try_get("id")?,
                                at: r.try_get("at")?,
                                actor: r.try_get("actor")?,
                                role: r.try_get("role")?,
                                action: r.try_get("action")?,
                                target: r.try_get("target")?,
                                outcome: r.try_get("outcome")?,
                                detail: from_json_text(&r.try_get::<String, _>("detail")?)?,
                            })
                        })()
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                    })
                    .collect()
            }
        }
    };
}

audit_store_impl!(SqliteStore);
audit_store_impl!(PgStore);

/// A record's team: its own column (set from the `team` entry of its metadata, which a virtual
/// key's owner fills), indexed with the id for spend since a point in time.
const TEAM_SQLITE: &str = "team";
const TEAM_PG: &str = "team";

/// The UTC day a record started, `YYYY-MM-DD`. SQLite keeps `started_at` as RFC 3339 text in
/// UTC (`2026-01-31T23:59:59.123456+00:00`), so the day is its first ten characters.
const DAY_SQLITE: &str = "substr(started_at, 1, 10)";
const DAY_PG: &str = "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')";

/// The aggregates of a usage row; `CAST`s give both backends the same column types (SQLite's
/// `SUM` of nothing is NULL, PostgreSQL's `SUM` of `BIGINT` is `NUMERIC`).
const USAGE_AGGREGATES: &str = "COUNT(*) AS requests, \
    CAST(COALESCE(SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors, \
    CAST(COALESCE(SUM(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END), 0) AS BIGINT) AS cache_hits, \
    CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens, \
    CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) AS cost_usd, \
    CAST(COALESCE(SUM(cost_saved_usd), 0) AS DOUBLE PRECISION) AS cost_saved_usd";

/// The SQL expression of a usage dimension, given the backend's team and day expressions.
fn dim_sql(dim: UsageDim, team: &'static str, day: &'static str) -> &'static str {
    match dim {
        UsageDim::Key => "key_id",
        UsageDim::User => "user_id",
        UsageDim::Team => team,
        UsageDim::Model => "model",
        UsageDim::Day => day,
    }
}

/// Usage rows in order of their group values, dimension by dimension, with records that have no
/// value (`None`) after the others. Sorted here rather than in SQL so both backends agree (byte
/// order, whatever the PostgreSQL collation).
fn sort_usage(rows: &mut [UsageRow]) {
    fn key(r: &UsageRow) -> impl Iterator<Item = (bool, Option<&str>)> {
        r.group.iter().map(|v| (v.is_none(), v.as_deref()))
    }
    rows.sort_by(|a, b| key(a).cmp(key(b)));
}

macro_rules! usage_store_impl {
    ($store:ty, $db:ty, $team:expr, $day:expr) => {
        #[async_trait]
        impl UsageStore for $store {
            async fn spend(&self, who: &Spender, since: DateTime<Utc>) -> Result<f64, StoreError> {
                // Key and user ride the `(key_id, id)` and `(user_id, id)` indexes; a team is
                // summed over the period's records (a range of the primary key).
                let (column, value) = match who {
                    Spender::Key(k) => ("key_id", indexed(k)),
                    Spender::User(u) => ("user_id", indexed(u)),
                    Spender::Team(t) => ($team, indexed(t)),
                };
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "SELECT CAST(COALESCE(SUM(cost_usd), 0) AS DOUBLE PRECISION) FROM requests WHERE ",
                );
                qb.push(column)
                    .push(" = ")
                    .push_bind(value)
                    .push(" AND id >= ")
                    .push_bind(v7_floor(since));
                if matches!(who, Spender::Team(_)) {
                    // A team spends through its keys; a request without a key cannot charge a
                    // team by naming it in its metadata.
                    qb.push(" AND key_id IS NOT NULL");
                }
                qb.build_query_scalar::<f64>()
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_err)
            }

            async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
                let dims: Vec<&'static str> = q
                    .group_by
                    .iter()
                    .map(|d| dim_sql(*d, $team, $day))
                    .collect();
                let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT ");
                for (i, d) in dims.iter().enumerate() {
                    qb.push(d).push(" AS g").push(i).push(", ");
                }
                qb.push(USAGE_AGGREGATES).push(" FROM requests WHERE 1 = 1");
                if let Some(t) = q.since {
                    qb.push(" AND id >= ").push_bind(v7_floor(t));
                }
                if let Some(t) = q.until {
                    qb.push(" AND id < ").push_bind(v7_floor(t));
                }
                if let Some(k) = &q.key {
                    qb.push(" AND key_id = ").push_bind(indexed(k));
                }
                if let Some(u) = &q.user {
                    qb.push(" AND user_id = ").push_bind(indexed(u));
                }
                if let Some(t) = &q.team {
                    qb.push(" AND ").push($team).push(" = ").push_bind(indexed(t));
                }
                if let Some(m) = &q.model {
                    qb.push(" AND model = ").push_bind(indexed(m));
                }
                if !dims.is_empty() {
                    qb.push(" GROUP BY ").push(dims.join(", "));
                }
                // Not kept in the statement cache: the shape varies with the query.
                let rows = qb
                    .build()
                    .persistent(false)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_err)?;
                let mut out = rows
                    .iter()
                    .map(|r| {
                        (|| -> Result<UsageRow, sqlx::Error> {
                            let count = |c: &str| -> Result<u64, sqlx::Error> {
                                Ok(r.try_get::<i64, _>(c)?.max(0) as u64)
                            };
                            Ok(UsageRow {
                                group: (0..dims.len())
                                    .map(|i| r.try_get::<Option<String>, _>(i))
                                    .collect::<Result<_, _>>()?,
                                requests: count("requests")?,
                                errors: count("errors")?,
                                cache_hits: count("cache_hits")?,
                                prompt_tokens: count("prompt_tokens")?,
                                completion_tokens: count("completion_tokens")?,
                                cost_usd: r.try_get("cost_usd")?,
                                cost_saved_usd: r.try_get("cost_saved_usd")?,
                            })
                        })()
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                sort_usage(&mut out);
                Ok(out)
            }
        }
    };
}

usage_store_impl!(SqliteStore, sqlx::Sqlite, TEAM_SQLITE, DAY_SQLITE);
usage_store_impl!(PgStore, sqlx::Postgres, TEAM_PG, DAY_PG);

const CACHE_COLUMNS: &str = "key, namespace, model, body, cost_usd, created_at, expires_at";

/// The key of the cache's generation row (see `CacheStore::cache_generation`): no entry's key
/// (a hex digest) looks like it.
const CACHE_GENERATION_KEY: &str = "sluice:generation";

/// The generation row's expiry: never (so that purges leave it).
fn never_expires() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

macro_rules! cache_store_impl {
    ($store:ty) => {
        #[async_trait]
        impl CacheStore for $store {
            async fn cache_get(
                &self,
                key: &str,
                now: DateTime<Utc>,
            ) -> Result<Option<CacheEntry>, StoreError> {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {CACHE_COLUMNS} FROM cache_entries WHERE key = $1 AND expires_at > $2"
                )))
                .bind(text(key))
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
                row.map(|r| {
                    (|| -> Result<CacheEntry, sqlx::Error> {
                        Ok(CacheEntry {
                            key: r.try_get("key")?,
                            namespace: r.try_get("namespace")?,
                            model: r.try_get("model")?,
                            body: r.try_get("body")?,
                            cost_usd: r.try_get("cost_usd")?,
                            created_at: r.try_get("created_at")?,
                            expires_at: r.try_get("expires_at")?,
                        })
                    })()
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
            }

            async fn cache_put(&self, e: &CacheEntry) -> Result<(), StoreError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO cache_entries ({CACHE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (key) DO UPDATE SET namespace = excluded.namespace, \
                     model = excluded.model, body = excluded.body, cost_usd = excluded.cost_usd, \
                     created_at = excluded.created_at, expires_at = excluded.expires_at"
                )))
                .bind(text(&e.key))
                .bind(text(&e.namespace))
                .bind(text(&e.model))
                .bind(text(&e.body))
                .bind(e.cost_usd)
                .bind(e.created_at)
                .bind(e.expires_at)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
                Ok(())
            }

            async fn cache_purge(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
                let done = sqlx::query("DELETE FROM cache_entries WHERE expires_at <= $1")
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db_err)?;
                Ok(done.rows_affected())
            }

            async fn cache_clear(&self, namespace: Option<&str>) -> Result<u64, StoreError> {
                let mut tx = self.pool.begin().await.map_err(db_err)?;
                let done = match namespace {
                    Some(ns) => {
                        sqlx::query("DELETE FROM cache_entries WHERE namespace = $1 AND key <> $2")
                            .bind(text(ns))
                            .bind(CACHE_GENERATION_KEY)
                            .execute(&mut *tx)
                            .await
                    }
                    None => {
                        sqlx::query("DELETE FROM cache_entries WHERE key <> $1")
                            .bind(CACHE_GENERATION_KEY)
                            .execute(&mut *tx)
                            .await
                    }
                }
                .map_err(db_err)?;
                // The generation is a row of its own that never expires, its number in `body`.
                sqlx::query(
                    "INSERT INTO cache_entries (key, namespace, model, body, cost_usd, created_at, expires_at) \
                     VALUES ($1, '', '', '1', 0, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET \
                     body = CAST(CAST(cache_entries.body AS BIGINT) + 1 AS TEXT), created_at = excluded.created_at",
                )
                .bind(CACHE_GENERATION_KEY)
                .bind(Utc::now())
                .bind(never_expires())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(done.rows_affected())
            }

            async fn cache_generation(&self) -> Result<Option<u64>, StoreError> {
                let body: Option<String> =
                    sqlx::query_scalar("SELECT body FROM cache_entries WHERE key = $1")
                        .bind(CACHE_GENERATION_KEY)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db_err)?;
                Ok(Some(body.and_then(|b| b.parse().ok()).unwrap_or(0)))
            }
        }
    };
}

cache_store_impl!(SqliteStore);
cache_store_impl!(PgStore);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_floor_orders_with_real_ids() {
        let before = Utc::now();
        std::thread::sleep(Duration::from_millis(2));
        let id = Uuid::now_v7().hyphenated().to_string();
        assert!(id >= v7_floor(before));
        let later = Utc::now() + chrono::Duration::seconds(1);
        assert!(id < v7_floor(later));
    }

    /// Batches split into the largest statements first, then powers of two: every record in
    /// exactly one statement, and only `INSERT_SIZES` distinct statements.
    #[test]
    fn the_queue_byte_budget_is_checked() {
        let parse = |t: &str| serde_json::from_str::<StoreConfig>(t).expect("parses");
        assert_eq!(
            StoreConfig::default().queue_bytes,
            128 * 1024 * 1024,
            "the default"
        );
        assert_eq!(parse(r#"{"queue_bytes": 1048576}"#).validate(), Ok(()));
        let err = parse(r#"{"queue_bytes": 1000}"#).validate().unwrap_err();
        assert!(err.starts_with("queue_bytes: must be at least"), "{err}");
    }

    #[test]
    fn batches_split_into_a_few_statement_sizes() {
        let columns = COLUMNS.split(',').count();
        for style in [Placeholders::Anonymous, Placeholders::Numbered] {
            let mut seen = std::collections::HashSet::new();
            for n in 1..=300 {
                let mut rest = n;
                let mut sizes = Vec::new();
                while rest > 0 {
                    let (sql, rows) = insert_chunk(rest, style, false);
                    assert!(rows <= rest && rows <= MAX_INSERT_ROWS);
                    match style {
                        Placeholders::Anonymous => {
                            assert_eq!(sql.matches('?').count(), rows * columns, "{sql}");
                            assert!(!sql.contains('$'));
                        }
                        Placeholders::Numbered => {
                            assert_eq!(sql.matches('$').count(), rows * columns, "{sql}");
                            assert!(sql.contains(&format!("${})", rows * columns)));
                        }
                    }
                    seen.insert(sql);
                    sizes.push(rows);
                    rest -= rows;
                }
                assert_eq!(sizes.iter().sum::<usize>(), n);
                assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{n}: {sizes:?}");
            }
            assert_eq!(seen.len(), INSERT_SIZES);
            assert_eq!(insert_chunk(100, style, false).1, 64);
            assert_eq!(insert_chunk(36, style, true).1, 32);
            assert_eq!(insert_chunk(4, style, false).1, 4);
        }
    }

    /// A database written by the first schema opens under the current one with its rows intact.
    #[tokio::test]
    async fn a_version_1_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        let old = SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                    .unwrap()
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::raw_sql(MIGRATIONS[0].1).execute(&old).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
             INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00Z');",
        )
        .execute(&old)
        .await
        .unwrap();
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO requests (id, started_at, finished_at, endpoint, model, attempts, status,
             http_status, stream, latency_ms, prompt_tokens, completion_tokens, cached_tokens,
             usage_source, cost_usd, tags, metadata)
             VALUES ($1, '2026-01-01T00:00:00Z', '2026-01-01T00:00:01Z', 'chat.completions', 'm',
             1, 'ok', 200, 0, 5.0, 1, 2, 0, 'provider', 0.5, '[]', 'null')",
        )
        .bind(id.hyphenated().to_string())
        .execute(&old)
        .await
        .unwrap();
        old.close().await;

        let store = SqliteStore::open(&url, 2).await.unwrap();
        let r = store.get(id).await.unwrap().expect("the old row survives");
        assert_eq!(r.model, "m");
        assert_eq!(r.cost_usd, 0.5);
        assert!(r.attempt_log.is_empty());
        assert_eq!(r.route, None);
        // Opening again applies nothing twice.
        drop(store);
        let again = SqliteStore::open(&url, 2).await.unwrap();
        assert_eq!(again.count().await.unwrap(), 1);
    }

    /// The user, team and key indexes leave out records without one (their definitions say so),
    /// and the spend queries (`column = value`) still use them, reading the index alone.
    #[tokio::test]
    async fn partial_indexes_serve_the_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let store = SqliteStore::open(&url, 2).await.unwrap();
        for (column, index) in [
            ("user_id", "requests_user"),
            ("team", "requests_team"),
            ("key_id", "requests_key"),
        ] {
            let keyed = if column == "team" {
                " AND key_id IS NOT NULL"
            } else {
                ""
            };
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN QUERY PLAN SELECT SUM(cost_usd) FROM requests WHERE {column} = ? AND id >= ?{keyed}"
            )))
            .bind("x")
            .bind("0")
            .fetch_all(&store.pool)
            .await
            .unwrap();
            let detail: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
            assert!(
                detail
                    .iter()
                    .any(|d| d.contains(&format!("COVERING INDEX {index} "))),
                "{column}: {detail:?}"
            );
            let sql: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = ?")
                .bind(index)
                .fetch_one(&store.pool)
                .await
                .unwrap();
            assert!(
                sql.ends_with(&format!("WHERE {column} IS NOT NULL")),
                "{sql}"
            );
        }
    }

    /// A server that refuses the connection is said to, with the reason (the pool's retries
    /// ended in "pool timed out while waiting for an open connection" after 10 s).
    #[tokio::test]
    async fn a_refused_postgres_connection_says_why() {
        let Err(e) = PgStore::open("postgres://u@127.0.0.1:1/db", 1).await else {
            panic!("nothing listens on port 1");
        };
        let e = e.to_string();
        assert!(e.contains("refused") && !e.contains("timed out"), "{e}");
    }

    /// A PostgreSQL database at version 5 whose records name teams of every shape migrates: a
    /// team too long for the index (a keyless client's metadata) is left out rather than
    /// failing the migration (and with it every replica's start), and only strings are teams.
    #[tokio::test]
    async fn a_version_5_postgres_database_with_odd_teams_migrates() {
        if !sluice_testkit::postgres::postgres_available() {
            eprintln!("skipping: PostgreSQL is not installed");
            return;
        }
        let pg = sluice_testkit::postgres::TempPostgres::start().expect("postgres starts");
        let url = pg.url();
        let old = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL);",
        )
        .execute(&old)
        .await
        .unwrap();
        for (version, _, ddl) in MIGRATIONS.iter().filter(|m| m.0 <= 5) {
            sqlx::raw_sql(*ddl).execute(&old).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, now())")
                .bind(version)
                .execute(&old)
                .await
                .unwrap();
        }
        // Random, so that compression cannot make it fit.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let long: String = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let teams = [
            serde_json::json!({"team": "ml"}),
            serde_json::json!({"team": long}),
            serde_json::json!({"team": true}),
        ];
        let mut ids = Vec::new();
        for metadata in &teams {
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO requests (id, started_at, finished_at, endpoint, model, attempts, status,
                 http_status, stream, latency_ms, prompt_tokens, completion_tokens, cached_tokens,
                 usage_source, cost_usd, tags, metadata, attempt_log)
                 VALUES ($1, now(), now(), 'chat.completions', 'm', 1, 'ok', 200, false, 5.0, 1, 2,
                 0, 'provider', 0.5, '[]', $2, '[]')",
            )
            .bind(id.hyphenated().to_string())
            .bind(metadata.to_string())
            .execute(&old)
            .await
            .unwrap();
            ids.push(id.hyphenated().to_string());
        }
        old.close().await;

        let store = PgStore::open(&url, 2)
            .await
            .expect("the migration succeeds");
        let mut got = Vec::new();
        for id in &ids {
            let team: Option<String> =
                sqlx::query_scalar("SELECT team FROM requests WHERE id = $1")
                    .bind(id)
                    .fetch_one(&store.pool)
                    .await
                    .unwrap();
            got.push(team);
        }
        assert_eq!(got, [Some("ml".to_string()), None, None]);
    }

    /// A database at version 4 (keys and audit log, no cache) gains the cache columns and table:
    /// its rows read back with no cache outcome and nothing saved, and count in usage.
    #[tokio::test]
    async fn a_version_4_database_is_migrated_to_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("v4.db").display());
        let old = SqlitePoolOptions::new()
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::from_str(&url)
                    .unwrap()
                    .create_if_missing(true),
            )
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
        )
        .execute(&old)
        .await
        .unwrap();
        for (version, ddl, _) in MIGRATIONS.iter().filter(|m| m.0 <= 4) {
            sqlx::raw_sql(*ddl).execute(&old).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, '2026-01-01T00:00:00Z')")
                .bind(version)
                .execute(&old)
                .await
                .unwrap();
        }
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO requests (id, started_at, finished_at, endpoint, model, attempts, status,
             http_status, stream, latency_ms, prompt_tokens, completion_tokens, cached_tokens,
             usage_source, cost_usd, tags, metadata, attempt_log, key_id)
             VALUES ($1, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00',
             'chat.completions', 'm', 1, 'ok', 200, 0, 5.0, 1, 2, 0, 'provider', 0.5, '[]',
             '{\"team\":\"ml\"}', '[]', 'k1')",
        )
        .bind(id.hyphenated().to_string())
        .execute(&old)
        .await
        .unwrap();
        old.close().await;

        let store = SqliteStore::open(&url, 2).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(versions, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        let r = store.get(id).await.unwrap().expect("the old row survives");
        assert_eq!(r.key_id.as_deref(), Some("k1"));
        assert_eq!(r.cache, None);
        assert_eq!(r.cost_saved_usd, 0.0);
        let since = DateTime::<Utc>::UNIX_EPOCH;
        let spend = store
            .spend(&Spender::Team("ml".into()), since)
            .await
            .unwrap();
        assert_eq!(spend, 0.5);
        assert_eq!(
            store
                .spend(&Spender::Key("k1".into()), since)
                .await
                .unwrap(),
            0.5
        );
        let rows = store
            .usage(&UsageQuery {
                group_by: vec![UsageDim::Day, UsageDim::Team],
                ..UsageQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].group,
            vec![Some("2026-01-01".to_string()), Some("ml".to_string())]
        );
        assert_eq!((rows[0].requests, rows[0].cost_saved_usd), (1, 0.0));
        // The cache table exists.
        let now = Utc::now();
        let entry = CacheEntry {
            key: "k".into(),
            namespace: "ns".into(),
            model: "m".into(),
            body: "{}".into(),
            cost_usd: 0.25,
            created_at: now,
            expires_at: now + chrono::Duration::seconds(60),
        };
        store.cache_put(&entry).await.unwrap();
        assert_eq!(store.cache_get("k", now).await.unwrap(), Some(entry));
        // Opening again applies nothing twice.
        drop(store);
        let again = SqliteStore::open(&url, 2).await.unwrap();
        assert_eq!(again.count().await.unwrap(), 1);
        assert_eq!(again.cache_clear(None).await.unwrap(), 1);
    }

    #[test]
    fn urls_are_checked() {
        assert!(backend_of("mysql://x").is_err());
        for empty in ["sqlite:", "sqlite://", "sqlite://?mode=rwc"] {
            let e = backend_of(empty).unwrap_err();
            assert!(e.contains("names no file"), "{empty}: {e}");
        }
        assert_eq!(backend_of("sqlite:x.db"), Ok(Backend::Sqlite));
        assert_eq!(backend_of("sqlite::memory:"), Ok(Backend::Sqlite));
        assert_eq!(backend_of("postgresql://u@h/db"), Ok(Backend::Postgres));
    }
}
