//! Choosing the next token from a logits vector: greedy, or temperature /
//! top-k / top-p (nucleus) sampling driven by a small seeded PRNG, so a run is
//! reproducible for a given seed.

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature. `0` (or anything not above zero, or NaN) means
    /// greedy decoding: always the most likely token, ties going to the lowest
    /// id.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probability mass reaches `top_p`. `1.0` (or more) keeps everything.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns the filter off.
    pub top_k: usize,
    /// Seed of the random generator; the same seed, parameters and logits give
    /// the same tokens.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    fn is_greedy(&self) -> bool {
        // NaN counts as greedy too.
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

impl Default for SamplingParams {
    /// Temperature 1, no top-k, no top-p, seed 0.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// A token sampler for one sequence. It owns its random state, so each
/// sequence of a batch should have its own.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Scratch buffer of `(token id, probability)` candidates, reused between
    /// calls so sampling does not allocate per token.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// Creates a sampler; its generator is seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: Xoshiro256::seed_from_u64(params.seed),
            scratch: Vec::new(),
        }
    }

    /// The parameters this sampler was created with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token id from `logits` (one value per vocabulary
    /// entry). NaN logits are treated as impossible. An empty slice gives 0.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        if !self.filter(logits) {
            return argmax(logits);
        }
        let total: f64 = self.scratch.iter().map(|&(_, p)| f64::from(p)).sum();
        let mut target = self.rng.next_f64() * total;
        for &(id, p) in &self.scratch {
            target -= f64::from(p);
            if target < 0.0 {
                return id;
            }
        }
        // Rounding left a sliver of mass: the least likely kept token.
        self.scratch.last().map_or(0, |&(id, _)| id)
    }

    /// Fills `self.scratch` with the candidates that survive temperature,
    /// top-k and top-p, as `(id, unnormalized probability)` sorted from most
    /// to least likely (ties by lower id) whenever a filter needed the order.
    /// Returns false when no token has a non-zero probability.
    fn filter(&mut self, logits: &[f32]) -> bool {
        let inv_t = 1.0 / self.params.temperature;
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return false;
        }
        self.scratch.clear();
        let mut total = 0f64;
        for (id, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            let p = ((l - max) * inv_t).exp();
            if p > 0.0 {
                total += f64::from(p);
                self.scratch.push((id as u32, p));
            }
        }
        if self.scratch.is_empty() {
            return false;
        }
        // Normalize so top-p compares against true probabilities.
        let norm = (1.0 / total) as f32;
        for c in &mut self.scratch {
            c.1 *= norm;
        }

        let k = self.params.top_k;
        if k > 0 && k < self.scratch.len() {
            self.scratch.select_nth_unstable_by(k - 1, by_prob_desc);
            self.scratch.truncate(k);
            self.scratch.sort_unstable_by(by_prob_desc);
            // Renormalize over the survivors for top-p.
            let kept: f32 = self.scratch.iter().map(|c| c.1).sum();
            for c in &mut self.scratch {
                c.1 /= kept;
            }
        }

        let top_p = self.params.top_p;
        if top_p < 1.0 && top_p.is_finite() {
            let keep = nucleus_len(&mut self.scratch, top_p.max(0.0));
            self.scratch.truncate(keep);
        }
        true
    }
}

/// Orders candidates from most to least likely, ties by lower id.
fn by_prob_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Sorts (as far as needed) the most likely candidates to the front and
/// returns how many of them form the nucleus: the smallest prefix whose mass
/// reaches `top_p` (at least one token). Only a growing prefix is
/// partially selected and sorted, not the whole vocabulary, unless the
/// distribution is very flat.
fn nucleus_len(cands: &mut [(u32, f32)], top_p: f32) -> usize {
    let n = cands.len();
    let mut sorted = 0usize;
    let mut prefix = 64usize.min(n);
    loop {
        if prefix < n {
            cands[sorted..].select_nth_unstable_by(prefix - sorted - 1, by_prob_desc);
        }
        cands[sorted..prefix].sort_unstable_by(by_prob_desc);
        sorted = prefix;
        let mut cum = 0f32;
        for (i, c) in cands[..sorted].iter().enumerate() {
            cum += c.1;
            if cum >= top_p {
                return i + 1;
            }
        }
        if sorted == n {
            return n;
        }
        prefix = (prefix * 4).min(n);
    }
}

/// Index of the largest logit; ties go to the lowest id, NaN is ignored.
/// Returns 0 for an empty slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// xoshiro256** seeded through splitmix64: small, fast and fully determined
/// by its seed.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seed_from_u64(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    /// Logits whose softmax (temperature 1) is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn kept_ids(s: &mut Sampler, logits: &[f32]) -> Vec<u32> {
        assert!(s.filter(logits));
        let mut ids: Vec<u32> = s.scratch.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn greedy_takes_the_argmax_and_ties_go_to_the_lowest_id() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.0]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, 0.5]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(s.sample(&[]), 0);
        // Negative and NaN temperatures are greedy too.
        let mut s = Sampler::new(params(f32::NAN, 1.0, 0, 1));
        assert_eq!(s.sample(&[0.0, 0.0, 9.0]), 2);
    }

    #[test]
    fn top_k_keeps_exactly_the_k_most_likely() {
        let logits = [0.5, 3.0, 1.0, 2.5, -4.0, 2.5];
        let mut s = Sampler::new(params(1.0, 1.0, 3, 7));
        // 3.0, 2.5, 2.5 — the tie at 2.5 keeps both since k = 3.
        assert_eq!(kept_ids(&mut s, &logits), vec![1, 3, 5]);
        let mut s = Sampler::new(params(1.0, 1.0, 2, 7));
        // Tie broken towards the lower id.
        assert_eq!(kept_ids(&mut s, &logits), vec![1, 3]);
        let mut s = Sampler::new(params(1.0, 1.0, 1, 7));
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 1);
        }
        // k larger than the vocabulary keeps everything.
        let mut s = Sampler::new(params(1.0, 1.0, 100, 7));
        assert_eq!(kept_ids(&mut s, &logits).len(), 6);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let case = |top_p: f32| {
            let mut s = Sampler::new(params(1.0, top_p, 0, 3));
            kept_ids(&mut s, &logits)
        };
        assert_eq!(case(0.4), vec![1]);
        assert_eq!(case(0.45), vec![1]);
        assert_eq!(case(0.7), vec![1, 3]);
        assert_eq!(case(0.9), vec![1, 2, 3]);
        assert_eq!(case(0.99), vec![0, 1, 2, 3]);
        assert_eq!(case(1.0), vec![0, 1, 2, 3]);
        // top_p 0 still keeps the single most likely token.
        assert_eq!(case(0.0), vec![1]);
    }

    #[test]
    fn top_p_applies_after_top_k_renormalization() {
        // top-k 2 keeps {0.5, 0.3} → renormalized {0.625, 0.375}; top-p 0.6
        // then keeps only the first.
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let mut s = Sampler::new(params(1.0, 0.6, 2, 3));
        assert_eq!(kept_ids(&mut s, &logits), vec![1]);
        let mut s = Sampler::new(params(1.0, 0.7, 2, 3));
        assert_eq!(kept_ids(&mut s, &logits), vec![1, 3]);
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_is_exact() {
        // 1000 equally likely tokens: the nucleus for 0.5 is 500 tokens, which
        // needs more than the first partial-sort prefix.
        let logits = vec![0.0f32; 1000];
        let mut s = Sampler::new(params(1.0, 0.5, 0, 3));
        let kept = kept_ids(&mut s, &logits);
        assert!((499..=501).contains(&kept.len()), "{}", kept.len());
        // Ties are broken by id, so the kept ones are the lowest ids.
        assert_eq!(kept[0], 0);
        assert_eq!(*kept.last().unwrap() as usize, kept.len() - 1);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = logits_of(&[0.1, 0.6, 0.3]);
        let mut s = Sampler::new(params(1.0, 1.0, 0, 42));
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.6, 0.3]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0, 1.0];
        let freq_of_1 = |t: f32| {
            let mut s = Sampler::new(params(t, 1.0, 0, 9));
            (0..10_000).filter(|_| s.sample(&logits) == 1).count() as f64 / 10_000.0
        };
        // p(1) = 1 / (1 + e^(-1/t))
        assert!((freq_of_1(1.0) - 0.731).abs() < 0.02);
        assert!((freq_of_1(0.25) - 0.982).abs() < 0.01);
        assert!((freq_of_1(10.0) - 0.525).abs() < 0.02);
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.1).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0.95, 50, seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn prng_is_uniform_enough() {
        let mut r = Xoshiro256::seed_from_u64(0);
        let mut buckets = [0usize; 10];
        for _ in 0..100_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            buckets[(x * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_500..10_500).contains(&b), "{buckets:?}");
        }
    }
}
