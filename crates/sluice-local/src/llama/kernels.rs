//! The arithmetic of the hand-written forward pass ([`super::model`]): a batched f32 matrix
//! multiply, RMS normalization, interleaved rotary embeddings, SiLU gating, softmax and
//! grouped-query attention, all writing into buffers the caller owns, so that none of them
//! allocates.
//!
//! The workspace forbids `unsafe`, so the vector code goes through `pulp`: a [`pulp::WithSimd`]
//! operation is compiled once per instruction set (AVX-512, AVX2+FMA, SSE, scalar) and
//! [`pulp::Arch::dispatch`] picks the best one the CPU has at run time.
//!
//! [`matmul_f32`] computes `out[n, rows] = x[n, cols] · Wᵀ` for a row-major `W`. The weight rows are
//! split into chunks, one rayon task each (the engine installs its pool around model code); a
//! task walks its rows four at a time and dots each group of four with the activation rows four
//! at a time, sixteen vector accumulators in registers, so a weight row is read from memory once
//! per call and then from L1 for the other activation rows. Like [`super::q8`], each task writes
//! its results as `[n, chunk rows]` into a scratch buffer that is then copied into `out`.

use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// `out[j * rows + r] = Σ_k W[r * cols + k] · x[j * cols + k]` for the `n` rows of `x`.
/// `scratch` holds the per-chunk results when `n > 1`; it grows to `rows × n` and is reused.
pub(crate) fn matmul_f32(
    w: &[f32],
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let rows = w.len() / cols;
    debug_assert_eq!(w.len(), rows * cols);
    debug_assert_eq!(x.len(), n * cols);
    debug_assert_eq!(out.len(), n * rows);
    if n == 0 || rows == 0 {
        return;
    }
    let arch = Arch::new();
    // A few tasks per thread, so that rayon can even out their ends; a multiple of the tile.
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = rows
        .div_ceil(threads * 8)
        .next_multiple_of(TR)
        .clamp(16, 256);
    let task = |c: usize, dest: &mut [f32]| {
        let first = c * chunk_rows;
        let len = dest.len() / n;
        arch.dispatch(DotRows {
            w: &w[first * cols..(first + len) * cols],
            x,
            cols,
            dest,
        });
    };
    by_row_chunks(rows, n, chunk_rows, out, scratch, task);
}

/// Runs `task(c, dest)` in parallel for each chunk `c` of `chunk_rows` weight rows, where `dest`
/// is that chunk's results laid out `[n, chunk rows]`, and leaves the results in `out` as
/// `[n, rows]`. With one activation row the chunks are slices of `out` itself; otherwise they are
/// written to `scratch` (grown to `rows × n`, reused) and copied into place.
pub(crate) fn by_row_chunks(
    rows: usize,
    n: usize,
    chunk_rows: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    task: impl Fn(usize, &mut [f32]) + Sync,
) {
    if n == 1 {
        out.par_chunks_mut(chunk_rows)
            .enumerate()
            .for_each(|(c, dest)| task(c, dest));
        return;
    }
    let out_t = grown(scratch, rows * n);
    out_t
        .par_chunks_mut(chunk_rows * n)
        .enumerate()
        .for_each(|(c, dest)| task(c, dest));
    let out_t = &*out_t;
    out.par_chunks_mut(rows).enumerate().for_each(|(j, out_j)| {
        for (o, chunk) in out_j
            .chunks_mut(chunk_rows)
            .zip(out_t.chunks(chunk_rows * n))
        {
            let len = o.len();
            o.copy_from_slice(&chunk[j * len..(j + 1) * len]);
        }
    });
}

/// Weight rows dotted per tile.
pub(crate) const TR: usize = 4;
/// Activation rows dotted per tile.
const TJ: usize = 4;

/// Dots the weight rows `w` (`[len, cols]`) with every activation row of `x` into `dest`
/// (`[n, len]`).
struct DotRows<'a> {
    w: &'a [f32],
    x: &'a [f32],
    cols: usize,
    dest: &'a mut [f32],
}

impl WithSimd for DotRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DotRows { w, x, cols, dest } = self;
        let n = x.len() / cols;
        let len = w.len() / cols;
        for r in (0..len).step_by(TR) {
            let tr = (len - r).min(TR);
            tiles(
                simd,
                tr,
                |a| &w[(r + a) * cols..(r + a + 1) * cols],
                n,
                |j| &x[j * cols..(j + 1) * cols],
                |j, a, v| dest[j * len + r + a] = v,
            );
        }
    }
}

/// Dots `tr ≤ TR` weight rows (`w(a)` for `a < tr`) with `n` activation rows (`x(j)`), all of the
/// same length, in tiles of up to `TR × TJ`, and hands each result to `emit(j, a, value)`.
#[inline(always)]
pub(crate) fn tiles<'a, S: Simd>(
    simd: S,
    tr: usize,
    w: impl Fn(usize) -> &'a [f32],
    n: usize,
    x: impl Fn(usize) -> &'a [f32],
    mut emit: impl FnMut(usize, usize, f32),
) {
    let mut j = 0;
    while j < n {
        let tj = (n - j).min(TJ);
        if tr == TR && tj == TJ {
            let t = dot_tile::<S, TR, TJ>(
                simd,
                [w(0), w(1), w(2), w(3)],
                [x(j), x(j + 1), x(j + 2), x(j + 3)],
            );
            for (a, t) in t.iter().enumerate() {
                for (b, &v) in t.iter().enumerate() {
                    emit(j + b, a, v);
                }
            }
        } else if tr == TR {
            for b in 0..tj {
                let t = dot_tile::<S, TR, 1>(simd, [w(0), w(1), w(2), w(3)], [x(j + b)]);
                for (a, t) in t.iter().enumerate() {
                    emit(j + b, a, t[0]);
                }
            }
        } else {
            for a in 0..tr {
                for b in 0..tj {
                    emit(
                        j + b,
                        a,
                        dot_tile::<S, 1, 1>(simd, [w(a)], [x(j + b)])[0][0],
                    );
                }
            }
        }
        j += tj;
    }
}

/// The `R × J` dot products of `R` weight rows with `J` activation rows, accumulated in `R · J`
/// vector registers.
#[inline(always)]
fn dot_tile<S: Simd, const R: usize, const J: usize>(
    simd: S,
    w: [&[f32]; R],
    x: [&[f32]; J],
) -> [[f32; J]; R] {
    let cols = w[0].len();
    let ws = w.map(|row| S::as_simd_f32s(row).0);
    let xs = x.map(|row| S::as_simd_f32s(row).0);
    let blocks = ws[0].len();
    let ws = ws.map(|row| &row[..blocks]);
    let xs = xs.map(|row| &row[..blocks]);
    let mut acc = [[simd.splat_f32s(0.0); J]; R];
    for b in 0..blocks {
        let xv: [S::f32s; J] = std::array::from_fn(|j| xs[j][b]);
        for (acc, w) in acc.iter_mut().zip(&ws) {
            let wv = w[b];
            for (acc, &xv) in acc.iter_mut().zip(&xv) {
                *acc = simd.mul_add_f32s(wv, xv, *acc);
            }
        }
    }
    let tail = blocks * (std::mem::size_of::<S::f32s>() / 4);
    let mut res = [[0f32; J]; R];
    for (r, res) in res.iter_mut().enumerate() {
        for (j, res) in res.iter_mut().enumerate() {
            let rest: f32 = w[r][tail..cols]
                .iter()
                .zip(&x[j][tail..cols])
                .map(|(a, b)| a * b)
                .sum();
            *res = simd.reduce_sum_f32s(acc[r][j]) + rest;
        }
    }
    res
}

/// `Σ a[i] · b[i]`.
#[inline(always)]
fn dot<S: Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let (av, at) = S::as_simd_f32s(a);
    let (bv, bt) = S::as_simd_f32s(b);
    let mut acc = simd.splat_f32s(0.0);
    for (&a, &b) in av.iter().zip(bv) {
        acc = simd.mul_add_f32s(a, b, acc);
    }
    simd.reduce_sum_f32s(acc) + at.iter().zip(bt).map(|(a, b)| a * b).sum::<f32>()
}

/// `y += alpha · x`.
#[inline(always)]
fn axpy<S: Simd>(simd: S, alpha: f32, x: &[f32], y: &mut [f32]) {
    let (xv, xt) = S::as_simd_f32s(x);
    let (yv, yt) = S::as_mut_simd_f32s(y);
    let a = simd.splat_f32s(alpha);
    for (y, &x) in yv.iter_mut().zip(xv) {
        *y = simd.mul_add_f32s(a, x, *y);
    }
    for (y, &x) in yt.iter_mut().zip(xt) {
        *y += alpha * x;
    }
}

/// RMS normalization of each `weight.len()`-wide row of `x` into `out`, as candle's
/// `rms_norm`: `x / sqrt(mean(x²) + eps) · weight`.
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (x, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum2: f32 = x.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v / m * w;
        }
    }
}

/// Interleaved rotary embedding of one row of heads in place, as candle's `rope_i`: each pair
/// `(2i, 2i + 1)` of every head is rotated by the angle whose cosine and sine are `cos[i]`,
/// `sin[i]`.
pub(crate) fn rope_interleaved(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        let (pairs, _) = head.as_chunks_mut::<2>();
        for ((p, &c), &s) in pairs.iter_mut().zip(cos).zip(sin) {
            let (a, b) = (p[0], p[1]);
            p[0] = a * c - b * s;
            p[1] = a * s + b * c;
        }
    }
}

/// `out[i] = silu(gate[i]) · up[i]` for each row of `gate_up`, laid out `[gate | up]` with `ff`
/// values each; `out` is `[rows, ff]`.
pub(crate) fn silu_mul(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    for (gu, out) in gate_up.chunks_exact(2 * ff).zip(out.chunks_exact_mut(ff)) {
        let (gate, up) = gu.split_at(ff);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Softmax in place.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// The shape of attention: query heads, key/value heads and their width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) head_dim: usize,
}

/// Grouped-query attention of one query row at position `pos` against the keys and values of
/// positions `0..=pos` (causal), laid out `[position][kv_head][head_dim]`. Query head `h` uses
/// key/value head `h / (n_head / n_kv_head)`. `q` and `out` are `[n_head, head_dim]`; `scores`
/// must hold at least `pos + 1` values.
pub(crate) struct AttendRow<'a> {
    pub(crate) shape: AttnShape,
    pub(crate) q: &'a [f32],
    pub(crate) keys: &'a [f32],
    pub(crate) values: &'a [f32],
    pub(crate) pos: usize,
    pub(crate) scores: &'a mut [f32],
    pub(crate) out: &'a mut [f32],
}

impl WithSimd for AttendRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let AttendRow {
            shape,
            q,
            keys,
            values,
            pos,
            scores,
            out,
        } = self;
        let d = shape.head_dim;
        let kv_dim = shape.n_kv_head * d;
        let rep = shape.n_head / shape.n_kv_head;
        let scale = 1.0 / (d as f32).sqrt();
        let scores = &mut scores[..=pos];
        for (h, (q, out)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let off = (h / rep) * d;
            for (s, k) in scores.iter_mut().zip(keys.chunks_exact(kv_dim)) {
                *s = dot(simd, q, &k[off..off + d]) * scale;
            }
            softmax(scores);
            out.fill(0.0);
            for (&s, v) in scores.iter().zip(values.chunks_exact(kv_dim)) {
                axpy(simd, s, &v[off..off + d], out);
            }
        }
    }
}

/// Runs [`AttendRow`] with the best instruction set.
pub(crate) fn attend_row(op: AttendRow<'_>) {
    Arch::new().dispatch(op);
}

/// The first `len` elements of `v`, growing it (never shrinking it) as needed.
pub(crate) fn grown<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn matmul_matches_the_plain_product_for_every_tile_remainder() {
        let mut scratch = Vec::new();
        for &(rows, cols) in &[(1, 1), (3, 17), (5, 64), (37, 100), (130, 576), (300, 33)] {
            let w = random(rows * cols, 3 + rows as u64);
            for n in [1, 2, 3, 4, 5, 8, 17] {
                let x = random(n * cols, 11 + n as u64);
                let mut out = vec![f32::NAN; n * rows];
                matmul_f32(&w, cols, &x, n, &mut out, &mut scratch);
                for j in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|k| f64::from(w[r * cols + k]) * f64::from(x[j * cols + k]))
                            .sum();
                        let got = f64::from(out[j * rows + r]);
                        assert!(
                            (got - want).abs() < 1e-4 * (cols as f64).sqrt(),
                            "rows {rows} cols {cols} n {n}: out[{j}][{r}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rope_rotates_interleaved_pairs() {
        let mut x = vec![1.0, 0.0, 0.0, 2.0];
        let (c, s) = (0.5f32.cos(), 0.5f32.sin());
        rope_interleaved(&mut x, 4, &[c, 1.0], &[s, 0.0]);
        assert!((x[0] - c).abs() < 1e-6 && (x[1] - s).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 2.0]);
    }

    #[test]
    fn attention_is_causal_and_grouped() {
        // 2 query heads sharing 1 KV head of width 2; three positions.
        let shape = AttnShape {
            n_head: 2,
            n_kv_head: 1,
            head_dim: 2,
        };
        let keys = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let values = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let q = [0.0, 0.0, 5.0, 0.0];
        let mut scores = [0.0; 3];
        let mut out = [0.0; 4];
        attend_row(AttendRow {
            shape,
            q: &q,
            keys: &keys,
            values: &values,
            pos: 1,
            scores: &mut scores,
            out: &mut out,
        });
        // Head 0: equal scores over positions 0 and 1 (position 2 is in the future).
        assert!((out[0] - 2.0).abs() < 1e-6 && (out[1] - 3.0).abs() < 1e-6);
        // Head 1: favours position 0 by e^(5/√2).
        let p0 = 1.0 / (1.0 + (-5.0f32 / 2f32.sqrt()).exp());
        assert!((out[2] - (p0 * 1.0 + (1.0 - p0) * 3.0)).abs() < 1e-5);
    }

    #[test]
    fn norms_and_activations() {
        let mut out = [0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let m = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / m).abs() < 1e-6 && (out[1] - 8.0 / m).abs() < 1e-6);
        let mut out = [0.0; 2];
        silu_mul(&[0.0, 1.0, 5.0, 2.0], 2, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        let mut x = [1.0, 1.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);
    }
}
