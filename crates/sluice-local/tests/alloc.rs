//! A decode step allocates nothing: once the workspace and the KV caches have grown, 20 decode
//! steps of 4 sequences make no heap allocation, with f32 and with Q8_0 weights.
//!
//! This test binary counts every allocation of the process (`stats_alloc` wraps the system
//! allocator), so it holds this one test only: another test running at the same time would be
//! counted too.

mod common;
use common::model_path;

use std::alloc::System;

use sluice_local::llama::{
    KvCache, LlamaModel, LoadOptions, Sampler, SamplingParams, WeightFormat, Workspace,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn decode_steps_make_no_heap_allocation() {
    let Some(path) = model_path() else { return };
    // The model's code runs in a rayon pool, as in the engine; the pool's threads are started
    // before counting.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for weights in [WeightFormat::F32, WeightFormat::Q8_0] {
        let model = LlamaModel::load_with(&path, LoadOptions { weights }).unwrap();
        let prompts = [
            "Hello",
            "The capital of France is",
            "Rust is",
            "Once upon a time",
        ];
        let mut caches: Vec<KvCache> = Vec::new();
        let mut tokens = Vec::new();
        let mut ws = Workspace::new();
        let mut samplers: Vec<Sampler> = (0..prompts.len())
            .map(|i| {
                Sampler::new(if i % 2 == 0 {
                    SamplingParams::greedy()
                } else {
                    SamplingParams {
                        temperature: 0.8,
                        top_p: 0.9,
                        top_k: 40,
                        seed: i as u64,
                    }
                })
            })
            .collect();
        for p in prompts {
            let prompt = model.tokenizer().encode(p, false).unwrap();
            let mut cache = model.new_cache();
            cache.reserve(prompt.len() + 32).unwrap();
            let logits = model.prefill(&mut cache, &prompt).unwrap();
            tokens.push(sluice_local::llama::argmax(&logits));
            caches.push(cache);
        }
        let mut batch: Vec<(&mut KvCache, u32)> =
            caches.iter_mut().zip(tokens.iter().copied()).collect();
        let mut step = |batch: &mut [(&mut KvCache, u32)], ws: &mut Workspace| {
            pool.install(|| {
                let logits = model.decode_into(batch, ws).unwrap();
                let vocab = logits.len() / batch.len();
                for ((entry, l), s) in batch
                    .iter_mut()
                    .zip(logits.chunks_exact(vocab))
                    .zip(&mut samplers)
                {
                    entry.1 = s.sample(l);
                }
            });
        };
        for _ in 0..3 {
            step(&mut batch, &mut ws);
        }
        let region = Region::new(GLOBAL);
        for _ in 0..20 {
            step(&mut batch, &mut ws);
        }
        let stats = region.change();
        assert_eq!(
            (stats.allocations, stats.reallocations),
            (0, 0),
            "{weights:?}: 20 decode steps of 4 sequences allocated: {stats:?}"
        );
        drop(batch);
        assert!(caches.iter().all(|c| c.len() > 20));
    }
}
