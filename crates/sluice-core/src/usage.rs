//! Spend and usage read from the request log, and the persistent tier of the exact cache.
//!
//! Budgets accrue from the records' `cost_usd`: [`UsageStore::spend`] sums it for one key, user
//! or team since a point in time (the start of the budget's period). [`UsageStore::usage`]
//! aggregates requests, tokens and cost by key, user, team, model and day for `sluice usage` and
//! `/api/usage`. [`CacheStore`] keeps cached answers across restarts and replicas that share a
//! store.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::record::StoreError;

/// Whose spend a budget counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Spender {
    /// A virtual key, by id (`requests.key_id`).
    Key(String),
    /// A user (`requests.user_id`).
    User(String),
    /// A team (the `team` entry of the record's metadata, set from the key's owner).
    Team(String),
}

impl Spender {
    /// `key:ID`, `user:NAME`, `team:NAME`.
    pub fn id(&self) -> String {
        match self {
            Spender::Key(k) => format!("key:{k}"),
            Spender::User(u) => format!("user:{u}"),
            Spender::Team(t) => format!("team:{t}"),
        }
    }

    /// For messages: "this API key (`ID`)", "user `alice`", "team `ml`".
    pub fn label(&self) -> String {
        match self {
            Spender::Key(k) => format!("API key `{k}`"),
            Spender::User(u) => format!("user `{u}`"),
            Spender::Team(t) => format!("team `{t}`"),
        }
    }
}

/// A dimension usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageDim {
    Key,
    User,
    Team,
    Model,
    /// The UTC day the request started, `YYYY-MM-DD`.
    Day,
}

impl UsageDim {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "key" => Some(UsageDim::Key),
            "user" => Some(UsageDim::User),
            "team" => Some(UsageDim::Team),
            "model" => Some(UsageDim::Model),
            "day" => Some(UsageDim::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UsageDim::Key => "key",
            UsageDim::User => "user",
            UsageDim::Team => "team",
            UsageDim::Model => "model",
            UsageDim::Day => "day",
        }
    }
}

/// What to aggregate: records started in `[since, until)`, optionally filtered, grouped by
/// `group_by` (in that order; empty: one total row).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageQuery {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub team: Option<String>,
    pub model: Option<String>,
    pub group_by: Vec<UsageDim>,
}

/// One group of a usage report. `group` holds one value per `group_by` dimension, in order
/// (`None` where records have none, e.g. requests made without a key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRow {
    pub group: Vec<Option<String>>,
    pub requests: u64,
    pub errors: u64,
    pub cache_hits: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub cost_saved_usd: f64,
}

impl UsageRow {
    /// The sum of `rows` as one ungrouped row (the report's total, taken from the very rows it
    /// shows, so the two always agree even while records arrive); zeros when there are none.
    pub fn total(rows: &[UsageRow]) -> UsageRow {
        let mut t = UsageRow {
            group: Vec::new(),
            requests: 0,
            errors: 0,
            cache_hits: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            cost_saved_usd: 0.0,
        };
        for r in rows {
            t.requests += r.requests;
            t.errors += r.errors;
            t.cache_hits += r.cache_hits;
            t.prompt_tokens += r.prompt_tokens;
            t.completion_tokens += r.completion_tokens;
            t.cost_usd += r.cost_usd;
            t.cost_saved_usd += r.cost_saved_usd;
        }
        t
    }
}

/// Spend and usage over the request log. The SQL stores implement it.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// The summed `cost_usd` of `who`'s records started at or after `since`.
    async fn spend(&self, who: &Spender, since: DateTime<Utc>) -> Result<f64, StoreError>;
    /// Aggregates, ordered by the group values (days ascending).
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;
}

/// One cached answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    /// The canonical request's hash, namespace included.
    pub key: String,
    pub namespace: String,
    /// The model the client asked for.
    pub model: String,
    /// The answer, a chat completion as JSON text.
    pub body: String,
    /// What the answer cost when it was made: a hit saves this much.
    pub cost_usd: f64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The persistent tier of the exact cache.
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// The entry under `key`, unless it is missing or expired at `now`.
    async fn cache_get(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<CacheEntry>, StoreError>;
    /// Stores (or replaces) an entry.
    async fn cache_put(&self, entry: &CacheEntry) -> Result<(), StoreError>;
    /// Deletes entries expired at `now`; returns how many.
    async fn cache_purge(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Deletes every entry, or those of one namespace; returns how many. Also moves the
    /// [generation](Self::cache_generation) on.
    async fn cache_clear(&self, namespace: Option<&str>) -> Result<u64, StoreError>;
    /// A number every clear changes, so that replicas can tell that another one cleared the
    /// shared tier and drop their own copies in memory. `None` where the tier has none.
    async fn cache_generation(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &str, requests: u64, cost: f64) -> UsageRow {
        UsageRow {
            group: vec![Some(group.into())],
            requests,
            errors: 1,
            cache_hits: 2,
            prompt_tokens: 10,
            completion_tokens: 5,
            cost_usd: cost,
            cost_saved_usd: 0.5,
        }
    }

    #[test]
    fn total_sums_every_column_and_drops_the_group() {
        let t = UsageRow::total(&[row("a", 3, 0.25), row("b", 4, 1.0)]);
        assert!(t.group.is_empty());
        assert_eq!(
            (
                t.requests,
                t.errors,
                t.cache_hits,
                t.prompt_tokens,
                t.completion_tokens
            ),
            (7, 2, 4, 20, 10)
        );
        assert!((t.cost_usd - 1.25).abs() < 1e-12 && (t.cost_saved_usd - 1.0).abs() < 1e-12);
        assert_eq!(UsageRow::total(&[]).requests, 0);
    }
}
