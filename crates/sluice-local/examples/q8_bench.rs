//! The batched matmuls of this crate — Q8 (`src/llama/q8.rs`) and f32
//! (`src/llama/kernels.rs`) — against candle's quantized (`QMatMul` over a
//! Q8_0 `QTensor`) and f32 (gemm) matmuls, on the weight shapes of
//! SmolLM2-135M with random weights.
//!
//! ```sh
//! cargo run --release -p sluice-local --example q8_bench -- [--threads 2] [--runs 25]
//! ```
//!
//! Everything runs inside a rayon pool of `--threads` threads. candle's
//! quantized matmul uses its own thread pool instead, sized by
//! `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical cores):
//! set it to the same number for a fair comparison.
//!
//! For each shape and batch size `n` (1, 4, 16, 64) it prints the median time
//! per call over `--runs` calls after a warm-up, the effective GFLOP/s
//! (`2·rows·cols·n` per call), how many times slower candle is, and the
//! largest difference between the quantized outputs and the f32 output
//! relative to the largest output value.

#[expect(dead_code, reason = "only the matmul of the kernels is benchmarked")]
#[path = "../src/llama/kernels.rs"]
mod kernels;
#[path = "../src/llama/q8.rs"]
mod q8;

use std::error::Error;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use q8::{Q8Matrix, Q8Scratch};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 key/value
/// heads of 64, vocabulary 49152.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv (fused)", 576 + 2 * 192, 576),
    ("gate+up (fused)", 2 * 1536, 576),
    ("down", 576, 1536),
    ("vocab output", 49152, 576),
];

const BATCHES: [usize; 4] = [1, 4, 16, 64];

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Values in [-1, 1) from a xorshift generator.
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Median milliseconds per call of `f` over `runs` calls, after 3 warm-up calls.
fn median_ms(runs: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, "--threads", 2).max(1);
    let runs = arg(&args, "--runs", 25).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    println!(
        "rayon pool: {threads} threads; candle's quantized matmul pool: CANDLE_NUM_THREADS={}, RAYON_NUM_THREADS={}; {runs} runs per cell (median)",
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
    );
    println!();
    println!(
        "| {:<16} | {:>2} | {:>8} | {:>8} | {:>8} | {:>8} | {:>7} | {:>7} | {:>7} | {:>10} | {:>8} | {:>8} | {:>8} |",
        "matrix",
        "n",
        "f32 ms",
        "cf32 ms",
        "q8 ms",
        "cQ8 ms",
        "f32 GF/s",
        "cf32 GF",
        "q8 GF",
        "cf32/f32",
        "cQ8/q8",
        "q8 err",
        "cQ8 err"
    );
    println!("|{}|", ["---"; 13].join("|"));
    pool.install(|| -> Res<()> {
        let dev = Device::Cpu;
        for (s, &(name, rows, cols)) in SHAPES.iter().enumerate() {
            let w = random(rows * cols, 0x5eed + s as u64);
            let ours = Q8Matrix::from_f32(&w, rows, cols)?;
            let dense = Tensor::from_vec(w.clone(), (rows, cols), &dev)?;
            let mut f32_scratch = Vec::new();
            let candle_q8 = QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?;
            let mut scratch = Q8Scratch::default();
            for n in BATCHES {
                let x = random(n * cols, 0xabc + n as u64);
                let xt = Tensor::from_vec(x.clone(), (n, cols), &dev)?;
                let mut out = vec![0f32; n * ours.rows()];
                let mut out_f32 = vec![0f32; n * rows];
                let ours_f32_ms = median_ms(runs, || {
                    kernels::matmul_f32(&w, cols, &x, n, &mut out_f32, &mut f32_scratch);
                    Ok(())
                })?;
                let q8_ms = median_ms(runs, || Ok(ours.matmul(&x, n, &mut out, &mut scratch)?))?;
                let cq8_ms = median_ms(runs, || {
                    candle_q8.forward(&xt)?;
                    Ok(())
                })?;
                let f32_ms = median_ms(runs, || {
                    xt.matmul(&dense.t()?)?;
                    Ok(())
                })?;
                // Ours against candle's f32 result.
                let exact = xt.matmul(&dense.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                let top = exact.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
                let err = |got: &[f32]| {
                    got.iter()
                        .zip(&exact)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                        / top
                };
                let label = match n {
                    1 => name.to_string(),
                    4 => format!("  {:.1} MB as Q8", ours.bytes() as f64 / 1e6),
                    _ => String::new(),
                };
                let gflop = 2.0 * (rows * ours.cols() * n) as f64 / 1e9;
                println!(
                    "| {:<16} | {:>2} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>7.1} | {:>7.1} | {:>7.1} | {:>9.2}x | {:>7.2}x | {:>8.1e} | {:>8.1e} |",
                    label,
                    n,
                    ours_f32_ms,
                    f32_ms,
                    q8_ms,
                    cq8_ms,
                    gflop / ours_f32_ms * 1e3,
                    gflop / f32_ms * 1e3,
                    gflop / q8_ms * 1e3,
                    f32_ms / ours_f32_ms,
                    cq8_ms / q8_ms,
                    err(&out_f32),
                    err(&out),
                );
            }
        }
        Ok(())
    })?;
    println!();
    println!(
        "f32 = this crate's kernels::matmul_f32; cf32 = candle f32 x.matmul(w.t()); q8 = this crate's Q8Matrix::matmul; cQ8 = candle QMatMul over Q8_0."
    );
    println!(
        "cf32/f32 and cQ8/q8 > 1 mean ours is faster. err: max |ours - candle f32| / max |candle f32|."
    );
    Ok(())
}
