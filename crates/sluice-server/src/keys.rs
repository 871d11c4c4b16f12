//! Virtual keys at the edge: an in-memory view of the key store that every request is checked
//! against (no database round trip on the hot path), kept fresh by polling the store — so a key
//! created or revoked on any replica takes effect on every replica within the poll interval —
//! and the `/api/keys` admin routes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use sluice_core::error::{Error, ErrorCode};
use sluice_core::keys::{
    Actor, AuditEntry, KeyRejection, KeySpec, KeyStore, Role, VirtualKey, generate, key_id,
};
use sluice_core::record::StoreError;

use crate::SharedState;
use crate::error::ApiError;

/// How often replicas pick up keys written elsewhere.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// Every how many polls all keys are read again (at [`REFRESH_EVERY`], every 30 s).
pub const RELOAD_EVERY: u32 = 60;

/// The longest one poll of the key store may take before it is given up.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a read of every key may take (a large key table reads for longer than a poll).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// `read`, or an error once `limit` has passed without an answer.
async fn bounded<T>(
    limit: Duration,
    read: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        Err(StoreError::Database(format!(
            "the key store gave no answer within {} s",
            limit.as_secs()
        )))
    })
}

/// The keys, by id.
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    keys: RwLock<HashMap<String, Arc<VirtualKey>>>,
    /// Where the next poll starts (a little before the last one began, for clock skew between
    /// replicas and writes that commit late).
    since: Mutex<DateTime<Utc>>,
    /// Whether any key is active, as of the last change or poll (keys that expire in between
    /// count as active until the next poll, at most [`REFRESH_EVERY`] later).
    any_active: std::sync::atomic::AtomicBool,
    /// Polls made, for the periodic full read.
    polls: std::sync::atomic::AtomicU32,
    /// When this replica last wrote each key it wrote since the last full read began.
    written: Mutex<HashMap<String, std::time::Instant>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("keys", &self.keys.read().len())
            .finish()
    }
}

impl KeyCache {
    /// Loads every key.
    pub async fn load(store: Arc<dyn KeyStore>) -> Result<Arc<KeyCache>, StoreError> {
        let started = Utc::now();
        let keys = store
            .list_keys()
            .await?
            .into_iter()
            .map(|k| (k.id.clone(), Arc::new(k)))
            .collect();
        let cache = Arc::new(KeyCache {
            store,
            keys: RwLock::new(keys),
            since: Mutex::new(started - chrono::Duration::seconds(5)),
            any_active: std::sync::atomic::AtomicBool::new(false),
            polls: std::sync::atomic::AtomicU32::new(0),
            written: Mutex::new(HashMap::new()),
        });
        cache.recount();
        Ok(cache)
    }

    /// Picks up keys written since the last poll; every [`RELOAD_EVERY`] polls, reads them all.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let poll = self
            .polls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if poll % RELOAD_EVERY == RELOAD_EVERY - 1 {
            return self.reload().await;
        }
        let started = Utc::now();
        let began = std::time::Instant::now();
        let since = *self.since.lock();
        let changed = bounded(REFRESH_TIMEOUT, self.store.keys_changed_since(since)).await?;
        self.merge(changed, began);
        self.recount();
        *self.since.lock() = started - chrono::Duration::seconds(5);
        Ok(())
    }

    /// Takes the keys a poll that began at `began` read, but not those this replica wrote since
    /// (by its own clock, not by `updated_at`, which other replicas' clocks write): a row read
    /// just before a local revocation or rotation must not put the old key back. The next poll
    /// looks back far enough to bring the store's version of those.
    fn merge(&self, changed: Vec<VirtualKey>, began: std::time::Instant) {
        let mut keys = self.keys.write();
        let written = self.written.lock();
        for k in changed {
            if written.get(&k.id).is_some_and(|at| *at >= began) {
                continue;
            }
            keys.insert(k.id.clone(), Arc::new(k));
        }
    }

    /// Reads every key again: a change whose `updated_at` fell behind the polls (a write that
    /// waited on a lock, a writer whose clock is behind) is seen here at the latest.
    pub async fn reload(&self) -> Result<(), StoreError> {
        self.reload_from(std::time::Instant::now()).await
    }

    /// [`reload`](Self::reload), keeping the keys this replica wrote from `began` on.
    async fn reload_from(&self, began: std::time::Instant) -> Result<(), StoreError> {
        let started = Utc::now();
        let all = bounded(RELOAD_TIMEOUT, self.store.list_keys()).await?;
        let mut fresh: HashMap<String, Arc<VirtualKey>> = all
            .into_iter()
            .map(|k| (k.id.clone(), Arc::new(k)))
            .collect();
        {
            let mut keys = self.keys.write();
            let mut written = self.written.lock();
            // A key this replica wrote while the list was read (a revocation, a rotation, a new
            // key) may be newer than the list's: it stays. (Other replicas' writes of that time
            // come with the next poll, which looks back to before this read.)
            for (id, at) in written.iter() {
                if *at >= began
                    && let Some(k) = keys.get(id)
                {
                    fresh.insert(id.clone(), k.clone());
                }
            }
            written.retain(|_, at| *at >= began);
            *keys = fresh;
        }
        self.recount();
        *self.since.lock() = started - chrono::Duration::seconds(5);
        Ok(())
    }

    /// Recomputes whether any key is active (off the request path: after loads and changes).
    fn recount(&self) {
        let now = Utc::now();
        let any = self.keys.read().values().any(|k| k.check(now).is_ok());
        self.any_active
            .store(any, std::sync::atomic::Ordering::Relaxed);
    }

    /// Polls the store every `every` for as long as the cache is in use. A poll that does not
    /// answer within [`REFRESH_TIMEOUT`] (a connection that hangs) is given up and the next one
    /// tried, so that one stuck query does not stop revocations from reaching this replica; a
    /// full read gets [`RELOAD_TIMEOUT`].
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(cache) = weak.upgrade() else { return };
                if let Err(e) = cache.refresh().await {
                    tracing::warn!(error = %e, "refreshing virtual keys failed; using the last known keys");
                }
            }
        });
    }

    /// Puts a key written by this replica in place at once.
    pub fn upsert(&self, k: VirtualKey) {
        let mut keys = self.keys.write();
        self.written
            .lock()
            .insert(k.id.clone(), std::time::Instant::now());
        keys.insert(k.id.clone(), Arc::new(k));
        drop(keys);
        self.recount();
    }

    /// The key a client presented, if it is a valid one.
    pub fn check(&self, presented: &str) -> Result<Arc<VirtualKey>, KeyRejection> {
        let id = key_id(presented).ok_or(KeyRejection::Unknown)?;
        let k = self
            .keys
            .read()
            .get(id)
            .cloned()
            .ok_or(KeyRejection::Unknown)?;
        if !k.matches(presented) {
            return Err(KeyRejection::NotItsSecret);
        }
        k.check(Utc::now())?;
        Ok(k)
    }

    /// The key whose whole secret was presented, whatever its status (for the record of a
    /// refused request: the holder of a revoked key is still that key's holder).
    pub fn holder(&self, presented: &str) -> Option<Arc<VirtualKey>> {
        let k = self.keys.read().get(key_id(presented)?).cloned()?;
        k.matches(presented).then_some(k)
    }

    /// Whether any key is in force: then every `/v1` request needs a key.
    pub fn any_active(&self) -> bool {
        self.any_active.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The key a request was made with, in the request's extensions.
#[derive(Debug, Clone)]
pub struct KeyContext(pub Arc<VirtualKey>);

impl KeyContext {
    /// The virtual key a request was made with, if any.
    pub fn of(extensions: &axum::http::Extensions) -> Option<Arc<VirtualKey>> {
        extensions.get::<KeyContext>().map(|k| k.0.clone())
    }
}

fn store_error(e: StoreError) -> Response {
    ApiError::openai(Error::new(
        ErrorCode::Unavailable,
        format!("the key store is unavailable: {e}"),
    ))
    .into_response()
}

fn no_keys() -> Response {
    ApiError::openai(Error::new(
        ErrorCode::Unavailable,
        "virtual keys are not available on this server",
    ))
    .into_response()
}

fn not_found(id: &str) -> Response {
    ApiError::openai(Error::new(
        ErrorCode::NotFound,
        format!("no key `{id}`; list them with GET /api/keys"),
    ))
    .into_response()
}

fn not_active(id: &str) -> Response {
    ApiError::openai(Error::new(
        ErrorCode::NotFound,
        format!("no active key `{id}` (unknown, or already revoked); list them with GET /api/keys"),
    ))
    .into_response()
}

tokio::task_local! {
    /// Whether the admin request under way has written its audit entry (its handler did): the
    /// admin middleware records a failed write that was not.
    pub static AUDITED: std::cell::Cell<bool>;
}

/// Records an admin action; a failure to record is logged, not answered.
pub async fn audit(
    state: &crate::AppState,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    outcome: &str,
    detail: serde_json::Value,
) {
    let _ = AUDITED.try_with(|a| a.set(true));
    let Some(store) = &state.audit else { return };
    let mut detail = detail;
    // What a key that is not an admin's fails or is refused is written 10 times a second at most
    // (those it may do always are): it cannot push the admins' actions out of the log's reach.
    if actor.role != Role::Admin && outcome != "ok" {
        static WINDOW: PerSecond = PerSecond::new(REFUSALS_PER_SECOND);
        let Some(skipped) = WINDOW.pass() else { return };
        if skipped > 0 {
            detail = serde_json::json!({"detail": detail, "unrecorded_refusals_before": skipped});
        }
    }
    record_audit(store, actor, action, target, outcome, detail).await;
}

/// How often and how long an audit entry the store did not take is written again.
const AUDIT_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const AUDIT_RETRIES: u32 = 30;

/// Writes an admin action to `store` (for an action with no request behind it, such as a reload
/// by SIGHUP). An entry the store does not take (busy, down) is written again in the background,
/// every 2 s for a minute, and logged if it never is.
pub async fn record_audit(
    store: &Arc<dyn sluice_core::keys::AuditStore>,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    outcome: &str,
    detail: serde_json::Value,
) {
    let entry = AuditEntry::new(
        &actor.name,
        actor.role.as_str(),
        action,
        target,
        outcome,
        detail,
    );
    tracing::info!(actor = %entry.actor, action, target = ?target, outcome, "admin action");
    if let Err(e) = store.append_audit(&entry).await {
        tracing::warn!(error = %e, action, "the audit log could not be written; trying again");
        let store = store.clone();
        tokio::spawn(async move {
            let mut last = e;
            for _ in 0..AUDIT_RETRIES {
                tokio::time::sleep(AUDIT_RETRY_EVERY).await;
                match store.append_audit(&entry).await {
                    Ok(()) => return,
                    Err(e) => last = e,
                }
            }
            tracing::error!(error = %last, action = %entry.action, target = ?entry.target, outcome = %entry.outcome, "the audit log could not be written; this entry is lost");
        });
    }
}

/// At most this many refusals at the admin door are recorded a second (the others are counted
/// in the log line of the next one recorded), so a flood of bad requests cannot fill the audit
/// log or compete with the request log for the store.
const REFUSALS_PER_SECOND: u32 = 10;

/// Records an attempt refused before its caller was known to have any role, in the background.
pub fn audit_refusal(state: &crate::AppState, who: &str, what: &str, outcome: &str) {
    static DOOR: PerSecond = PerSecond::new(REFUSALS_PER_SECOND);
    throttled_refusal(state, &DOOR, who, "none", what, outcome);
}

/// At most `per_second` events a second pass (`Some`, with how many were turned away since the
/// last that passed); the others are `None`. A fixed one-second window, one per call site.
pub(crate) struct PerSecond {
    window: Mutex<(i64, u32, u64)>,
    per_second: u32,
}

impl PerSecond {
    pub(crate) const fn new(per_second: u32) -> Self {
        PerSecond {
            window: Mutex::new((0, 0, 0)),
            per_second,
        }
    }

    pub(crate) fn pass(&self) -> Option<u64> {
        let mut w = self.window.lock();
        let second = Utc::now().timestamp();
        if w.0 != second {
            w.0 = second;
            w.1 = 0;
        }
        w.1 += 1;
        if w.1 > self.per_second {
            w.2 += 1;
            return None;
        }
        Some(std::mem::take(&mut w.2))
    }
}

/// [`audit_refusal`] of an actor with a role (a role refused the action): throttled alike, so
/// that a read-only key cannot push the real admin actions out of the log's reach.
pub fn audit_refusal_as(state: &crate::AppState, who: &str, role: &str, what: &str, outcome: &str) {
    // Apart from the door's: a flood of anonymous refusals does not hide the keys' ones.
    static ROLES: PerSecond = PerSecond::new(REFUSALS_PER_SECOND);
    throttled_refusal(state, &ROLES, who, role, what, outcome);
}

fn throttled_refusal(
    state: &crate::AppState,
    window: &PerSecond,
    who: &str,
    role: &str,
    what: &str,
    outcome: &str,
) {
    let Some(store) = state.audit.clone() else {
        return;
    };
    let Some(skipped) = window.pass() else { return };
    let what: String = what.chars().take(256).collect();
    let who: String = who.chars().take(64).collect();
    let detail = if skipped > 0 {
        serde_json::json!({"unrecorded_refusals_before": skipped})
    } else {
        serde_json::Value::Null
    };
    let entry = AuditEntry::new(&who, role, "denied", Some(&what), outcome, detail);
    tracing::info!(actor = %entry.actor, target = ?entry.target, outcome, skipped, "admin API refused");
    tokio::spawn(async move {
        if let Err(e) = store.append_audit(&entry).await {
            tracing::error!(error = %e, "the audit log could not be written");
        }
    });
}

/// Query parameters of `GET /api/audit`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// 1 to 1000 (default 100).
    pub limit: Option<String>,
}

/// `GET /api/keys` takes no query parameters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `GET /api/audit`: admin actions, newest first (`?limit=`, default 100).
pub async fn audit_log(
    State(state): State<SharedState>,
    q: Result<axum::extract::Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return ApiError::openai(crate::query_error(&e)).into_response(),
    };
    let Some(store) = &state.audit else {
        return no_keys();
    };
    let limit = match q.limit.as_deref().map(str::parse::<u32>) {
        None => 100,
        Some(Ok(l)) if (1..=1000).contains(&l) => l,
        Some(_) => {
            return ApiError::openai(
                Error::invalid("limit must be between 1 and 1000").with_param("limit"),
            )
            .into_response();
        }
    };
    match store.list_audit(limit).await {
        Ok(entries) => Json(serde_json::json!({"object": "list", "data": entries})).into_response(),
        Err(e) => store_error(e),
    }
}

/// A developer may rotate and revoke only the keys it created; a refusal is audited as
/// `action`.
async fn may_manage(
    state: &crate::AppState,
    cache: &KeyCache,
    actor: &Actor,
    id: &str,
    action: &str,
) -> Result<(), Response> {
    if actor.role != Role::Developer {
        return Ok(());
    }
    match cache.store.get_key(id).await {
        Ok(Some(k)) if k.created_by.as_deref() == Some(actor.name.as_str()) => Ok(()),
        Ok(_) => {
            audit(
                state,
                actor,
                action,
                Some(id),
                "forbidden",
                serde_json::Value::Null,
            )
            .await;
            Err(ApiError::openai(Error::new(
                ErrorCode::Forbidden,
                format!(
                    "a developer may manage only the keys it created; `{id}` is not one of them"
                ),
            ))
            .into_response())
        }
        Err(e) => Err(store_error(e)),
    }
}

/// A key's fields as answered, with the key itself when it is being shown (once).
fn key_body(k: &VirtualKey, secret: Option<String>) -> serde_json::Value {
    let mut body = k.to_json(Utc::now());
    if let Some(secret) = secret {
        body["key"] = serde_json::Value::String(secret);
    }
    body
}

/// Reads a key back after a change, puts it in this replica's cache at once, and answers it.
async fn answer_key(cache: &KeyCache, id: &str, secret: Option<String>) -> Response {
    match cache.store.get_key(id).await {
        Ok(Some(k)) => {
            cache.upsert(k.clone());
            Json(key_body(&k, secret)).into_response()
        }
        Ok(None) => not_found(id),
        Err(e) => store_error(e),
    }
}

/// `GET /api/keys`: every key, newest first (never a key or its hash).
pub async fn list(
    State(state): State<SharedState>,
    q: Result<axum::extract::Query<NoParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(e) = q {
        return ApiError::openai(crate::query_error(&e)).into_response();
    }
    let Some(cache) = &state.keys else {
        return no_keys();
    };
    match cache.store.list_keys().await {
        Ok(keys) => {
            let now = Utc::now();
            let data: Vec<_> = keys.iter().map(|k| k.to_json(now)).collect();
            Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// `GET /api/keys/{id}`.
pub async fn get(State(state): State<SharedState>, crate::IdPath(id): crate::IdPath) -> Response {
    let Some(cache) = &state.keys else {
        return no_keys();
    };
    match cache.store.get_key(&id).await {
        Ok(Some(k)) => Json(k.to_json(Utc::now())).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => store_error(e),
    }
}

/// `POST /api/keys`: creates a key; the answer is the only time the key is shown.
pub async fn create(
    State(state): State<SharedState>,
    Extension(actor): Extension<Actor>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(cache) = &state.keys else {
        return no_keys();
    };
    let body = match crate::body::read(&headers, body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    let spec: KeySpec = match crate::body::parse(&body) {
        Ok(s) => s,
        Err(e) => return ApiError::openai(e).into_response(),
    };
    // A creation refused: audited, and answered 403 with `why`.
    let refuse = |detail: serde_json::Value, why: String| {
        let (state, actor) = (&state, &actor);
        async move {
            audit(state, actor, "keys.create", None, "forbidden", detail).await;
            ApiError::openai(Error::new(ErrorCode::Forbidden, why)).into_response()
        }
    };
    if actor.role != Role::Admin && spec.role.is_some() {
        return refuse(
            serde_json::json!({"name": spec.name, "role": spec.role}),
            "only an admin may create keys with an admin-API role".into(),
        )
        .await;
    }
    let mut spec = spec;
    if actor.role == Role::Developer {
        // A developer's keys are within its own: it cannot mint its way past them.
        let own = match actor.name.strip_prefix("key:") {
            Some(id) => match cache.store.get_key(id).await {
                Ok(k) => k,
                Err(e) => return store_error(e),
            },
            None => None,
        };
        let Some(own) = own else {
            return ApiError::openai(Error::new(
                ErrorCode::Forbidden,
                "a developer's own key could not be found; only keys can create keys as developers",
            ))
            .into_response();
        };
        if let Err(why) = within(&mut spec, &own) {
            return refuse(
                serde_json::json!({"name": spec.name, "reason": why}),
                format!("a developer's keys stay within its own: {why}"),
            )
            .await;
        }
    }
    let (mut key, secret) = match spec.issue(Utc::now()) {
        Ok(v) => v,
        Err(e) => {
            let param = e.split(':').next().unwrap_or("").to_string();
            return ApiError::openai(Error::invalid(e).with_param(param)).into_response();
        }
    };
    key.created_by = Some(actor.name.clone());
    if let Err(e) = cache.store.insert_key(&key).await {
        return store_error(e);
    }
    cache.upsert(key.clone());
    audit(
        &state,
        &actor,
        "keys.create",
        Some(&key.id),
        "ok",
        serde_json::json!({"name": key.name, "role": key.role, "models": key.models}),
    )
    .await;
    let mut body = key_body(&key, Some(secret));
    // A model this configuration does not serve is allowed (a later configuration may), and
    // said: it is more often a misspelling.
    let router = state.gateway.router();
    let unknown: Vec<&String> = key
        .models
        .iter()
        .filter(|m| !router.names().any(|n| n == m.as_str()))
        .collect();
    if !unknown.is_empty() {
        body["warnings"] = serde_json::json!(
            unknown
                .iter()
                .map(|m| format!(
                    "no model `{m}` in this gateway's configuration; the key can use it only once a configuration serves it"
                ))
                .collect::<Vec<_>>()
        );
    }
    (StatusCode::CREATED, Json(body)).into_response()
}

/// Checks that a key a developer asks for stays within the developer's own key `own`: its
/// models among `own`'s, its limits, budgets and expiry no looser, its owner (user, team,
/// project) `own`'s. What the spec leaves out is taken from `own` (a key with no model list
/// would reach every model). Each key's budget is its own: keys minted so do not share one.
/// `Err` says what goes past.
fn within(spec: &mut KeySpec, own: &VirtualKey) -> Result<(), String> {
    if !own.models.is_empty() {
        if spec.models.is_empty() {
            spec.models.clone_from(&own.models);
        } else if let Some(m) = spec.models.iter().find(|m| !own.models.contains(m)) {
            return Err(format!("model `{m}` is not among its own models"));
        }
    }
    fn at_most<T: PartialOrd + Copy + std::fmt::Display>(
        name: &str,
        asked: &mut Option<T>,
        own: Option<T>,
    ) -> Result<(), String> {
        match (*asked, own) {
            (_, None) => Ok(()),
            (None, Some(o)) => {
                *asked = Some(o);
                Ok(())
            }
            (Some(a), Some(o)) if a <= o => Ok(()),
            (Some(a), Some(o)) => Err(format!("{name} {a} is above its own {o}")),
        }
    }
    at_most("rpm", &mut spec.rpm, own.rpm)?;
    at_most("tpm", &mut spec.tpm, own.tpm)?;
    at_most("max_parallel", &mut spec.max_parallel, own.max_parallel)?;
    at_most(
        "budget.daily_usd",
        &mut spec.budget.daily_usd,
        own.budget.daily_usd,
    )?;
    at_most(
        "budget.monthly_usd",
        &mut spec.budget.monthly_usd,
        own.budget.monthly_usd,
    )?;
    at_most(
        "budget.total_usd",
        &mut spec.budget.total_usd,
        own.budget.total_usd,
    )?;
    match (spec.expires_at, own.expires_at) {
        (_, None) => {}
        (None, Some(o)) => spec.expires_at = Some(o),
        (Some(a), Some(o)) if a <= o => {}
        (Some(a), Some(o)) => {
            return Err(format!(
                "expires_at {} is after its own {}",
                a.to_rfc3339(),
                o.to_rfc3339()
            ));
        }
    }
    // Its owner: the same user, team and project (a key of another user or team would spend
    // that one's budgets and limits).
    for (field, asked, mine) in [
        ("user", &mut spec.owner.user, &own.owner.user),
        ("team", &mut spec.owner.team, &own.owner.team),
        ("project", &mut spec.owner.project, &own.owner.project),
    ] {
        match (asked.as_deref(), mine) {
            (None, _) => asked.clone_from(mine),
            (Some(a), Some(m)) if a == m => {}
            (Some(a), Some(m)) => {
                return Err(format!("{field} `{a}` is not its own {field} `{m}`"));
            }
            (Some(a), None) => {
                return Err(format!("{field} `{a}`: its own key has no {field}"));
            }
        }
    }
    Ok(())
}

/// `DELETE /api/keys/{id}`: revokes a key, on every replica within a second.
pub async fn revoke(
    State(state): State<SharedState>,
    Extension(actor): Extension<Actor>,
    crate::IdPath(id): crate::IdPath,
) -> Response {
    let Some(cache) = &state.keys else {
        return no_keys();
    };
    if let Err(r) = may_manage(&state, cache, &actor, &id, "keys.revoke").await {
        return r;
    }
    match cache.store.revoke_key(&id, Utc::now()).await {
        Ok(true) => {
            audit(
                &state,
                &actor,
                "keys.revoke",
                Some(&id),
                "ok",
                serde_json::Value::Null,
            )
            .await;
        }
        Ok(false) => return not_active(&id),
        Err(e) => return store_error(e),
    }
    answer_key(cache, &id, None).await
}

/// `POST /api/keys/{id}/rotate`: a new secret for the same key; the old one stops working.
pub async fn rotate(
    State(state): State<SharedState>,
    Extension(actor): Extension<Actor>,
    crate::IdPath(id): crate::IdPath,
) -> Response {
    let Some(cache) = &state.keys else {
        return no_keys();
    };
    if let Err(r) = may_manage(&state, cache, &actor, &id, "keys.rotate").await {
        return r;
    }
    // A rotated key keeps its expiry: a new secret for an expired key would be refused at once.
    let before = match cache.store.get_key(&id).await {
        Ok(Some(k)) if k.expires_at.is_some_and(|t| t <= Utc::now()) => {
            return ApiError::openai(Error::invalid(format!(
                "key `{id}` expired at {}; a rotated key keeps its expiry, so issue a new key instead (POST /api/keys)",
                k.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            )))
            .into_response();
        }
        Ok(k) => k,
        Err(e) => return store_error(e),
    };
    let fresh = match generate(Some(&id)) {
        Ok(f) => f,
        Err(e) => return ApiError::openai(Error::internal(e)).into_response(),
    };
    let at = Utc::now();
    match cache.store.rotate_key(&id, &fresh.hash, at).await {
        Ok(true) => {
            audit(
                &state,
                &actor,
                "keys.rotate",
                Some(&id),
                "ok",
                serde_json::Value::Null,
            )
            .await;
        }
        Ok(false) => return not_active(&id),
        Err(e) => return store_error(e),
    }
    // The rotation is done: its new secret is answered even if the key cannot be read back
    // (else the old secret would stop working and the new one be lost).
    match cache.store.get_key(&id).await {
        Ok(Some(k)) => {
            cache.upsert(k.clone());
            Json(key_body(&k, Some(fresh.key))).into_response()
        }
        _ => match before {
            Some(mut k) => {
                k.hash = fresh.hash;
                k.updated_at = at;
                cache.upsert(k.clone());
                Json(key_body(&k, Some(fresh.key))).into_response()
            }
            None => not_found(&id),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit entry the store does not take at once (busy, down) is written again later,
    /// once (it was only logged, and lost).
    #[tokio::test]
    async fn an_audit_entry_the_store_refuses_is_written_again() {
        struct Flaky {
            refusals: std::sync::atomic::AtomicU32,
            kept: std::sync::Mutex<Vec<AuditEntry>>,
        }
        #[async_trait::async_trait]
        impl sluice_core::keys::AuditStore for Flaky {
            async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
                use std::sync::atomic::Ordering;
                if self.refusals.load(Ordering::SeqCst) > 0 {
                    self.refusals.fetch_sub(1, Ordering::SeqCst);
                    return Err(StoreError::Database("database is locked".into()));
                }
                self.kept.lock().unwrap().push(entry.clone());
                Ok(())
            }
            async fn list_audit(&self, _: u32) -> Result<Vec<AuditEntry>, StoreError> {
                Ok(self.kept.lock().unwrap().clone())
            }
        }
        let flaky = Arc::new(Flaky {
            refusals: std::sync::atomic::AtomicU32::new(1),
            kept: std::sync::Mutex::new(Vec::new()),
        });
        let store: Arc<dyn sluice_core::keys::AuditStore> = flaky.clone();
        let actor = Actor {
            name: "admin-key".into(),
            role: Role::Admin,
        };
        record_audit(
            &store,
            &actor,
            "failed",
            Some("POST /api/keys"),
            "service_unavailable",
            serde_json::Value::Null,
        )
        .await;
        assert!(flaky.kept.lock().unwrap().is_empty());
        tokio::time::sleep(AUDIT_RETRY_EVERY + std::time::Duration::from_millis(500)).await;
        let kept = flaky.kept.lock().unwrap().clone();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].outcome, "service_unavailable");
    }

    /// Keys in memory, written with whatever `updated_at` the caller gives; while `hang` is
    /// set, the next poll for changes never answers (and clears it).
    #[derive(Default)]
    struct Memory(Mutex<Vec<VirtualKey>>, std::sync::atomic::AtomicBool);

    #[async_trait::async_trait]
    impl KeyStore for Memory {
        async fn insert_key(&self, key: &VirtualKey) -> Result<(), StoreError> {
            self.0.lock().push(key.clone());
            Ok(())
        }
        async fn get_key(&self, id: &str) -> Result<Option<VirtualKey>, StoreError> {
            Ok(self.0.lock().iter().find(|k| k.id == id).cloned())
        }
        async fn list_keys(&self) -> Result<Vec<VirtualKey>, StoreError> {
            Ok(self.0.lock().clone())
        }
        async fn keys_changed_since(
            &self,
            since: DateTime<Utc>,
        ) -> Result<Vec<VirtualKey>, StoreError> {
            if self.1.swap(false, std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(self
                .0
                .lock()
                .iter()
                .filter(|k| k.updated_at >= since)
                .cloned()
                .collect())
        }
        async fn rotate_key(
            &self,
            id: &str,
            hash: &str,
            at: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            let mut keys = self.0.lock();
            let Some(k) = keys.iter_mut().find(|k| k.id == id) else {
                return Ok(false);
            };
            k.hash = hash.to_string();
            k.updated_at = at;
            Ok(true)
        }
        async fn revoke_key(&self, id: &str, at: DateTime<Utc>) -> Result<bool, StoreError> {
            let mut keys = self.0.lock();
            let Some(k) = keys.iter_mut().find(|k| k.id == id) else {
                return Ok(false);
            };
            k.revoked_at = Some(at);
            k.updated_at = at;
            Ok(true)
        }
    }

    /// A store holding one fresh key, its cache, the key and its secret.
    async fn one_key() -> (Arc<Memory>, Arc<KeyCache>, VirtualKey, String) {
        let store = Arc::new(Memory::default());
        let (key, secret) = KeySpec {
            name: "k".into(),
            ..KeySpec::default()
        }
        .issue(Utc::now())
        .unwrap();
        store.insert_key(&key).await.unwrap();
        let cache = KeyCache::load(store.clone()).await.unwrap();
        (store, cache, key, secret)
    }

    /// A revocation written with a time the polls have passed already (a write that waited on
    /// a lock, a writer whose clock is behind) still takes effect: at the periodic full read.
    #[tokio::test]
    async fn a_change_the_polls_missed_is_picked_up_by_the_full_read() {
        let (store, cache, key, secret) = one_key().await;
        assert!(cache.check(&secret).is_ok());
        let stale = Utc::now() - chrono::Duration::seconds(60);
        assert!(store.revoke_key(&key.id, stale).await.unwrap());
        cache.refresh().await.unwrap();
        assert!(
            cache.check(&secret).is_ok(),
            "the poll does not see a change dated before it"
        );
        for _ in 1..RELOAD_EVERY {
            cache.refresh().await.unwrap();
        }
        assert_eq!(cache.check(&secret).unwrap_err(), KeyRejection::Revoked);

        // What this replica wrote while the list was being read is not undone by the list.
        let (other, other_secret) = KeySpec {
            name: "o".into(),
            ..KeySpec::default()
        }
        .issue(Utc::now())
        .unwrap();
        store.insert_key(&other).await.unwrap();
        cache.reload().await.unwrap();
        assert!(cache.check(&other_secret).is_ok());
        let mut revoked = other.clone();
        revoked.revoked_at = Some(Utc::now());
        // Revoked here while a full read is under way (the read began before it, and the
        // store does not have the revocation yet).
        let began = std::time::Instant::now();
        cache.upsert(revoked);
        assert!(
            store
                .get_key(&other.id)
                .await
                .unwrap()
                .unwrap()
                .revoked_at
                .is_none()
        );
        cache.reload_from(began).await.unwrap();
        assert_eq!(
            cache.check(&other_secret).unwrap_err(),
            KeyRejection::Revoked
        );
    }

    /// A poll that read a key just before this replica revoked it does not put the old version
    /// back (the key worked again here until the next poll).
    #[tokio::test]
    async fn a_poll_older_than_a_local_write_does_not_undo_it() {
        let (store, cache, key, secret) = one_key().await;
        // The poll's answer, as read before the revocation below.
        let began = std::time::Instant::now();
        let before = store.keys_changed_since(key.updated_at).await.unwrap();
        let mut revoked = key.clone();
        let at = Utc::now() + chrono::Duration::milliseconds(1);
        revoked.revoked_at = Some(at);
        revoked.updated_at = at;
        cache.upsert(revoked);
        assert_eq!(cache.check(&secret).unwrap_err(), KeyRejection::Revoked);
        cache.merge(before, began);
        assert_eq!(cache.check(&secret).unwrap_err(), KeyRejection::Revoked);
    }

    /// A poll that never answers (a connection that hangs) is given up: a key revoked meanwhile
    /// is refused once the next poll runs, not never.
    #[tokio::test]
    async fn a_hanging_poll_does_not_stop_revocations() {
        let (store, cache, key, secret) = one_key().await;
        store.1.store(true, std::sync::atomic::Ordering::SeqCst);
        cache.spawn_refresher(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(store.revoke_key(&key.id, Utc::now()).await.unwrap());
        let started = std::time::Instant::now();
        while cache.check(&secret).is_ok() {
            assert!(
                started.elapsed() < REFRESH_TIMEOUT + Duration::from_secs(2),
                "the revocation never took effect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
