//! In-process sentence embeddings for BERT-family sentence-transformers models.
//!
//! [`SentenceEmbedder::load`] reads a sentence-transformers model directory
//! (`config.json`, `tokenizer.json`, `model.safetensors`, `modules.json`, the
//! pooling module's `config.json` and, optionally, `sentence_bert_config.json`)
//! and runs the encoder on the CPU with candle. The pipeline mirrors the
//! reference implementation: tokenize (truncating to `max_seq_length`), run the
//! transformer, pool the token embeddings honouring the attention mask, and
//! L2-normalize when the model lists a `Normalize` module.
//!
//! Batches are padded only to the longest input of each internal sub-batch,
//! and inputs are grouped by length so short texts are not padded up to long
//! ones. Padding never changes a result: padded positions are masked out of
//! attention and of pooling.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Largest number of inputs run through the encoder in one forward pass.
/// Bigger requests are split, which bounds peak memory (the attention scores
/// of one sub-batch are `batch × heads × len²` floats).
const SUB_BATCH: usize = 32;

/// The fixed cost of one forward pass, in padded tokens' worth of compute.
/// On CPU a forward costs roughly `overhead + per_token × batch × longest`,
/// so padding a short input up to a long one is paid for in full; measured on
/// a 2-core machine the overhead is about 30 tokens of MiniLM compute. Used to
/// decide where to split a batch (see [`plan_sub_batches`]).
const FORWARD_OVERHEAD_TOKENS: usize = 32;

/// Errors from loading or running a sentence-embedding model.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file the model directory must contain is not there.
    #[error("model file not found: {}", path.display())]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file was read but its contents are not valid or not usable.
    #[error("invalid {}: {message}", path.display())]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The model uses a sentence-transformers feature this loader does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// Tokenization failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The tensor computation failed.
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
}

/// How token embeddings are reduced to one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of the (unmasked) token embeddings.
    Mean,
    /// The embedding of the first (`[CLS]`) token.
    Cls,
    /// Element-wise maximum over the (unmasked) token embeddings.
    Max,
}

/// What a loaded embedding model is and produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderInfo {
    /// The model's name (its directory name).
    pub name: String,
    /// Length of every returned vector.
    pub dimensions: usize,
    /// Inputs longer than this many tokens (special tokens included) are truncated.
    pub max_tokens: usize,
    /// Pooling strategy, from the model's pooling module config.
    pub pooling: Pooling,
    /// Whether vectors are L2-normalized (the model lists a `Normalize` module).
    pub normalize: bool,
}

/// A BERT-family sentence-transformers model loaded for CPU inference.
///
/// `Send + Sync`: one instance can serve concurrent callers; each call runs its
/// own forward pass.
pub struct SentenceEmbedder {
    model: BertModel,
    /// Truncates to `max_tokens`, no padding: used for embedding.
    tokenizer: Tokenizer,
    /// Neither truncates nor pads: used by [`SentenceEmbedder::count_tokens`].
    counting_tokenizer: Tokenizer,
    pad_id: u32,
    lowercase: bool,
    device: Device,
    info: EmbedderInfo,
}

impl std::fmt::Debug for SentenceEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
}

/// What `modules.json` says about the pipeline.
struct Modules {
    transformer_dir: PathBuf,
    pooling_dir: PathBuf,
    normalize: bool,
}

fn required(path: PathBuf) -> Result<PathBuf, EmbedError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(EmbedError::MissingFile { path })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            EmbedError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            EmbedError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| EmbedError::InvalidFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn parse_modules(dir: &Path) -> Result<Modules, EmbedError> {
    let path = required(dir.join("modules.json"))?;
    let entries: Vec<ModuleEntry> = read_json(&path)?;
    let short = |kind: &str| kind.rsplit('.').next().unwrap_or(kind).to_string();
    let mut transformer_dir = None;
    let mut pooling_dir = None;
    let mut normalize = false;
    for entry in &entries {
        let module_dir = dir.join(&entry.path);
        match short(&entry.kind).as_str() {
            "Transformer" if transformer_dir.is_none() && pooling_dir.is_none() => {
                transformer_dir = Some(module_dir)
            }
            "Pooling" if transformer_dir.is_some() && pooling_dir.is_none() => {
                pooling_dir = Some(module_dir)
            }
            "Normalize" if pooling_dir.is_some() && !normalize => normalize = true,
            other => {
                return Err(EmbedError::Unsupported(format!(
                    "{}: module `{other}` ({}) in this position is not supported; \
                     expected Transformer, Pooling, then optionally Normalize",
                    path.display(),
                    entry.kind
                )));
            }
        }
    }
    match (transformer_dir, pooling_dir) {
        (Some(transformer_dir), Some(pooling_dir)) => Ok(Modules {
            transformer_dir,
            pooling_dir,
            normalize,
        }),
        _ => Err(EmbedError::InvalidFile {
            path,
            message: "expected a Transformer module followed by a Pooling module".into(),
        }),
    }
}

fn parse_pooling(path: &Path) -> Result<(Pooling, Option<usize>), EmbedError> {
    let cfg: PoolingConfig = read_json(path)?;
    let unsupported = [
        (
            cfg.pooling_mode_mean_sqrt_len_tokens,
            "mean_sqrt_len_tokens",
        ),
        (cfg.pooling_mode_weightedmean_tokens, "weightedmean_tokens"),
        (cfg.pooling_mode_lasttoken, "lasttoken"),
    ];
    if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
        return Err(EmbedError::Unsupported(format!(
            "{}: pooling mode `{name}` is not supported",
            path.display()
        )));
    }
    let modes: Vec<Pooling> = [
        (cfg.pooling_mode_mean_tokens, Pooling::Mean),
        (cfg.pooling_mode_cls_token, Pooling::Cls),
        (cfg.pooling_mode_max_tokens, Pooling::Max),
    ]
    .into_iter()
    .filter_map(|(on, mode)| on.then_some(mode))
    .collect();
    match modes.as_slice() {
        [mode] => Ok((*mode, cfg.word_embedding_dimension)),
        [] => Err(EmbedError::InvalidFile {
            path: path.to_path_buf(),
            message: "no pooling mode is enabled".into(),
        }),
        _ => Err(EmbedError::Unsupported(format!(
            "{}: several pooling modes at once (concatenated vectors) are not supported",
            path.display()
        ))),
    }
}

impl SentenceEmbedder {
    /// Loads a BERT-family sentence-transformers directory (safetensors +
    /// tokenizer.json + config.json). Pooling and normalization come from the
    /// model's own sentence-transformers files: `modules.json` lists a Pooling
    /// module whose `config.json` selects mean / cls / max pooling, and whether
    /// a Normalize module follows; `max_seq_length` comes from
    /// `sentence_bert_config.json` (falling back to the tokenizer's
    /// `model_max_length`, capped by the model's position embeddings).
    ///
    /// A missing file yields [`EmbedError::MissingFile`] naming it.
    pub fn load(dir: &Path) -> Result<SentenceEmbedder, EmbedError> {
        if !dir.is_dir() {
            return Err(EmbedError::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let modules = parse_modules(dir)?;
        let tdir = &modules.transformer_dir;
        let config_path = required(tdir.join("config.json"))?;
        let tokenizer_path = required(tdir.join("tokenizer.json"))?;
        let weights_path = required(tdir.join("model.safetensors"))?;
        let pooling_path = required(modules.pooling_dir.join("config.json"))?;

        let config: BertConfig = read_json(&config_path)?;
        // Other encoders (RoBERTa, DistilBERT, …) would load into BertModel's
        // tensors only partly, or load and compute something subtly different.
        if let Some(model_type) = config.model_type.as_deref()
            && model_type != "bert"
        {
            return Err(EmbedError::Unsupported(format!(
                "{}: model_type `{model_type}`; only `bert` encoders are supported",
                config_path.display()
            )));
        }
        let (pooling, pooling_dim) = parse_pooling(&pooling_path)?;
        if let Some(dim) = pooling_dim
            && dim != config.hidden_size
        {
            return Err(EmbedError::InvalidFile {
                path: pooling_path,
                message: format!(
                    "word_embedding_dimension {dim} differs from hidden_size {} in {}",
                    config.hidden_size,
                    config_path.display()
                ),
            });
        }

        let st_config_path = tdir.join("sentence_bert_config.json");
        let st_config: Option<SentenceBertConfig> = if st_config_path.is_file() {
            Some(read_json(&st_config_path)?)
        } else {
            None
        };
        let configured_max = match st_config.as_ref().and_then(|c| c.max_seq_length) {
            Some(n) => Some(n),
            None => {
                let tc_path = tdir.join("tokenizer_config.json");
                if tc_path.is_file() {
                    let tc: TokenizerConfig = read_json(&tc_path)?;
                    // Tokenizers without a limit store a huge sentinel here.
                    tc.model_max_length
                        .filter(|n| n.is_finite() && *n >= 1.0 && *n < 1e9)
                        .map(|n| n as usize)
                } else {
                    None
                }
            }
        };
        let max_tokens = configured_max
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        if max_tokens < 2 {
            return Err(EmbedError::InvalidFile {
                path: st_config_path,
                message: format!("max_seq_length {max_tokens} is too small"),
            });
        }
        let lowercase = st_config.as_ref().is_some_and(|c| c.do_lower_case);

        let mut counting_tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| EmbedError::InvalidFile {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;
        // The shipped tokenizer.json may pad to a fixed length and truncate to
        // a different limit than the model's max_seq_length; both are set here.
        counting_tokenizer.with_padding(None);
        counting_tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let mut tokenizer = counting_tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;

        let device = Device::Cpu;
        // Reading the file (rather than memory-mapping it) keeps this crate free of `unsafe`.
        let bytes = std::fs::read(&weights_path).map_err(|source| EmbedError::Io {
            path: weights_path.clone(),
            source,
        })?;
        let vb =
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, &device).map_err(|e| {
                EmbedError::InvalidFile {
                    path: weights_path.clone(),
                    message: e.to_string(),
                }
            })?;
        let model = BertModel::load(vb, &config).map_err(|e| EmbedError::InvalidFile {
            path: weights_path.clone(),
            message: format!("not a BERT model matching {}: {e}", config_path.display()),
        })?;

        let name = dir
            .canonicalize()
            .ok()
            .as_deref()
            .unwrap_or(dir)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sentence-embedder".to_string());
        let info = EmbedderInfo {
            name,
            dimensions: config.hidden_size,
            max_tokens,
            pooling,
            normalize: modules.normalize,
        };
        tracing::info!(
            model = %info.name,
            dimensions = info.dimensions,
            max_tokens = info.max_tokens,
            pooling = ?info.pooling,
            normalize = info.normalize,
            "loaded sentence embedding model"
        );
        Ok(SentenceEmbedder {
            model,
            tokenizer,
            counting_tokenizer,
            pad_id: u32::try_from(config.pad_token_id).unwrap_or(0),
            lowercase,
            device,
            info,
        })
    }

    /// What this model is and produces.
    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn prepare<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if self.lowercase {
            std::borrow::Cow::Owned(text.to_lowercase())
        } else {
            std::borrow::Cow::Borrowed(text)
        }
    }

    /// Embeds a batch (padding to the longest input, attention mask honoured in
    /// pooling); inputs longer than `max_tokens` are truncated. Batches larger
    /// than an internal limit are split into several forward passes.
    ///
    /// Returns one vector per input, in input order, and the number of tokens
    /// of each input that were embedded (special tokens included, after
    /// truncation, so at most `info().max_tokens`).
    pub fn embed(&self, texts: &[&str]) -> Result<(Vec<Vec<f32>>, Vec<usize>), EmbedError> {
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for text in texts {
            let encoding = self
                .tokenizer
                .encode(self.prepare(text).as_ref(), true)
                .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
            ids.push(encoding.get_ids().to_vec());
        }
        let counts: Vec<usize> = ids.iter().map(Vec::len).collect();

        // Group inputs of similar length so each sub-batch pads little.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| counts[i]);
        let sorted_lens: Vec<usize> = order.iter().map(|&i| counts[i]).collect();
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for range in plan_sub_batches(&sorted_lens, SUB_BATCH, FORWARD_OVERHEAD_TOKENS) {
            let chunk = &order[range];
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let out = self.forward(&batch)?;
            for (&i, v) in chunk.iter().zip(out) {
                vectors[i] = v;
            }
        }
        Ok((vectors, counts))
    }

    /// One forward pass over already tokenized inputs.
    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let n = batch.len();
        let len = batch.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut input_ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for ids in batch {
            input_ids.extend_from_slice(ids);
            input_ids.extend(std::iter::repeat_n(self.pad_id, len - ids.len()));
            mask.extend(std::iter::repeat_n(1u32, ids.len()));
            mask.extend(std::iter::repeat_n(0u32, len - ids.len()));
        }
        let input_ids = Tensor::from_vec(input_ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let token_type_ids = input_ids.zeros_like()?;
        let hidden = self
            .model
            .forward(&input_ids, &token_type_ids, Some(&mask))?;
        let pooled = pool(&hidden, &mask.to_dtype(DType::F32)?, self.info.pooling)?;
        let pooled = if self.info.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }

    /// Number of tokens `text` encodes to, special tokens included, *before*
    /// truncation (compare with `info().max_tokens` to detect inputs that
    /// [`SentenceEmbedder::embed`] would truncate).
    pub fn count_tokens(&self, text: &str) -> Result<usize, EmbedError> {
        let encoding = self
            .counting_tokenizer
            .encode(self.prepare(text).as_ref(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encoding.len())
    }
}

/// Splits inputs, sorted by ascending token length, into consecutive sub-batches
/// of at most `max_batch` that minimise the modelled cost
/// `Σ (overhead + batch_size × longest_len)`: one forward per sub-batch, each
/// input padded to the longest of its sub-batch. Exact (dynamic programming
/// over split points), `O(n × max_batch)`.
fn plan_sub_batches(
    sorted_lens: &[usize],
    max_batch: usize,
    overhead: usize,
) -> Vec<std::ops::Range<usize>> {
    let n = sorted_lens.len();
    let max_batch = max_batch.max(1);
    // best[j]: cost of the first j inputs; start[j]: where its last sub-batch begins.
    let mut best = vec![0usize; n + 1];
    let mut start = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = sorted_lens[j - 1];
        let (cost, from) = (j.saturating_sub(max_batch)..j)
            .map(|i| (best[i] + overhead + (j - i) * longest, i))
            .min()
            .unwrap_or((0, 0));
        best[j] = cost;
        start[j] = from;
    }
    let mut ranges = Vec::new();
    let mut j = n;
    while j > 0 {
        ranges.push(start[j]..j);
        j = start[j];
    }
    ranges.reverse();
    ranges
}

/// Reduces token embeddings `hidden` (batch × seq × dim) to sentence vectors
/// (batch × dim). `mask` (batch × seq, f32, 1 for real tokens, 0 for padding)
/// keeps padding out of the result.
fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Mean => {
            let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
            // As the reference does: never divide by zero on an all-padding row.
            let counts = mask.sum_keepdim(1)?.clamp(1e-9f32, f32::MAX)?;
            summed.broadcast_div(&counts)
        }
        Pooling::Max => {
            let keep = mask.unsqueeze(2)?.broadcast_as(hidden.shape())?.ne(0f32)?;
            let floor = Tensor::full(-1e9f32, hidden.shape(), hidden.device())?;
            keep.where_cond(hidden, &floor)?.max(1)
        }
    }
}

/// Scales each row of `x` (batch × dim) to unit L2 length.
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batch of 2, seq 3, dim 2; the second row has one padding position
    /// holding large values that must not leak into the result.
    fn sample() -> (Tensor, Tensor) {
        let hidden = Tensor::new(
            &[
                [[1f32, -2.], [3., 4.], [5., 0.]],
                [[2f32, 2.], [-4., 6.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1.], [1., 1., 0.]], &Device::Cpu).unwrap();
        (hidden, mask)
    }

    fn rows(t: Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn mean_pooling_ignores_padding() {
        let (h, m) = sample();
        assert_eq!(
            rows(pool(&h, &m, Pooling::Mean).unwrap()),
            vec![vec![3.0, 2.0 / 3.0], vec![-1.0, 4.0]]
        );
    }

    #[test]
    fn cls_pooling_takes_first_token() {
        let (h, m) = sample();
        assert_eq!(
            rows(pool(&h, &m, Pooling::Cls).unwrap()),
            vec![vec![1.0, -2.0], vec![2.0, 2.0]]
        );
    }

    #[test]
    fn max_pooling_ignores_padding() {
        let (h, m) = sample();
        assert_eq!(
            rows(pool(&h, &m, Pooling::Max).unwrap()),
            vec![vec![5.0, 4.0], vec![2.0, 6.0]]
        );
    }

    #[test]
    fn mean_pooling_of_all_padding_row_is_zero_not_nan() {
        let h = Tensor::new(&[[[7f32, 8.]]], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[0f32]], &Device::Cpu).unwrap();
        assert_eq!(
            rows(pool(&h, &m, Pooling::Mean).unwrap()),
            vec![vec![0.0, 0.0]]
        );
    }

    #[test]
    fn normalize_gives_unit_rows_and_keeps_zero_rows() {
        let x = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu).unwrap();
        assert_eq!(
            rows(l2_normalize(&x).unwrap()),
            vec![vec![0.6, 0.8], vec![0.0, 0.0]]
        );
    }

    #[test]
    fn sub_batch_plan_covers_everything_in_order() {
        assert!(plan_sub_batches(&[], 32, 32).is_empty());
        // Equal lengths: only the batch-size cap splits.
        let plan = plan_sub_batches(&[10; 70], 32, 32);
        assert_eq!(plan, vec![0..6, 6..38, 38..70]);
        // Very different lengths are not padded to each other.
        let lens = [2, 4, 8, 9, 9, 11, 11, 18, 20, 29, 53, 162, 256];
        let plan = plan_sub_batches(&lens, 32, 32);
        assert_eq!(plan.first().unwrap().start, 0);
        assert_eq!(plan.last().unwrap().end, lens.len());
        assert!(plan.windows(2).all(|w| w[0].end == w[1].start));
        assert!(plan.iter().all(|r| !r.is_empty() && r.len() <= 32));
        assert!(plan.contains(&(12..13)), "{plan:?}");
        assert!(plan.len() < lens.len(), "{plan:?}");
        // No fixed overhead: every input alone (no padding at all) is optimal.
        assert_eq!(plan_sub_batches(&[1, 2, 3], 32, 0).len(), 3);
    }

    #[test]
    fn embedder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SentenceEmbedder>();
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-embed-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const MODULES: &str = r#"[
        {"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
        {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn modules_json_gives_pooling_dir_and_normalize() {
        let dir = temp_dir("modules");
        write(&dir, "modules.json", MODULES);
        let m = parse_modules(&dir).unwrap();
        assert_eq!(m.transformer_dir, dir.join(""));
        assert_eq!(m.pooling_dir, dir.join("1_Pooling"));
        assert!(m.normalize);

        write(&dir, "modules.json", &MODULES.replace("Normalize", "Dense"));
        let err = parse_modules(&dir).err().unwrap().to_string();
        assert!(err.contains("Dense"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pooling_config_modes() {
        let dir = temp_dir("pooling");
        let path = dir.join("config.json");
        let cfg = |cls: bool, mean: bool, max: bool| {
            format!(
                r#"{{"word_embedding_dimension":384,"pooling_mode_cls_token":{cls},
                    "pooling_mode_mean_tokens":{mean},"pooling_mode_max_tokens":{max},
                    "pooling_mode_mean_sqrt_len_tokens":false}}"#
            )
        };
        for (c, m, x, want) in [
            (false, true, false, Pooling::Mean),
            (true, false, false, Pooling::Cls),
            (false, false, true, Pooling::Max),
        ] {
            std::fs::write(&path, cfg(c, m, x)).unwrap();
            assert_eq!(parse_pooling(&path).unwrap(), (want, Some(384)));
        }
        std::fs::write(&path, cfg(true, true, false)).unwrap();
        assert!(matches!(
            parse_pooling(&path),
            Err(EmbedError::Unsupported(_))
        ));
        std::fs::write(&path, cfg(false, false, false)).unwrap();
        assert!(matches!(
            parse_pooling(&path),
            Err(EmbedError::InvalidFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_modules_json_is_named() {
        let dir = temp_dir("missing");
        let err = SentenceEmbedder::load(&dir).err().unwrap();
        assert!(err.to_string().contains("modules.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
