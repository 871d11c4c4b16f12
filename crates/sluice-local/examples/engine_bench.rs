//! Throughput of the local chat engine with continuous batching on and off, and time to first
//! token for a 200-token prompt.
//!
//! ```sh
//! cargo run --release -p sluice-local --example engine_bench -- models/SmolLM2-135M-Instruct.Q4_1.gguf [--threads 2] [--tokens 64] [--weights f32|q8_0|quantized]
//! ```
//!
//! For each mode (batching off, on) and each concurrency (1, 4, 16), it submits that many greedy
//! requests at once (distinct prompts, `max_tokens` tokens each, end-of-sequence ignored so every
//! request generates exactly that many) and reports generated tokens per second of wall time, and
//! the median and worst time to first token. Then it measures the time to first token of a single
//! request whose prompt is exactly 200 tokens (median of 5). Output: one JSON object per line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_local::engine::{Engine, EngineConfig, GenEvent, GenRequest};
use sluice_local::llama::{LlamaModel, LoadOptions, SamplingParams, WeightFormat};

const TEXT: &str = "The river starts high in the mountains, where snow melts in the spring sun and runs \
down through narrow valleys of stone and pine. It gathers streams from every side, grows wide and slow \
across the plain, feeds farms and towns, carries boats and stories, and finally reaches the sea, where \
its fresh water mixes with the salt of the ocean and the tides carry it away. People have lived along \
its banks for thousands of years, building bridges, mills and harbours, and every generation has told \
the same river a different story about where it came from and where it was going. Engineers measure \
its flow, poets describe its colour, and children throw stones into it to watch the rings spread out \
across the surface until they vanish against the far bank under the willows.";

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `n` requests at once; returns (total generated tokens, wall time, per-request TTFT).
fn run_batch(
    engine: &Engine,
    prompts: &[Vec<u32>],
    tokens: usize,
) -> (usize, Duration, Vec<Duration>) {
    let start = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut rx = engine
                .submit(GenRequest {
                    prompt: p.clone(),
                    max_tokens: tokens,
                    sampling: SamplingParams::greedy(),
                    stop: Vec::new(),
                    ignore_eos: true,
                })
                .expect("submit");
            std::thread::spawn(move || {
                let mut ttft = None;
                let mut generated = 0;
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        GenEvent::Text(_) => {
                            ttft.get_or_insert_with(|| start.elapsed());
                        }
                        GenEvent::Done {
                            completion_tokens, ..
                        } => {
                            generated = completion_tokens;
                            ttft.get_or_insert_with(|| start.elapsed());
                        }
                        GenEvent::Error(e) => panic!("generation failed: {e}"),
                    }
                }
                (generated, ttft.unwrap_or_default())
            })
        })
        .collect();
    let mut total = 0;
    let mut ttfts = Vec::new();
    for h in handles {
        let (g, t) = h.join().expect("request thread");
        total += g;
        ttfts.push(t);
    }
    (total, start.elapsed(), ttfts)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first().filter(|a| !a.starts_with("--")) else {
        eprintln!("usage: engine_bench MODEL.gguf [--threads N] [--tokens N]");
        std::process::exit(2);
    };
    let threads = arg(
        &args,
        "--threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let tokens = arg(&args, "--tokens", 64);
    let weights = args
        .iter()
        .position(|a| a == "--weights")
        .and_then(|i| args.get(i + 1))
        .map_or("f32", String::as_str);
    let model = Arc::new(
        LlamaModel::load_with(
            std::path::Path::new(path),
            LoadOptions {
                weights: match weights {
                    "f32" => WeightFormat::F32,
                    "q8_0" => WeightFormat::Q8_0,
                    _ => WeightFormat::AsStored,
                },
            },
        )
        .expect("load model"),
    );
    let tok = model.tokenizer();
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    // Distinct prompts: the text rotated by i words.
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let rotated = [&words[i * 3..], &words[..i * 3]].concat().join(" ");
            let p = format!("<|im_start|>user\nContinue this story: {rotated}<|im_end|>\n<|im_start|>assistant\n");
            tok.encode(&p, false).expect("tokenize")
        })
        .collect();

    for batching in [false, true] {
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                max_batch: 16,
                max_kv_bytes: 1 << 30,
                threads,
                batching,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        // Warm-up.
        run_batch(&engine, &prompts[..1], 4);
        for conc in [1usize, 4, 16] {
            let (total, wall, mut ttfts) = run_batch(&engine, &prompts[..conc], tokens);
            ttfts.sort();
            println!(
                "{{\"engine\": \"sluice\", \"weights\": \"{weights}\", \"batching\": {batching}, \"concurrency\": {conc}, \"threads\": {threads}, \"tokens_per_request\": {tokens}, \"generated\": {total}, \"wall_s\": {:.3}, \"tokens_per_s\": {:.1}, \"ttft_p50_ms\": {:.0}, \"ttft_max_ms\": {:.0}}}",
                wall.as_secs_f64(),
                total as f64 / wall.as_secs_f64(),
                ttfts[ttfts.len() / 2].as_secs_f64() * 1e3,
                ttfts[ttfts.len() - 1].as_secs_f64() * 1e3,
            );
        }
    }

    // Time to first token for a prompt of exactly 200 tokens.
    let engine = Engine::start(
        model.clone(),
        EngineConfig {
            threads,
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    let long = tok
        .encode(&format!("{TEXT} {TEXT}"), false)
        .expect("tokenize");
    let prompt: Vec<u32> = long.into_iter().take(200).collect();
    assert_eq!(prompt.len(), 200, "the text is long enough for 200 tokens");
    let mut samples = Vec::new();
    for _ in 0..5 {
        let (_, _, t) = run_batch(&engine, std::slice::from_ref(&prompt), 1);
        samples.push(t[0]);
    }
    samples.sort();
    println!(
        "{{\"engine\": \"sluice\", \"weights\": \"{weights}\", \"metric\": \"ttft_200_token_prompt\", \"threads\": {threads}, \"median_ms\": {:.1}, \"min_ms\": {:.1}}}",
        samples[2].as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3
    );
}
