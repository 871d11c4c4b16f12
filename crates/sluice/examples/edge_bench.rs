//! The API edge's cost per request, in process: authenticating a virtual key, the rate limits
//! that cover it (key, user and global: rpm, tpm, max_parallel), its budget reservation, and an
//! exact-cache lookup that hits (canonical key, memory tier, the answer parsed as it is served).
//! Each iteration is timed alone; the report gives p50/p99/p99.9 against a baseline timed in the
//! same run: parsing the same request body, which every request pays anyway.
//!
//! With `--redis URL`, also times the same limits and a cache read through Redis (the shared
//! tier a replica reads when its memory misses).
//!
//!   cargo run --release -p sluice --example edge_bench [-- --iterations N] [--redis redis://127.0.0.1:6379]

use std::time::{Duration, Instant};

use sluice_core::keys::{Budget, KeySpec, Owner};
use sluice_core::usage::{CacheEntry, CacheStore};
use sluice_gateway::budget::{Budgets, Limit, Period};
use sluice_gateway::cache::{self, Cache, CacheConfig};
use sluice_gateway::limits::{KeyLimits, LimitSpec, Subject};
use sluice_types::openai::ChatRequest;

fn percentiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.99), at(0.999))
}

fn report(name: &str, v: Vec<Duration>, base: Option<(f64, f64, f64)>) -> (f64, f64, f64) {
    let p = percentiles(v);
    let ratio = base.map_or_else(
        || "(the baseline)".to_string(),
        |b| format!("(p99 ×{:.1} the baseline)", p.1 / b.1),
    );
    println!(
        "{name:<44} p50 {:>8.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs  {ratio}",
        p.0, p.1, p.2
    );
    p
}

fn body() -> Vec<u8> {
    let context = "Sluice routes requests between applications and model providers. ".repeat(14);
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "temperature": 0,
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "You answer from the context only."},
            {"role": "user", "content": format!("Context: {context}\nQuestion: what does Sluice route?")}
        ]
    }))
    .expect("body")
}

fn answer() -> String {
    serde_json::to_string(&serde_json::json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_764_000_000u64,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Requests between applications and model providers. ".repeat(12)}}],
        "usage": {"prompt_tokens": 230, "completion_tokens": 96, "total_tokens": 326}
    }))
    .expect("answer")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: usize = arg("--iterations").map_or(Ok(100_000), |s| s.parse())?;
    let redis_url = arg("--redis");

    let body = body();
    let presented_key;
    let keys = {
        let stores = sluice_store::open_all("sqlite::memory:", 1).await?;
        let cache = sluice_server::keys::KeyCache::load(stores.keys).await?;
        let (key, secret) = KeySpec {
            name: "bench".into(),
            owner: Owner {
                user: Some("alice".into()),
                team: Some("search".into()),
                project: None,
            },
            models: Vec::new(),
            rpm: Some(u64::MAX / 4),
            tpm: Some(u64::MAX / 4),
            max_parallel: Some(1_000_000),
            budget: Budget {
                daily_usd: Some(1e12),
                ..Budget::default()
            },
            expires_at: None,
            metadata: serde_json::Value::Null,
            role: None,
        }
        .issue(chrono::Utc::now())
        .map_err(anyhow::Error::msg)?;
        cache.upsert(key);
        presented_key = secret;
        cache
    };
    let limits = KeyLimits::default();
    let big = LimitSpec {
        rpm: Some(u64::MAX / 4),
        tpm: Some(u64::MAX / 4),
        max_parallel: Some(1_000_000),
    };
    let subjects_for = |key: &sluice_core::keys::VirtualKey| {
        vec![
            KeyLimits::key_subject(key),
            Subject {
                id: "user:alice".into(),
                label: "user `alice`".into(),
                spec: big,
            },
            Subject {
                id: "global".into(),
                label: "this gateway".into(),
                spec: big,
            },
        ]
    };
    let budgets = Budgets::new(None, None);
    let config = CacheConfig {
        enabled: true,
        ..CacheConfig::default()
    };
    let cache = Cache::new(config.clone(), None);
    let req: ChatRequest = serde_json::from_slice(&body)?;
    let k = keys
        .check(&presented_key)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let namespace = config.namespace_for(Some(&k.id), k.owner.team.as_deref());
    let key = cache::cache_key(&namespace, &req);
    cache.store(cache::entry(
        &config,
        &key,
        &namespace,
        &req.model,
        answer(),
        0.002,
        None,
    ));

    // Warm up both paths, then time each iteration alone.
    let mut baseline = Vec::with_capacity(n);
    let mut edge = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        let parsed: ChatRequest = serde_json::from_slice(&body)?;
        let took = t.elapsed();
        if i >= n / 10 {
            baseline.push(took);
        }
        std::hint::black_box(&parsed);

        let t = Instant::now();
        let k = keys
            .check(&presented_key)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let admitted = limits.admit_all(&subjects_for(&k), 330)?;
        let reservation = budgets
            .reserve(
                &[Limit {
                    spender: sluice_core::usage::Spender::Key(k.id.clone()),
                    period: Period::Day,
                    usd: 1e12,
                }],
                0.01,
            )
            .await?;
        let ns = config.namespace_for(Some(&k.id), k.owner.team.as_deref());
        let hit = cache
            .lookup(&cache::cache_key(&ns, &parsed))
            .await
            .ok_or_else(|| anyhow::anyhow!("the entry should be cached"))?;
        let served: sluice_types::openai::ChatCompletion = serde_json::from_str(&hit.body)?;
        let took = t.elapsed();
        if i >= n / 10 {
            edge.push(took);
        }
        std::hint::black_box(&served);
        drop(admitted);
        if let Some(r) = reservation {
            r.settle(0.0);
        }
    }
    println!("{n} iterations, request body {} bytes", body.len());
    let base = report("baseline: parse the request body", baseline, None);
    let p = report(
        "auth + limits + budget + cache hit (memory)",
        edge,
        Some(base),
    );
    println!(
        "target: auth + limits + cache lookup ≤ 100 µs p99 and a hit ≤ 500 µs p99 in process: {}",
        if p.1 <= 100.0 { "met" } else { "NOT met" }
    );

    if let Some(url) = redis_url {
        let redis = sluice_gateway::shared::RedisState::connect(&url, "sluice-bench")
            .await
            .map_err(anyhow::Error::msg)?;
        let entry = CacheEntry {
            key: key.clone(),
            namespace: namespace.clone(),
            model: req.model.clone(),
            body: answer(),
            cost_usd: 0.002,
            created_at: chrono::Utc::now(),
            expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
        };
        redis.cache_put(&entry).await?;
        let specs: Vec<(String, LimitSpec)> = subjects_for(&k)
            .into_iter()
            .map(|s| (s.id, s.spec))
            .collect();
        let m = n.min(20_000);
        let (mut limits_t, mut cache_t) = (Vec::with_capacity(m), Vec::with_capacity(m));
        for i in 0..m + m / 10 {
            let t = Instant::now();
            let admitted = redis.admit(&specs, 330).await?;
            let took = t.elapsed();
            if i >= m / 10 {
                limits_t.push(took);
            }
            std::hint::black_box(&admitted);
            let t = Instant::now();
            let got = redis
                .cache_get(&key, chrono::Utc::now())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the entry should be in Redis"))?;
            let served: sluice_types::openai::ChatCompletion = serde_json::from_str(&got.body)?;
            let took = t.elapsed();
            if i >= m / 10 {
                cache_t.push(took);
            }
            std::hint::black_box(&served);
            if let sluice_gateway::shared::SharedAdmit::Admitted { holder, .. } = admitted {
                let ids: Vec<String> = specs.iter().map(|s| s.0.clone()).collect();
                redis.release(&ids, &holder).await?;
            }
        }
        println!("Redis at {url}, {m} iterations");
        report("limits through Redis (one script)", limits_t, Some(base));
        let p = report("cache hit through Redis (GET + parse)", cache_t, Some(base));
        println!(
            "target: a hit ≤ 2 ms p99 with Redis on loopback: {}",
            if p.1 <= 2000.0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
