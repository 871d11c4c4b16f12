//! Costs that reach the store after a shared budget ledger was rebuilt without them.
//!
//! A ledger in Redis is rebuilt from the store's spend when it is gone (Redis restarted without
//! persistence, a flush, or dropped on purpose after costs were missed during an outage). A
//! request whose cost went into the lost ledger, and whose record was still queued for the
//! store or spilled while the store was down, is not in that sum, and the ledger would never
//! learn it: a budget could be overshot by everything spilled during an outage. [`LateCosts`]
//! wraps the request log: after each batch is written, the cost of each new record goes to
//! every ledger that was rebuilt after the request finished and before the batch was committed
//! ([`RedisState::late_costs`](crate::shared::RedisState::late_costs)); while a ledger is being
//! read from the store, the costs written meanwhile are kept for its creation to add. Clocks
//! are the replicas' own, so a request finishing within a few milliseconds of a rebuild may
//! still be missed or counted twice, and a record written between the read's start and its
//! snapshot counts twice (the safe side for a budget). Costs not yet sent when the process
//! stops, or whose batch timed out after its commit, are not sent.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use sluice_core::record::{LogStore, RecordQuery, RequestRecord, StoreError};
use uuid::Uuid;

use crate::budget::{ledgers_of, nanos};
use crate::state::Shared;

/// The request log, adding late costs to shared budget ledgers as records are written.
pub struct LateCosts {
    inner: Arc<dyn LogStore>,
    shared: Arc<Shared>,
}

impl LateCosts {
    pub fn new(inner: Arc<dyn LogStore>, shared: Arc<Shared>) -> Self {
        LateCosts { inner, shared }
    }

    /// The costs of `records` by ledger, as `(ledger, [(finished_ms, nanos)])`.
    fn costs<'a>(
        records: impl Iterator<Item = &'a RequestRecord>,
    ) -> Vec<(String, Vec<(i64, i64)>)> {
        let mut by_ledger: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
        for r in records {
            let cost = nanos(r.cost_usd);
            if cost <= 0 {
                continue;
            }
            for ledger in ledgers_of(r) {
                by_ledger
                    .entry(ledger)
                    .or_default()
                    .push((r.finished_at.timestamp_millis(), cost));
            }
        }
        by_ledger.into_iter().collect()
    }

    /// Sends the costs of a batch written at `written_ms` to Redis, in the background (the
    /// writer does not wait for it).
    fn send<'a>(&self, written_ms: i64, records: impl Iterator<Item = &'a RequestRecord>) {
        let costs = Self::costs(records);
        if costs.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Err(e) = shared.redis().late_costs(written_ms, &costs).await {
                tracing::debug!(error = %e, "late costs not sent to the budget ledgers");
            }
        });
    }
}

#[async_trait]
impl LogStore for LateCosts {
    async fn insert_batch(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
        self.insert_reporting_new(records).await.map(|_| ())
    }

    async fn insert_reporting_new(
        &self,
        records: &[RequestRecord],
    ) -> Result<Vec<Uuid>, StoreError> {
        let new = self.inner.insert_reporting_new(records).await?;
        // Just after the commit: a ledger read from the store before this saw none of these
        // records (one read between the commit and now may have, the only doubt left).
        let written_ms = Utc::now().timestamp_millis();
        // A record written before (a replay that repeats, or its first record tried alone)
        // was counted then.
        if new.len() == records.len() {
            self.send(written_ms, records.iter());
        } else if !new.is_empty() {
            let new: std::collections::HashSet<Uuid> = new.iter().copied().collect();
            self.send(written_ms, records.iter().filter(|r| new.contains(&r.id)));
        }
        Ok(new)
    }

    async fn get(&self, id: Uuid) -> Result<Option<RequestRecord>, StoreError> {
        self.inner.get(id).await
    }

    async fn list(&self, query: &RecordQuery) -> Result<Vec<RequestRecord>, StoreError> {
        self.inner.list(query).await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.inner.count().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
