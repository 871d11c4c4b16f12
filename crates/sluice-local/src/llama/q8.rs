//! A batched 8-bit matrix multiply for the decode step: [`Q8Matrix`] holds a
//! weight matrix quantized like GGML's Q8_0 (blocks of 32 along a row, one
//! `f32` scale per block), and [`Q8Matrix::matmul`] multiplies it with all `n`
//! activation rows of a batch in one call, so the weights are streamed from
//! memory once per call whatever `n` is.
//!
//! How a call runs:
//! * below [`DEQUANTIZE_FROM`] activation rows (decode steps), the activation
//!   rows are quantized per block of 32, as GGML's Q8_0 vec-dot does, into a
//!   [`Q8Scratch`] that is reused from call to call; from there on (prompt
//!   chunks), the weights are widened to `f32` a tile at a time instead and
//!   multiplied by the f32 tile kernel;
//! * the weight rows are split into chunks, one rayon task each (the engine
//!   installs its pool around model code, so the tasks use its threads); a task
//!   widens one weight row at a time to `i16` in a small stack buffer, where it
//!   stays in L1 while it is dotted with all `n` activation rows;
//! * each task writes its results as `[n, chunk rows]`, and those pieces are
//!   copied into the `[n, rows]` output.
//!
//! The workspace forbids `unsafe`, so there are no intrinsics: the block dot
//! is plain Rust that LLVM turns into `vpmaddwd`, compiled through a
//! [`pulp::WithSimd`] operation once per instruction set (AVX-512BW, AVX2,
//! SSE2) so that the widest one the CPU has is picked at run time. Widening
//! the weights once per row and keeping one activation row per inner loop is
//! deliberate: loops that dot a weight block with several activation rows at
//! once were vectorized badly (4–10x slower) when this was written. Each
//! block's products stay in 16 `i32` lanes that are scaled and accumulated in
//! 16 `f32` lanes; the lanes are summed once per row segment.

#![allow(
    dead_code,
    reason = "examples/q8_bench.rs includes this file too and uses only part of it"
)]

use pulp::{Arch, Simd, WithSimd};

use super::kernels::{TR, by_row_chunks, grown, tiles};

/// Values per quantization block, as in GGML's Q8_0.
const QK: usize = 32;

/// Columns of a weight row widened to `i16` at a time (2 KiB on the stack).
const SEG: usize = 1024;

/// A `[rows, cols]` weight matrix quantized to 8 bits in blocks of 32 along a
/// row, with GGML Q8_0 semantics (but an `f32` scale where GGML stores `f16`).
#[derive(Debug, Clone)]
pub(crate) struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// `rows * cols` quantized values, row-major.
    qs: Vec<i8>,
    /// `rows * cols / 32` block scales, row-major.
    scales: Vec<f32>,
}

/// Reusable buffers for [`Q8Matrix::matmul`]: once they have grown to the
/// largest `n × cols` and `rows × n` seen, calls do not allocate.
#[derive(Debug, Default)]
pub(crate) struct Q8Scratch {
    /// The quantized activations, `[n, cols]`, widened to `i16`.
    xq: Vec<i16>,
    /// Their block scales, `[n, cols / 32]`.
    xd: Vec<f32>,
    /// Results by chunk of weight rows, each chunk laid out `[n, chunk rows]`.
    out_t: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix; `cols` must be a positive
    /// multiple of 32.
    pub(crate) fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Q8Matrix, String> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(format!(
                "cannot quantize a matrix with {cols} columns to Q8_0: the column count must be a positive multiple of {QK}"
            ));
        }
        let len = rows.checked_mul(cols).filter(|&len| len == w.len());
        if len.is_none() {
            return Err(format!(
                "a {rows}x{cols} matrix needs {rows}x{cols} values, got {}",
                w.len()
            ));
        }
        let mut qs = vec![0i8; w.len()];
        let mut scales = vec![0f32; w.len() / QK];
        let (src, _) = w.as_chunks::<QK>();
        let (dst, _) = qs.as_chunks_mut::<QK>();
        for ((src, dst), d) in src.iter().zip(dst).zip(&mut scales) {
            *d = quantize_block(src, dst);
        }
        Ok(Q8Matrix {
            rows,
            cols,
            qs,
            scales,
        })
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`, dequantized, into `out` (`cols` values).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (qs, _) = self.qs[r * self.cols..(r + 1) * self.cols].as_chunks::<QK>();
        let blocks = self.cols / QK;
        let scales = &self.scales[r * blocks..(r + 1) * blocks];
        let (dst, _) = out.as_chunks_mut::<QK>();
        for ((dst, qs), &d) in dst.iter_mut().zip(qs).zip(scales) {
            for (o, &q) in dst.iter_mut().zip(qs) {
                *o = f32::from(q) * d;
            }
        }
    }

    /// Memory held by the quantized values and scales.
    pub(crate) fn bytes(&self) -> usize {
        self.qs.len() + std::mem::size_of_val(self.scales.as_slice())
    }

    /// `out[j][r] = Σ_k W[r][k]·x[j][k]` for the `n` rows of `x` (`[n, cols]`,
    /// row-major) into `out` (`[n, rows]`, row-major). Below
    /// [`DEQUANTIZE_FROM`] rows, each activation row is quantized per block of
    /// 32 and each block pair contributes `d_w·d_x·Σ q_w·q_x`, as GGML's
    /// Q8_0 × Q8_0 dot product does; from there on the weights are widened to
    /// `f32` and the activations are used as they are.
    pub(crate) fn matmul(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        scratch: &mut Q8Scratch,
    ) -> Result<(), String> {
        let (rows, cols) = (self.rows, self.cols);
        if n.checked_mul(cols) != Some(x.len()) {
            return Err(format!(
                "the input of a Q8 matmul with {cols} columns must hold {n}x{cols} values for {n} rows, got {}",
                x.len()
            ));
        }
        if n.checked_mul(rows) != Some(out.len()) {
            return Err(format!(
                "the output of a Q8 matmul with {rows} rows must hold {n}x{rows} values for {n} input rows, got {}",
                out.len()
            ));
        }
        if n == 0 || rows == 0 {
            return Ok(());
        }
        // A few tasks per thread, so that rayon can even out their ends.
        let threads = rayon::current_num_threads().max(1);
        let chunk_rows = rows.div_ceil(threads * 8).clamp(8, 64);
        if n >= DEQUANTIZE_FROM {
            let arch = Arch::new();
            by_row_chunks(rows, n, chunk_rows, out, &mut scratch.out_t, |c, dest| {
                let (qs, scales) = self.rows_from(c * chunk_rows, dest.len() / n);
                arch.dispatch(DequantizedRows {
                    qs,
                    scales,
                    cols,
                    x,
                    dest,
                });
            });
            return Ok(());
        }
        let blocks = cols / QK;
        let xq = grown(&mut scratch.xq, n * cols);
        let xd = grown(&mut scratch.xd, n * blocks);
        quantize_activations(x, xq, xd);
        let (xq, xd) = (&*xq, &*xd);
        by_row_chunks(rows, n, chunk_rows, out, &mut scratch.out_t, |c, dest| {
            self.dot_rows(c * chunk_rows, dest, xq, xd)
        });
        Ok(())
    }

    /// The quantized values and block scales of weight rows `first..first + len`.
    fn rows_from(&self, first: usize, len: usize) -> (&[i8], &[f32]) {
        let (cols, blocks) = (self.cols, self.cols / QK);
        (
            &self.qs[first * cols..(first + len) * cols],
            &self.scales[first * blocks..(first + len) * blocks],
        )
    }

    /// Dots weight rows `first..first + dest.len() / n` with the `n` quantized
    /// activation rows; `dest` is laid out `[n, those rows]`.
    fn dot_rows(&self, first: usize, dest: &mut [f32], xq: &[i16], xd: &[f32]) {
        let len = dest.len() / (xd.len() / (self.cols / QK));
        let (qs, scales) = self.rows_from(first, len);
        Arch::new().dispatch(DotRows {
            qs,
            scales,
            cols: self.cols,
            xq,
            xd,
            dest,
        });
    }
}

/// Weight rows (`qs`, `scales`: `[len, cols]` and `[len, cols / 32]`) dotted
/// with every quantized activation row into `dest` (`[n, len]`). It is a
/// [`WithSimd`] operation only so that the plain loops below are compiled for
/// the best instruction set the CPU has (AVX-512BW, AVX2, …): LLVM turns
/// [`segment_dot`] into `vpmaddwd` on registers as wide as those allow.
struct DotRows<'a> {
    qs: &'a [i8],
    scales: &'a [f32],
    cols: usize,
    xq: &'a [i16],
    xd: &'a [f32],
    dest: &'a mut [f32],
}

impl WithSimd for DotRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        let DotRows {
            qs,
            scales,
            cols,
            xq,
            xd,
            dest,
        } = self;
        let blocks = cols / QK;
        let n = xd.len() / blocks;
        let len = dest.len() / n;
        dest.fill(0.0);
        let mut w16 = [0i16; SEG];
        let weights = qs.chunks_exact(cols).zip(scales.chunks_exact(blocks));
        for (i, (wq, wd)) in weights.take(len).enumerate() {
            for s0 in (0..cols).step_by(SEG) {
                let s1 = cols.min(s0 + SEG);
                let (b0, b1) = (s0 / QK, s1 / QK);
                let w = &mut w16[..s1 - s0];
                for (w, &q) in w.iter_mut().zip(&wq[s0..s1]) {
                    *w = i16::from(q);
                }
                let w = &*w;
                let xs = xq.chunks_exact(cols).zip(xd.chunks_exact(blocks));
                for (dest_j, (xq, xd)) in dest.chunks_exact_mut(len).zip(xs) {
                    dest_j[i] += segment_dot(w, &wd[b0..b1], &xq[s0..s1], &xd[b0..b1]);
                }
            }
        }
    }
}

/// From this many activation rows on, [`Q8Matrix::matmul`] widens the weights
/// back to `f32` (a few rows at a time, in a buffer that stays in L1) and
/// multiplies them with the unquantized activations through the tiled f32
/// kernel of [`super::kernels`]: widening costs one conversion per weight,
/// shared by all the rows, and the f32 tile reuses each loaded weight vector
/// for four activation rows, which the integer loop cannot. Prompt
/// processing (hundreds of rows) is the main beneficiary.
pub(crate) const DEQUANTIZE_FROM: usize = 8;

/// Weight rows (`qs`, `scales`) widened to `f32` `TR` rows × `SEG` columns at a
/// time and multiplied with the `f32` activation rows `x` (`[n, cols]`) into
/// `dest` (`[n, len]`).
struct DequantizedRows<'a> {
    qs: &'a [i8],
    scales: &'a [f32],
    cols: usize,
    x: &'a [f32],
    dest: &'a mut [f32],
}

impl WithSimd for DequantizedRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let DequantizedRows {
            qs,
            scales,
            cols,
            x,
            dest,
        } = self;
        let n = x.len() / cols;
        let len = dest.len() / n;
        dest.fill(0.0);
        let mut wbuf = [0f32; TR * SEG];
        for r in (0..len).step_by(TR) {
            let tr = (len - r).min(TR);
            for s0 in (0..cols).step_by(SEG) {
                let s1 = cols.min(s0 + SEG);
                let seg = s1 - s0;
                for (a, buf) in wbuf.chunks_exact_mut(SEG).take(tr).enumerate() {
                    let row = r + a;
                    let q = &qs[row * cols + s0..row * cols + s1];
                    let d = &scales[(row * cols + s0) / QK..(row * cols + s1) / QK];
                    let (q, _) = q.as_chunks::<QK>();
                    let (buf, _) = buf[..seg].as_chunks_mut::<QK>();
                    for ((buf, q), &d) in buf.iter_mut().zip(q).zip(d) {
                        for (o, &q) in buf.iter_mut().zip(q) {
                            *o = f32::from(q) * d;
                        }
                    }
                }
                let wbuf = &wbuf;
                tiles(
                    simd,
                    tr,
                    |a| &wbuf[a * SEG..a * SEG + seg],
                    n,
                    |j| &x[j * cols + s0..j * cols + s1],
                    |j, a, v| dest[j * len + r + a] += v,
                );
            }
        }
    }
}

/// Lanes of the per-block partial sums: pairs of products are added into one
/// `i32` lane each (what `pmaddwd` computes), so a block of 32 gives 16 lanes.
const LANES: usize = QK / 2;

/// `Σ_blocks d_w·d_x·Σ_i q_w·q_x` over matching blocks of a weight row
/// segment and an activation row segment. Each block's 16 lane sums are
/// scaled and accumulated lane by lane in `f32`, and the lanes are added only
/// once at the end, so the loop stays in vector registers (no horizontal sum
/// per block).
#[inline(always)]
fn segment_dot(w: &[i16], wd: &[f32], x: &[i16], xd: &[f32]) -> f32 {
    let (w, _) = w.as_chunks::<QK>();
    let (x, _) = x.as_chunks::<QK>();
    let mut acc = [0f32; LANES];
    for (((w, &dw), x), &dx) in w.iter().zip(wd).zip(x).zip(xd) {
        let p = block_products(w, x);
        let d = dw * dx;
        for (a, &p) in acc.iter_mut().zip(&p) {
            *a += p as f32 * d;
        }
    }
    acc.iter().sum()
}

/// The products of two blocks, adjacent pairs summed into 16 lanes. Values
/// are within ±127, so a pair sum fits an `i32` easily.
#[inline(always)]
fn block_products(w: &[i16; QK], x: &[i16; QK]) -> [i32; LANES] {
    let mut p = [0i32; LANES];
    for (l, p) in p.iter_mut().enumerate() {
        *p = i32::from(w[2 * l]) * i32::from(x[2 * l])
            + i32::from(w[2 * l + 1]) * i32::from(x[2 * l + 1]);
    }
    p
}

/// Quantizes one block like GGML's `quantize_row_q8_0`: `d = amax / 127`,
/// `q = round(x / d)` (computed as `x · (1 / d)`), all zeros when `amax` is 0.
/// Returns `d`.
fn quantize_block(src: &[f32; QK], dst: &mut [i8; QK]) -> f32 {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in dst.iter_mut().zip(src) {
        // Within ±127 by construction; `as` saturates anyway (and maps NaN to 0).
        *q = (v * id).round() as i8;
    }
    d
}

/// Quantizes activation rows block by block into `xq` (widened to `i16`) and
/// their scales into `xd`.
fn quantize_activations(x: &[f32], xq: &mut [i16], xd: &mut [f32]) {
    let (src, _) = x.as_chunks::<QK>();
    let (dst, _) = xq.as_chunks_mut::<QK>();
    let mut q8 = [0i8; QK];
    for ((src, dst), d) in src.iter().zip(dst).zip(xd) {
        *d = quantize_block(src, &mut q8);
        for (w, &q) in dst.iter_mut().zip(&q8) {
            *w = i16::from(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator of values in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn vec(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.next()).collect()
        }
    }

    /// The same arithmetic done plainly, in f64, with the magnitude of the
    /// terms for a tolerance: the activations quantized per block like the
    /// weights below [`DEQUANTIZE_FROM`] rows, kept in `f32` from there on.
    fn reference(m: &Q8Matrix, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
        let (rows, cols) = (m.rows, m.cols);
        let blocks = cols / QK;
        let mut xv = x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        if n < DEQUANTIZE_FROM {
            for b in 0..n * blocks {
                let src: &[f32; QK] = x[b * QK..(b + 1) * QK].try_into().unwrap();
                let mut q = [0i8; QK];
                let d = quantize_block(src, &mut q);
                for (v, &q) in xv[b * QK..(b + 1) * QK].iter_mut().zip(&q) {
                    *v = f64::from(q) * f64::from(d);
                }
            }
        }
        let mut out = vec![0f64; n * rows];
        let mut mag = vec![0f64; n * rows];
        for j in 0..n {
            for r in 0..rows {
                for k in 0..cols {
                    let w =
                        f64::from(m.qs[r * cols + k]) * f64::from(m.scales[(r * cols + k) / QK]);
                    let term = w * xv[j * cols + k];
                    out[j * rows + r] += term;
                    mag[j * rows + r] += term.abs();
                }
            }
        }
        (out, mag)
    }

    fn check_against_reference(rows: usize, cols: usize, n: usize, scratch: &mut Q8Scratch) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (rows * 131 + cols * 7 + n) as u64);
        let m = Q8Matrix::from_f32(&rng.vec(rows * cols), rows, cols).unwrap();
        let x = rng.vec(n * cols);
        let mut out = vec![f32::NAN; n * rows];
        m.matmul(&x, n, &mut out, scratch).unwrap();
        let (want, mag) = reference(&m, &x, n);
        for (i, ((&got, &want), &mag)) in out.iter().zip(&want).zip(&mag).enumerate() {
            let err = (f64::from(got) - want).abs();
            assert!(
                err <= 1e-5 * mag + 1e-6,
                "rows {rows} cols {cols} n {n}: out[{}][{}] = {got}, reference {want} (terms {mag})",
                i / rows,
                i % rows
            );
        }
    }

    #[test]
    fn q8_matmul_matches_the_scalar_reference() {
        let mut scratch = Q8Scratch::default();
        for &(rows, cols) in &[
            (1, 32),
            (7, 64),
            (37, 96),
            (67, 1088),
            (130, 160),
            (9, 2080),
        ] {
            for n in [1, 2, 3, 4, 5, 7, 8, 9, 17, 33] {
                check_against_reference(rows, cols, n, &mut scratch);
            }
        }
    }

    #[test]
    fn q8_matmul_with_a_fresh_scratch_each_time() {
        for n in [1, 3, 17] {
            check_against_reference(45, 2080, n, &mut Q8Scratch::default());
        }
    }

    #[test]
    fn q8_matmul_is_close_to_the_f32_matmul() {
        let (rows, cols) = (53, 576);
        let mut rng = Rng(42);
        let w = rng.vec(rows * cols);
        let m = Q8Matrix::from_f32(&w, rows, cols).unwrap();
        for n in [1, 4, 9] {
            let x = rng.vec(n * cols);
            let mut out = vec![0f32; n * rows];
            m.matmul(&x, n, &mut out, &mut Q8Scratch::default())
                .unwrap();
            let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
            for j in 0..n {
                let xj = &x[j * cols..(j + 1) * cols];
                for r in 0..rows {
                    let wr = &w[r * cols..(r + 1) * cols];
                    let exact: f64 = wr
                        .iter()
                        .zip(xj)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let err = (f64::from(out[j * rows + r]) - exact).abs();
                    let scale = norm(wr) * norm(xj);
                    assert!(
                        err < 1e-2 * scale,
                        "out[{j}][{r}]: {} vs {exact} (norms {scale})",
                        out[j * rows + r]
                    );
                }
            }
        }
    }

    #[test]
    fn q8_quantization_follows_ggml() {
        let mut w = vec![0f32; 64];
        w[0] = 1.27;
        w[1] = -0.637;
        w[2] = 0.004; // 0.4 of a step: rounds down
        w[3] = 0.006; // 0.6 of a step: rounds up
        let m = Q8Matrix::from_f32(&w, 1, 64).unwrap();
        assert!((m.scales[0] - 0.01).abs() < 1e-7);
        assert_eq!(&m.qs[..4], &[127, -64, 0, 1]);
        // The second block is all zeros: scale 0, values 0.
        assert_eq!(m.scales[1], 0.0);
        assert!(m.qs[32..].iter().all(|&q| q == 0));
        assert_eq!((m.rows(), m.cols(), m.bytes()), (1, 64, 64 + 2 * 4));
        let mut row = [f32::NAN; 64];
        m.dequantize_row(0, &mut row);
        for (got, want) in row.iter().zip([1.27, -0.64, 0.0, 0.01]) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
        assert!(row[32..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn q8_rejects_bad_shapes() {
        assert!(
            Q8Matrix::from_f32(&[0.0; 48], 1, 48)
                .unwrap_err()
                .contains("multiple of 32")
        );
        assert!(
            Q8Matrix::from_f32(&[], 3, 0)
                .unwrap_err()
                .contains("multiple of 32")
        );
        assert!(
            Q8Matrix::from_f32(&[0.0; 64], 3, 32)
                .unwrap_err()
                .contains("got 64")
        );
        let m = Q8Matrix::from_f32(&[0.5; 96], 3, 32).unwrap();
        let mut scratch = Q8Scratch::default();
        let err = m
            .matmul(&[0.0; 63], 2, &mut [0.0; 6], &mut scratch)
            .unwrap_err();
        assert!(err.contains("got 63"), "{err}");
        let err = m
            .matmul(&[0.0; 64], 2, &mut [0.0; 5], &mut scratch)
            .unwrap_err();
        assert!(err.contains("got 5"), "{err}");
        // No rows in, none out.
        m.matmul(&[], 0, &mut [], &mut scratch).unwrap();
    }

    #[test]
    fn q8_scratch_stops_growing() {
        let (rows, cols) = (96, 256);
        let mut rng = Rng(7);
        let m = Q8Matrix::from_f32(&rng.vec(rows * cols), rows, cols).unwrap();
        let mut scratch = Q8Scratch::default();
        let caps = |s: &Q8Scratch| (s.xq.capacity(), s.xd.capacity(), s.out_t.capacity());
        // The largest batch of each path: quantized activations below
        // DEQUANTIZE_FROM rows, f32 from there on (both use `out_t`).
        let (q_max, f_max) = (DEQUANTIZE_FROM - 1, 2 * DEQUANTIZE_FROM);
        let x = rng.vec(f_max * cols);
        for n in [q_max, f_max] {
            let mut out = vec![0f32; n * rows];
            m.matmul(&x[..n * cols], n, &mut out, &mut scratch).unwrap();
        }
        let grown = caps(&scratch);
        assert!(grown.0 >= q_max * cols && grown.1 >= q_max * cols / QK && grown.2 >= f_max * rows);
        for n in [f_max, q_max, 5, 1, DEQUANTIZE_FROM, f_max] {
            let mut out = vec![0f32; n * rows];
            m.matmul(&x[..n * cols], n, &mut out, &mut scratch).unwrap();
            assert_eq!(caps(&scratch), grown, "n = {n}");
        }
    }
}
